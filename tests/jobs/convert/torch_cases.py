"""Convert on the backend production runs it on: torch (docker/convert.Dockerfile, jobs/convert/__main__.py).
Run by tests/jobs/convert/test_on_torch.py in a pytest process of its own with KERAS_BACKEND=torch; the
fine-tune that feeds it runs as its own JAX process, as in the pipeline."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jobs.contract.artifacts import MANIFEST
from jobs.contract.configs.convert import ConvertConfig
from jobs.contract.errors import BadInputError, ExportMismatchError
from jobs.convert import core
from jobs.convert.safetensors_io import reshard
from tests.pipeline import tiny_pipeline_processes
from tests.support import nonempty

pytestmark = pytest.mark.skipif(os.environ.get("KERAS_BACKEND") != "torch",
                                reason="run through test_on_torch.py, with KERAS_BACKEND=torch")


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory, tiny_gemma3, tiny_gemma):
    import keras

    assert keras.backend.backend() == "torch"
    return {kind: tiny_pipeline_processes(tmp_path_factory.mktemp(kind), model, steps=4)
            for kind, model in (("gemma3", tiny_gemma3), ("gemma", tiny_gemma))}


def _tensors(directory):
    from safetensors.numpy import load_file

    out = {}
    for path in nonempty(sorted(directory.glob("*.safetensors")), f"safetensors files in {directory}"):
        out.update(load_file(str(path)))
    return out


@pytest.mark.parametrize("kind", ["gemma3", "gemma"])
def test_convert_merged_preset_and_parity(tmp_path, kind, pipelines):
    paths = pipelines[kind]
    result = core.run(ConvertConfig(finetune=str(paths["finetune"]), output=str(tmp_path / "hf"),
                                    data=str(paths["preprocess"]), answers=2), tmp_path / "w")
    out = tmp_path / "hf"
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "generation_config.json", "parity.json", MANIFEST):
        assert (out / name).exists(), name
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["token_ids_equal"] and parity["greedy_next_token_equal"]
    assert parity["logits_max_abs_diff"] <= 1e-3
    assert result["metrics"]["peak_rss_bytes"] > 0 and result["metrics"]["checkpoint_bytes"] > 0
    # The servable adapter, checked at convert time with PeftModel on the exported base.
    peft = json.loads((out / "adapter" / "peft_parity.json").read_text())
    assert peft["passed"] and peft["logits_max_abs_diff"] <= 1e-3 and peft == result["metrics"]["peft_parity"]
    assert set(peft["target_modules"]) == {"q_proj", "v_proj"}
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == peft["rank"]
    answers = json.loads((out / "answers.json").read_text())
    assert len(answers) == 2 and all(isinstance(a["before"], str) and isinstance(a["after"], str) and a["prompt"] for a in answers)


def test_adapter_export_carries_the_lora_delta(tmp_path, tiny_gemma3, pipelines):
    """Fails if the LoRA delta is lost: only the adapted projections change, and parity is checked against
    the LoRA-enabled Keras model."""
    import keras_hub

    paths = pipelines["gemma3"]
    core.run(ConvertConfig(finetune=str(paths["finetune"]), adapter=str(paths["finetune"] / "adapter.lora.h5"),
                           output=str(tmp_path / "tuned")), tmp_path / "w")
    base = keras_hub.models.CausalLM.from_preset(str(tiny_gemma3))
    core.export(base, tmp_path / "base")
    tuned, original = _tensors(tmp_path / "tuned"), _tensors(tmp_path / "base")
    assert tuned.keys() == original.keys()
    changed = sorted(k for k in tuned if not np.array_equal(tuned[k], original[k]))
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed), changed
    assert json.loads((tmp_path / "tuned" / "parity.json").read_text())["passed"]


def test_lost_delta_is_refused_and_nothing_published(tmp_path, tiny_gemma3, monkeypatch, pipelines):
    import keras_hub

    paths = pipelines["gemma3"]
    real_export = core.export
    monkeypatch.setattr(core, "export", lambda model, d: real_export(keras_hub.models.CausalLM.from_preset(str(tiny_gemma3)), d))
    with pytest.raises(ExportMismatchError, match="nothing published"):
        core.run(ConvertConfig(finetune=str(paths["finetune"]), adapter=str(paths["finetune"] / "adapter.lora.h5"),
                               output=str(tmp_path / "hf")), tmp_path / "w")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def test_bfloat16_export(tmp_path, pipelines):
    paths = pipelines["gemma3"]
    core.run(ConvertConfig(finetune=str(paths["finetune"]), output=str(tmp_path / "hf"), dtype="bfloat16"), tmp_path / "w")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as reader:
        assert {str(reader.get_tensor(k).dtype) for k in reader.keys()} == {"torch.bfloat16"}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_reshard_writes_index(tmp_path, tiny_gemma3):
    import keras_hub
    from transformers import AutoModelForCausalLM

    model = keras_hub.models.CausalLM.from_preset(str(tiny_gemma3))
    core.export(model, tmp_path / "hf")
    before = _tensors(tmp_path / "hf")
    files = reshard(tmp_path / "hf", "float32", max_shard_bytes=40_000)
    assert len(files) > 1 and not (tmp_path / "hf" / "model.safetensors").exists()
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(before) and set(index["weight_map"].values()) == set(files)
    after = _tensors(tmp_path / "hf")
    assert all(np.array_equal(before[k], after[k]) for k in before)
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))  # transformers follows the index


def test_unsupported_architecture_names_supported(tmp_path):
    class FakeBackbone:
        pass

    class FakeModel:
        backbone = FakeBackbone()

    with pytest.raises(BadInputError, match=r"FakeBackbone.*a supported family \(Gemma \(1 and 2\), Gemma 3, Gemma 4\)"):
        core.export(FakeModel(), tmp_path)


def test_config_needs_a_source():
    with pytest.raises(BadInputError, match="--finetune"):
        ConvertConfig(output="o")
    with pytest.raises(BadInputError, match="--adapter"):
        ConvertConfig(output="o", base_model="b", adapter="x.h5")
