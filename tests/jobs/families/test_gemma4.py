"""Gemma 4 through every stage on tiny random-weight models: the dense layout (per-layer inputs, shared key/value
layers, global layers with their own head size and partial RoPE) on chat data, and the mixture of experts (K=V
global layers) on an int8 base; raw text packed. Preprocess writes Gemma 4's turns, the fine-tune learns,
the benchmark scores and generates, and convert's export and PEFT adapter reproduce the model through
transformers' `Gemma4ForCausalLM` within the tolerance Gemma 3 meets. Tiny random models only: real Gemma 4
weights cannot be fetched on these machines."""

from __future__ import annotations

import json

import pytest

from jobs.benchmark.core import run as benchmark
from jobs.contract import artifacts
from jobs.contract.configs.benchmark import BenchmarkConfig
from jobs.contract.configs.convert import ConvertConfig
from jobs.contract.configs.finetune import FinetuneConfig
from jobs.contract.configs.preprocess import PreprocessConfig
from jobs.convert.core import run as convert
from jobs.finetuning.core import run as finetune
from jobs.preprocessing.core import run as preprocess

CHATS = [[{"role": "user", "content": f"What does function number {i} do?"},
          {"role": "assistant", "content": f"It returns the value {i % 5}."}] for i in range(40)]


def _through_the_stages(tmp_path, model, quantization: str = "none") -> dict:
    """Chat data preprocessed for the model, a LoRA fine-tune, the benchmark and convert; convert's metrics."""
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    preprocess(PreprocessConfig(input=str(source), output=str(pre), base_model=str(model), mode="chat", eval_fraction=0.25),
               tmp_path / "w")
    row = json.loads((pre / "train.jsonl").read_text().splitlines()[0])
    assert row["prompt"].startswith("<|turn>user\n") and row["response"].endswith("<turn|>")

    manifest = finetune(FinetuneConfig(data=str(pre), output=str(ft), base_model=str(model), max_steps=6, batch_size=4,
                                       sequence_length=48, learning_rate=2e-2, checkpoint_every=0,
                                       base_quantization=quantization), tmp_path / "w")
    assert manifest["metrics"]["eval_loss_after"] < manifest["metrics"]["eval_loss_before"]

    report = benchmark(BenchmarkConfig(data=str(pre), finetune=str(ft), base_model=str(model), output=str(tmp_path / "b"),
                                       max_new_tokens=3), tmp_path / "w")
    metrics = report["metrics"]
    assert metrics["tuned_eval_perplexity"] < metrics["base_eval_perplexity"]
    assert 0 <= metrics["tuned_stop_rate"] <= 1 and "tuned_rouge_l" in metrics

    converted = convert(ConvertConfig(finetune=str(ft), output=str(tmp_path / "hf")), tmp_path / "w")["metrics"]
    for check in ("parity", "peft_parity"):
        assert converted[check]["passed"] and converted[check]["greedy_next_token_equal"], converted[check]
        assert converted[check]["logits_max_abs_diff"] < 1e-3
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Gemma4ForCausalLM"]
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tokenizer.convert_tokens_to_ids("<turn|>") in generation["eos_token_id"]
    adapter = json.loads((tmp_path / "hf" / artifacts.PEFT_ADAPTER / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["q_proj", "v_proj"]
    return converted


def test_the_mixture_of_experts_on_an_int8_base_runs_every_stage(tmp_path, tiny_gemma4_moe):
    """A keras-hub preset base: convert goes through keras-hub's exporter (fixed for Gemma 4) and applies the
    adapter to the full-precision base; the K=V global layers are declared so."""
    converted = _through_the_stages(tmp_path, tiny_gemma4_moe, "int8")
    assert converted["path"].startswith("through keras-hub")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["attention_k_eq_v"] is True


@pytest.mark.slow  # packing is family-blind (tests/jobs/common/test_packing.py); this shows Gemma 4 inputs take it
def test_packed_raw_text_trains(tmp_path, tiny_gemma4):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the function returns {i % 7} for its input." for i in range(60)))
    preprocess(PreprocessConfig(input=str(corpus), output=str(tmp_path / "pre"), base_model=str(tiny_gemma4), mode="text",
                                eval_fraction=0.2), tmp_path / "w")
    manifest = finetune(FinetuneConfig(data=str(tmp_path / "pre"), output=str(tmp_path / "ft"), base_model=str(tiny_gemma4),
                                       max_steps=4, batch_size=2, sequence_length=64, learning_rate=2e-2,
                                       checkpoint_every=0), tmp_path / "w")
    assert manifest["metrics"]["eval_loss_after"] < manifest["metrics"]["eval_loss_before"]


@pytest.fixture(scope="module")
def hf_gemma4(tmp_path_factory):
    """Tiny dense Gemma 4 exported to a Hugging Face checkpoint (`Gemma4ForCausalLM`), and the model it came from."""
    from jobs.convert.core import export
    from tests.tiny_models import make_tiny_causal_lm

    model = make_tiny_causal_lm("gemma4")
    directory = tmp_path_factory.mktemp("hf-gemma4") / "model"
    export(model, directory)
    return directory, model


def test_an_export_reads_back_as_the_same_model_in_keras_hub_and_transformers(hf_gemma4):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from jobs import families

    directory, original = hf_gemma4
    family = families.by_name("gemma4")
    reread = family.load(str(directory))
    ids = np.array([[2, 10, 20, 30, 40, 50, 60, 70, 80, 90]], np.int32)
    inputs = family.backbone_inputs(ids, np.ones_like(ids))
    expected = np.asarray(original(inputs))
    # Global layers keep their own value projection (keras-hub's exporter would have them read back as K=V).
    assert [block.attention.value_dense is not None for block in reread.backbone.transformer_layers] == \
        [block.attention.value_dense is not None for block in original.backbone.transformer_layers]
    np.testing.assert_allclose(np.asarray(reread(inputs)), expected, atol=1e-5)
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    assert type(hf).__name__ == "Gemma4ForCausalLM"
    with torch.no_grad():
        np.testing.assert_allclose(hf(input_ids=torch.from_numpy(ids).long()).logits.numpy(), expected, atol=1e-4)


def test_a_hugging_face_directory_runs_every_stage_and_converts_without_keras(tmp_path, hf_gemma4):
    """The demo's shape, dense: the base is a Hugging Face checkpoint, so convert merges the adapter into its
    safetensors and checks the export and the adapter against the fine-tune's recorded logits, no Keras model."""
    directory, _ = hf_gemma4
    converted = _through_the_stages(tmp_path, directory)
    assert converted["path"].startswith("without Keras")
    assert "attention_k_eq_v" not in json.loads((tmp_path / "hf" / "config.json").read_text())


@pytest.mark.slow  # 20-30 s each; the Gemma 3 layout map's test runs by default
@pytest.mark.parametrize("kind", ["gemma4", "gemma4_moe"])
def test_model_parallel_with_its_layout_map_matches_one_device(request, kind):
    """Eight simulated CPU devices, the model axis 2: per-layer input tables and experts are sharded too."""
    import numpy as np

    from tests.conftest import run_module

    preset = request.getfixturevalue("tiny_gemma4" if kind == "gemma4" else "tiny_gemma4_moe")
    probe = run_module("tests.jobs.finetuning.distribution_probe", str(preset), "none,model",
                       env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(result["model"], result["none"], rtol=1e-4)
    assert result["none"][2] < result["none"][0]
    shardings = json.loads([line for line in probe.stderr.splitlines() if line.startswith('{"kind": "model"')][-1])["shardings"]
    sharded = "moe_expert_bank/gate_proj" if kind == "gemma4_moe" else "per_layer_token_embedding/embeddings"
    assert any(sharded in path and "'model'" in spec for path, spec in shardings.items()), shardings


@pytest.mark.slow  # the mechanism is every family's (tests/reliability/test_preemption.py runs it by default)
def test_sigterm_then_restart_ends_where_an_uninterrupted_run_ends(tmp_path, tiny_gemma4):
    """Preemption on Gemma 4: stopped at step 3 of 6, restarted, the adapter equals an uninterrupted run's."""
    import numpy as np

    from jobs.contract.artifacts import ADAPTER
    from tests.pipeline import ROWS
    from tests.support.finetune import _adapter_arrays, sigterm_then_resume

    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    preprocess(PreprocessConfig(input=str(source), output=str(tmp_path / "pre"), base_model=str(tiny_gemma4)), tmp_path / "w")
    flags = ["--data", str(tmp_path / "pre"), "--base-model", str(tiny_gemma4), "--max-steps", "6", "--batch-size", "4",
             "--sequence-length", "48", "--learning-rate", "0.005", "--checkpoint-every", "100"]
    finetune(FinetuneConfig(data=str(tmp_path / "pre"), output=str(tmp_path / "reference"), base_model=str(tiny_gemma4),
                            max_steps=6, batch_size=4, sequence_length=48, learning_rate=0.005, checkpoint_every=100),
             tmp_path / "w")
    expected = _adapter_arrays(tmp_path / "reference" / ADAPTER)
    actual = sigterm_then_resume([*flags, "--output", str(tmp_path / "stopped")], 3, 6)
    assert actual.keys() == expected.keys() and actual
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, atol=1e-6, rtol=0)


@pytest.mark.slow  # a whole DAG run: the default suite runs the Gemma 3 one (tests/reliability/test_local_dag.py)
def test_the_dag_runs_a_gemma4_directory_end_to_end(tmp_path, hf_gemma4):
    """The demo's DAG run on the local backend, `base_model` a tiny Gemma 4 Hugging Face directory: every stage a
    real subprocess against the Cloud Storage emulator, the champion converted without Keras."""
    from tests.support.local_run import BUCKET, _local_run

    directory, _ = hf_gemma4
    conf = {"base_model": str(directory), "max_steps": 2, "batch_size": 2, "max_tokens": 64, "sequence_length": 64,
            "run_name": "g4"}
    result = _local_run(tmp_path, conf)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    prefix = tmp_path / "gcs" / BUCKET / "runs" / "g4"
    report = json.loads((prefix / "report.json").read_text())
    assert report["complete"] is True and report["summary"]["parity"]["passed"] is True
    assert [s["stage"] for s in report["stages"]] == ["preprocess", "finetune", "benchmark", "convert"]
    exported = json.loads(next(prefix.glob("candidates/*/convert/config.json")).read_text())
    assert exported["architectures"] == ["Gemma4ForCausalLM"]


def test_lm_eval_scores_agree_with_its_hugging_face_backend(hf_gemma4):
    """The benchmark's lm-evaluation-harness backend on Gemma 4 (its inputs include positions) against lm-eval's own
    HFLM on the exported model: the same log-likelihoods within 1e-3, the same greedy flags."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from jobs.benchmark import harness

    directory, model = hf_gemma4
    pairs = [("Question: What does os.path.join do?\nAnswer:", " Join one or more path segments intelligently."),
             ("Open a file and", " return a stream."), ("", "The quick brown fox jumps over the lazy dog.")]
    asked = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    ours = harness.KerasHubLM(model, batch_size=4, max_length=64).loglikelihood(asked)
    theirs = HFLM(pretrained=str(directory), device="cpu", dtype="float32", batch_size=4, max_length=64).loglikelihood(asked)
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, abs=1e-3) and greedy_a == greedy_b


def test_a_multimodal_preset_is_loaded_for_text_and_says_what_it_leaves_out(tmp_path, caplog):
    import logging

    import numpy as np

    from jobs.common import models
    from tests.tiny_models import make_tiny_causal_lm

    original = make_tiny_causal_lm("gemma4_vision")
    original.save_to_preset(str(tmp_path / "mm"))
    with caplog.at_level(logging.WARNING):
        model = models.load_causal_lm(str(tmp_path / "mm"), tmp_path / "w")
    assert model.backbone.vision_encoder is None
    assert "the text decoder, its embeddings and tokenizer are used; the vision encoder is not loaded" in caplog.text
    text_weights = {v.path: v for v in original.backbone.weights if not v.path.startswith("vision")}
    loaded = {v.path: v for v in model.backbone.weights}
    assert loaded and set(loaded) <= set(text_weights)
    for path, variable in loaded.items():
        np.testing.assert_array_equal(np.asarray(variable.value), np.asarray(text_weights[path].value))
