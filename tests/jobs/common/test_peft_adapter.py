"""The servable adapter: keras-hub LoRA written in PEFT's format reproduces the Keras LoRA model's logits through
PeftModel on the exported base, and merged into the base's safetensors without Keras (tiny Gemma and Gemma 3,
random LoRA weights on every projection kind)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs.common import peft_adapter, reference
from jobs.convert import hf_merge
from tests.tiny_models import make_tiny_causal_lm

TARGETS = ["query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear"]


def test_each_layout_maps_exactly():
    rng = np.random.default_rng(0)
    heads, d, h, r = 3, 5, 4, 2
    a, b = rng.normal(size=(heads, d, r)), rng.normal(size=(r, h))
    lora_a, lora_b = peft_adapter.peft_factors(a, b, "heads_in", 0.5)
    keras_delta = 0.5 * np.einsum("ndr,rh->ndh", a, b)  # kernel (n, d, h)
    assert lora_a.shape == (heads * r, d) and lora_b.shape == (heads * h, heads * r)
    np.testing.assert_allclose(lora_b @ lora_a, keras_delta.transpose(0, 2, 1).reshape(heads * h, d), atol=1e-12)
    a, b = rng.normal(size=(heads, h, r)), rng.normal(size=(r, d))
    lora_a, lora_b = peft_adapter.peft_factors(a, b, "heads_out", 2.0)
    np.testing.assert_allclose(lora_b @ lora_a, (2.0 * np.einsum("nhr,rd->nhd", a, b)).transpose(2, 0, 1).reshape(d, heads * h), atol=1e-12)
    a, b = rng.normal(size=(d, r)), rng.normal(size=(r, 7))
    lora_a, lora_b = peft_adapter.peft_factors(a, b, "dense", 1.0)
    np.testing.assert_allclose(lora_b @ lora_a, (a @ b).T, atol=1e-12)


@pytest.mark.parametrize("kind", ["gemma3", "gemma"])
def test_peft_on_the_exported_base_reproduces_the_keras_lora_model(kind, tmp_path):
    model = make_tiny_causal_lm(kind, seed=1)
    model.backbone.enable_lora(4, target_layer_names=TARGETS)
    rng = np.random.default_rng(2)
    for _, _, layer in peft_adapter.lora_layers(model.backbone):  # B starts at zero; make every delta count
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            variable.assign(rng.normal(scale=0.2, size=variable.shape).astype("float32"))
    assert len(peft_adapter.lora_layers(model.backbone)) == 2 * len(TARGETS)
    samples = reference.compute(model, ["What does os.path.join do?", "Sort the list in place."])
    # Exporting a LoRA-enabled model writes the base kernels (the delta is not folded in): the base PEFT loads.
    model.export_to_transformers(str(tmp_path / "base"))
    config = peft_adapter.write(model.backbone, tmp_path / "adapter", "base")
    assert config["r"] == 4 * 2 and config["lora_alpha"] == config["r"]  # query and key: rank x heads
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    result = hf_merge.verify_adapter(samples, tmp_path / "base", tmp_path / "adapter", 1e-4)
    assert result["passed"], result
    base_result = reference.compare(samples, hf_merge._logits_of(_hf(tmp_path / "base")), 1e-4)
    assert base_result["logits_max_abs_diff"] > 100 * result["logits_max_abs_diff"]  # the adapter does the work
    # Convert's merge without Keras: the adapter folded into the base's safetensors, tensor by tensor, in shards.
    files = hf_merge.merge(tmp_path / "base", hf_merge.adapter_deltas(tmp_path / "adapter"), tmp_path / "merged",
                           "float32", max_shard_bytes=60_000)
    assert len(files) > 1 and (tmp_path / "merged" / "model.safetensors.index.json").exists()
    (tmp_path / "merged" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    merged = reference.compare(samples, hf_merge._logits_of(_hf(tmp_path / "merged")), 1e-4)
    assert merged["passed"], merged

    from safetensors.numpy import load_file

    keys = set(load_file(str(tmp_path / "adapter" / peft_adapter.ADAPTER_WEIGHTS)))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert json.loads((tmp_path / "adapter" / peft_adapter.ADAPTER_CONFIG).read_text())["peft_type"] == "LORA"


def _hf(directory):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def test_a_model_without_lora_is_refused():
    with pytest.raises(ValueError, match="no LoRA-enabled layers"):
        peft_adapter.adapter_tensors(make_tiny_causal_lm("gemma3").backbone)
