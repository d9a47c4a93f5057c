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


@pytest.mark.parametrize("kind, quantization", [("gemma4", "none"), ("gemma4_moe", "int8")], ids=["dense-chat", "moe-int8"])
def test_every_stage_runs_and_the_export_reproduces_the_model(tmp_path, request, kind, quantization):
    model = request.getfixturevalue("tiny_gemma4" if kind == "gemma4" else "tiny_gemma4_moe")
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    preprocess(PreprocessConfig(input=str(source), output=str(pre), base_model=str(model), mode="chat", eval_fraction=0.25),
               tmp_path / "w")
    row = json.loads((pre / "train.jsonl").read_text().splitlines()[0])
    assert row["prompt"].startswith("<|turn>user\n") and row["response"].endswith("<turn|>")

    manifest = finetune(FinetuneConfig(data=str(pre), output=str(ft), base_model=str(model), max_steps=8, batch_size=4,
                                       sequence_length=48, learning_rate=2e-2, checkpoint_every=0,
                                       base_quantization=quantization), tmp_path / "w")
    history = manifest["metrics"]
    assert history["eval_loss_after"] < history["eval_loss_before"]

    report = benchmark(BenchmarkConfig(data=str(pre), finetune=str(ft), base_model=str(model), output=str(tmp_path / "b"),
                                       max_new_tokens=6), tmp_path / "w")
    metrics = report["metrics"]
    assert metrics["tuned_eval_perplexity"] < metrics["base_eval_perplexity"]
    assert 0 <= metrics["tuned_stop_rate"] <= 1 and "tuned_rouge_l" in metrics

    converted = convert(ConvertConfig(finetune=str(ft), output=str(tmp_path / "hf")), tmp_path / "w")["metrics"]
    for check in ("parity", "peft_parity"):
        assert converted[check]["passed"] and converted[check]["greedy_next_token_equal"], converted[check]
        assert converted[check]["logits_max_abs_diff"] < 1e-3
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Gemma4ForCausalLM"]
    assert config.get("attention_k_eq_v", False) is (kind == "gemma4_moe")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tokenizer.convert_tokens_to_ids("<turn|>") in generation["eos_token_id"]
    adapter = json.loads((tmp_path / "hf" / artifacts.PEFT_ADAPTER / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["q_proj", "v_proj"]


def test_packed_raw_text_trains(tmp_path, tiny_gemma4):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the function returns {i % 7} for its input." for i in range(60)))
    preprocess(PreprocessConfig(input=str(corpus), output=str(tmp_path / "pre"), base_model=str(tiny_gemma4), mode="text",
                                eval_fraction=0.2), tmp_path / "w")
    manifest = finetune(FinetuneConfig(data=str(tmp_path / "pre"), output=str(tmp_path / "ft"), base_model=str(tiny_gemma4),
                                       max_steps=4, batch_size=2, sequence_length=64, learning_rate=2e-2,
                                       checkpoint_every=0), tmp_path / "w")
    assert manifest["metrics"]["eval_loss_after"] < manifest["metrics"]["eval_loss_before"]
