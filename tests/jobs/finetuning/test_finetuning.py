from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jobs.contract.artifacts import ADAPTER, MANIFEST
from jobs.contract.artifacts import MERGED_MODEL as MERGED
from jobs.contract.configs.finetune import FinetuneConfig
from jobs.contract.configs.preprocess import PreprocessConfig
from jobs.contract.errors import BadInputError
from jobs.finetuning.core import run
from jobs.preprocessing.core import run as preprocess
from tests.conftest import run_module
from tests.pipeline import ROWS
from tests.support.finetune import _config


def test_lora_lowers_training_loss_and_writes_outputs(tmp_path, prepared, tiny_gemma3):
    result = run(_config(prepared, tmp_path / "out", tiny_gemma3, max_steps=12, eval_every=6), tmp_path / "w")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["history"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert [e["step"] for e in metrics["evals"]] == [0, 6, 12]
    out = tmp_path / "out"
    for name in (ADAPTER, f"{MERGED}/config.json", "loss_curve.png", MANIFEST):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert result["metrics"]["trainable_parameters"] == metrics["trainable_parameters"] > 0
    assert json.loads((out / "_progress.json").read_text())["step"] == 12


def test_adapter_and_merged_preset_reload_to_identical_logits(tmp_path, prepared, tiny_gemma3):
    import keras_hub

    run(_config(prepared, tmp_path / "out", tiny_gemma3, learning_rate=5e-2), tmp_path / "w")
    x = {"token_ids": np.array([[2, 30, 31, 32, 33, 34]], dtype=np.int32), "padding_mask": np.ones((1, 6), dtype=np.int32)}
    merged = keras_hub.models.CausalLM.from_preset(str(tmp_path / "out" / MERGED))
    with_adapter = keras_hub.models.CausalLM.from_preset(str(tiny_gemma3))
    base_logits = np.asarray(with_adapter(x))
    with_adapter.backbone.enable_lora(4, target_layer_names=["query", "value"])
    with_adapter.backbone.load_lora_weights(str(tmp_path / "out" / ADAPTER))
    merged_logits, adapter_logits = np.asarray(merged(x)), np.asarray(with_adapter(x))
    np.testing.assert_allclose(merged_logits, adapter_logits, atol=1e-5)
    assert np.abs(merged_logits - base_logits).max() > 1e-3  # the LoRA delta is really in the merged kernels


def test_gcs_in_and_out_and_rerun_skipped(gcs, tmp_path, prepared, tiny_gemma3):
    from jobs.common import storage

    storage.publish_dir(prepared, f"{gcs}/runs/r/preprocess")
    storage.publish_dir(tiny_gemma3, f"{gcs}/models/tiny")
    args = ["--data", f"{gcs}/runs/r/preprocess", "--output", f"{gcs}/runs/r/finetune", "--base-model", f"{gcs}/models/tiny",
            "--max-steps", "4", "--batch-size", "4", "--sequence-length", "48", "--checkpoint-every", "2"]
    env = {"STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]}
    first = run_module("jobs.finetuning", *args, env=env)
    assert first.returncode == 0, first.stdout[-3000:]
    files = set(storage.list_files(f"{gcs}/runs/r/finetune"))
    assert {MANIFEST, ADAPTER, "metrics.json", f"{MERGED}/config.json", "checkpoints/step-00000004/_COMPLETE"} <= files
    manifest = json.loads(storage.read_bytes(f"{gcs}/runs/r/finetune/{MANIFEST}"))
    assert manifest["inputs"][0]["uri"] == f"{gcs}/runs/r/preprocess" and manifest["outputs"][ADAPTER]["bytes"] > 0
    second = run_module("jobs.finetuning", *args, env=env)
    assert second.returncode == 0 and "SKIPPED" in second.stdout


def test_data_without_manifest_is_exit_2(tmp_path, tiny_gemma3):
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(BadInputError, match="--data.*no _manifest.json"):
        run(_config(tmp_path / "pre", tmp_path / "out", tiny_gemma3), tmp_path / "w")


def test_unknown_lora_target_is_bad_input(tmp_path, prepared, tiny_gemma3):
    with pytest.raises(BadInputError, match="--lora-targets: got 'query,nonexistent_layer'; expected layer names a "
                                            "Gemma 3 model has LoRA for: query, key, value, attention_output"):
        run(_config(prepared, tmp_path / "out", tiny_gemma3, lora_targets=("query", "nonexistent_layer")), tmp_path / "w")


@pytest.mark.parametrize("field,value", [("lora_rank", 0), ("lora_rank", -2), ("batch_size", 0), ("learning_rate", 2.0),
                                         ("distribution", "pipeline"), ("sequence_length", 4)])
def test_config_validation(field, value):
    with pytest.raises(BadInputError, match="--" + field.replace("_", "-")):
        FinetuneConfig(data="d", output="o", **{field: value})


def test_gemma_v1_family_trains(tmp_path, tiny_gemma, tmp_path_factory):
    source = tmp_path / "d.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in ROWS[:12]) + "\n")
    preprocess(PreprocessConfig(input=str(source), output=str(tmp_path / "pre"), base_model=str(tiny_gemma)), tmp_path / "w")
    result = run(_config(tmp_path / "pre", tmp_path / "out", tiny_gemma, max_steps=2, mixed_precision=True), tmp_path / "w")
    assert result["metrics"]["model_class"] == "GemmaCausalLM"
    assert np.isfinite(result["metrics"]["final_train_loss"])
    import keras_hub

    merged = keras_hub.models.CausalLM.from_preset(str(tmp_path / "out" / MERGED))
    assert merged.backbone.dtype_policy.name == "float32"


def test_data_and_model_parallel_match_one_device(tiny_gemma3):
    """Eight simulated CPU devices: the loss after two optimizer steps matches one device within 1e-4 relative."""
    probe = run_module("tests.jobs.finetuning.distribution_probe", str(tiny_gemma3),
                       env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    # losses[2] is the loss after two updates
    np.testing.assert_allclose(result["data"], result["none"], rtol=1e-4)
    np.testing.assert_allclose(result["model"], result["none"], rtol=1e-4)
    assert result["none"][2] < result["none"][0]
    assert "'model'" in probe.stderr  # the layout map really sharded the feed-forward kernels
    # An int8 base: the layout map still fits its (same-shaped) int8 kernels; model parallel matches one device.
    np.testing.assert_allclose(result["int8_model"], result["int8_none"], rtol=1e-4)
    quantized = [json.loads(line) for line in probe.stderr.splitlines() if '"quantization": "int8"' in line]
    sharded = quantized[-1]["shardings"]
    assert "None, 'model')" in sharded["decoder_block_0/ffw_gating/kernel"]  # the int8 kernel itself
