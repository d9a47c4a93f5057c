"""The LoRA adapter in the format PEFT and vLLM load: `adapter_config.json` + `adapter_model.safetensors` with
PEFT's key names for the exported base's `q_proj`, `v_proj`, ... modules.

Hand-written because no library maps keras-hub's LoRA to PEFT's. keras LoRA on an `EinsumDense` kernel of shape
`(*in_axes, out)` is `delta = (alpha / r) * A @ B` with `A: (*in_axes, r)`, `B: (r, out)`. Gemma's attention
kernels are per head, and the mapping is exact, not a rename:

- query / key / value, kernel `(n, d, h)`: `A[n]` is per head and `B` is shared, so the Hugging Face delta
  `(n*h, d)` stacks `B.T @ A[n].T` over heads. That is one LoRA of rank `n*r`: `lora_A` = the heads' `A[n].T`
  stacked `(n*r, d)`, `lora_B` = block-diagonal copies of `B.T` `(n*h, n*r)`.
- attention_output, kernel `(n, h, d)`: `lora_A = A.reshape(n*h, r).T`, `lora_B = B.T` (rank r).
- ffw_gating / ffw_gating_2 / ffw_linear, kernel `(in, out)`: `lora_A = A.T`, `lora_B = B.T` (rank r).

Every module is padded with zeros to one rank (vLLM takes one rank per adapter) and keras' scale is folded into
`lora_B`, so PEFT's `lora_alpha / r` is 1. Padding and folding change nothing numerically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jobs.contract import artifacts

ADAPTER_CONFIG = artifacts.PEFT_ADAPTER_CONFIG
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# keras-hub layer -> (Hugging Face module under model.layers.N, how its kernel is laid out)
MODULES = {
    "query_dense": ("self_attn.q_proj", "heads_in"),
    "key_dense": ("self_attn.k_proj", "heads_in"),
    "value_dense": ("self_attn.v_proj", "heads_in"),
    "output_dense": ("self_attn.o_proj", "heads_out"),
    "gating_ffw": ("mlp.gate_proj", "dense"),
    "gating_ffw_2": ("mlp.up_proj", "dense"),
    "ffw_linear": ("mlp.down_proj", "dense"),
}


def peft_factors(a: np.ndarray, b: np.ndarray, layout: str, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A, lora_B) in PEFT's orientation, `delta_hf = lora_B @ lora_A`, with keras' scale folded in."""
    b = b * scale
    if layout == "heads_in":
        heads, _, rank = a.shape
        lora_a = a.transpose(0, 2, 1).reshape(heads * rank, a.shape[1])
        lora_b = np.kron(np.eye(heads, dtype=b.dtype), b.T)  # heads copies of B.T on the diagonal
        return lora_a, lora_b
    if layout == "heads_out":
        return a.reshape(-1, a.shape[-1]).T, b.T
    return a.T, b.T


def lora_layers(backbone: Any) -> list[tuple[int, str, Any]]:
    """(decoder index, keras-hub attribute, layer) for every LoRA-enabled projection of the backbone."""
    found = []
    for index, block in enumerate(backbone.transformer_layers):
        for attribute in MODULES:
            owner = block.attention if attribute.endswith("dense") and hasattr(block, "attention") else block
            layer = getattr(owner, attribute, None)
            if layer is not None and getattr(layer, "lora_enabled", False):
                found.append((index, attribute, layer))
    return found


def adapter_tensors(backbone: Any) -> tuple[dict[str, np.ndarray], int, list[str]]:
    """PEFT's tensors (one rank for all modules), that rank, and the target module names."""
    factors = {}
    for index, attribute, layer in lora_layers(backbone):
        module, layout = MODULES[attribute]
        a = np.asarray(layer.lora_kernel_a.numpy(), dtype=np.float32)
        b = np.asarray(layer.lora_kernel_b.numpy(), dtype=np.float32)
        factors[f"base_model.model.model.layers.{index}.{module}"] = peft_factors(a, b, layout, layer.lora_alpha / layer.lora_rank)
    if not factors:
        raise ValueError("the model has no LoRA-enabled layers")
    rank = max(lora_a.shape[0] for lora_a, _ in factors.values())
    tensors = {}
    for name, (lora_a, lora_b) in factors.items():
        pad = rank - lora_a.shape[0]
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.pad(lora_a, ((0, pad), (0, 0))))
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.pad(lora_b, ((0, 0), (0, pad))))
    targets = sorted({name.rsplit(".", 1)[-1] for name in factors})
    return tensors, rank, targets


def write(backbone: Any, directory: Path, base_model: str) -> dict[str, Any]:
    """Write the adapter directory; returns its config."""
    from safetensors.numpy import save_file

    tensors, rank, targets = adapter_tensors(backbone)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "target_modules": targets, "modules_to_save": None,
        "inference_mode": True,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return config
