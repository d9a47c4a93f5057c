"""Convert without the training stack: a fine-tune of a Hugging Face base (a tiny Gemma 3 exported by keras-hub)
is merged tensor by tensor and checked against the logits the fine-tune recorded, in a process that never
imports Keras, JAX or TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jobs.contract import artifacts
from jobs.contract.configs.convert import ConvertConfig
from jobs.contract.errors import ExportMismatchError
from jobs.convert import core, hf_merge
from tests.conftest import ROOT
from tests.pipeline import tiny_pipeline_processes

# Runs the convert CLI, then fails if anything of the training stack was imported on the way.
NO_TRAINING_STACK = """
import runpy, sys
sys.argv = ["jobs.convert", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("jobs.convert", run_name="__main__", alter_sys=True)
except SystemExit as stop:
    code = stop.code
loaded = sorted({"keras", "keras_hub", "jax", "tensorflow"} & set(sys.modules))
assert not loaded, f"the convert process imported {loaded}"
sys.exit(code)
"""


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, tiny_gemma3):
    import keras_hub

    root = tmp_path_factory.mktemp("hf-run")
    base = root / "base-hf"
    keras_hub.models.CausalLM.from_preset(str(tiny_gemma3)).export_to_transformers(str(base))
    return {"base": base, **tiny_pipeline_processes(root, base, steps=4)}


def test_fine_tune_records_what_convert_needs(hf_run):
    manifest = json.loads((hf_run["finetune"] / artifacts.MANIFEST).read_text())
    assert artifacts.REFERENCE_LOGITS in manifest["outputs"]
    assert f"{artifacts.PEFT_ADAPTER}/adapter_model.safetensors" in manifest["outputs"]


def test_convert_merges_and_verifies_without_keras(hf_run, tmp_path):
    out = tmp_path / "hf"
    args = ["--finetune", str(hf_run["finetune"]), "--output", str(out), "--data", str(hf_run["preprocess"]), "--answers", "2"]
    result = subprocess.run([sys.executable, "-c", NO_TRAINING_STACK, *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / artifacts.MANIFEST).read_text())["metrics"]
    assert metrics["path"].startswith("without Keras")
    parity = json.loads((out / artifacts.PARITY).read_text())
    assert parity["passed"] and parity["token_ids_equal"] and parity["logits_max_abs_diff"] <= 1e-3
    peft = json.loads((out / artifacts.PEFT_ADAPTER / artifacts.PEFT_PARITY).read_text())
    assert peft["passed"] and set(peft["target_modules"]) == {"q_proj", "v_proj"}
    assert len(set(json.loads((out / "generation_config.json").read_text())["eos_token_id"])) == 2  # EOS, end of turn
    answers = json.loads((out / artifacts.ANSWERS).read_text())
    assert len(answers) == 2 and all(isinstance(a["before"], str) and isinstance(a["after"], str) for a in answers)
    split = metrics["time_split"]
    assert split["compilation"] == 0 and split["model_load"] > 0  # no XLA; transformers loads the checks' models
    # What transformers loads is the merged model: it differs from the base in the adapted projections only.
    from safetensors.numpy import load_file

    tuned, base = load_file(str(out / "model.safetensors")), load_file(str(hf_run["base"] / "model.safetensors"))
    changed = sorted(k for k in tuned if (tuned[k] != base[k]).any())
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed), changed


def test_a_lost_delta_is_refused_and_nothing_published(hf_run, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_merge, "adapter_deltas", lambda directory: {})
    with pytest.raises(ExportMismatchError, match="recorded logits.*nothing published"):
        core.run(ConvertConfig(finetune=str(hf_run["finetune"]), output=str(tmp_path / "hf")), tmp_path / "w")
    assert not (tmp_path / "hf" / artifacts.MANIFEST).exists()


def test_the_base_can_be_exported_beside_the_adapter(hf_run, tmp_path):
    """`--export-base`: the base in Hugging Face format next to the merged model, for serving the adapter on it."""
    from safetensors.numpy import load_file

    core.run(ConvertConfig(finetune=str(hf_run["finetune"]), output=str(tmp_path / "hf"), export_base=True,
                           dtype="bfloat16"), tmp_path / "w")
    base = tmp_path / "hf" / artifacts.BASE_EXPORT
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"
    assert (base / "tokenizer.model").exists() and (base / "generation_config.json").exists()
    import torch
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), framework="pt") as exported:
        names = list(exported.keys())
        assert names and all(exported.get_tensor(n).dtype == torch.bfloat16 for n in names)
    original = load_file(str(hf_run["base"] / "model.safetensors"))
    assert set(names) == set(original)  # the base's own tensors, the adapter not merged in
