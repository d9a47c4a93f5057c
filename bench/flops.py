"""How close the fine-tune's step comes to the machine: FLOPs per step, counted two ways, against a matmul peak
measured in the same process.

- Model FLOPs (by hand, the usual MFU convention: matmuls only, no recomputation): per decoder layer and computed
  token, the projections (q, k, v, o, gate, up, down) forward, and backward for the activations only (the base is
  frozen: no weight gradients), so 2x forward; attention's two matmuls over the padded width forward and four
  backward; LoRA's factors forward, and backward for activations and both factors; the tied head at the scored
  positions only, forward and backward for the hidden states (4 x positions x hidden x vocabulary).
- XLA's count: `cost_analysis()` of the compiled train step, which also counts elementwise work and recomputation.

The peak is the best of several float32 matmuls of a size that saturates the cores, through the same JAX.
"""

from __future__ import annotations

import time
from typing import Any


def model_flops(backbone: Any, batch: int, width: int, head_positions: int, lora_rank: int, lora_layers: tuple[str, ...]) -> float:
    d, heads, kv, hd = backbone.hidden_dim, backbone.num_query_heads, backbone.num_key_value_heads, backbone.head_dim
    ff, layers, vocab = backbone.intermediate_dim, backbone.num_layers, backbone.vocabulary_size
    tokens = batch * width
    outputs = {"query": heads * hd, "key": kv * hd, "value": kv * hd, "attention_output": d,
               "ffw_gating": ff, "ffw_gating_2": ff, "ffw_linear": d}
    inputs = {"query": d, "key": d, "value": d, "attention_output": heads * hd, "ffw_gating": d, "ffw_gating_2": d,
              "ffw_linear": ff}
    projections = sum(2 * inputs[n] * outputs[n] for n in outputs)  # forward, per token
    attention = 2 * 2 * width * heads * hd  # QK^T and AV, per token, over the padded width
    lora = sum(2 * lora_rank * (inputs[n] + outputs[n]) for n in lora_layers if n in outputs)
    per_layer = tokens * (2 * projections + 3 * attention + 3 * lora)
    return float(layers * per_layer + 4 * head_positions * d * vocab)


def xla_flops(compiled: Any) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def matmul_peak(size: int = 2048, repeats: int = 8) -> float:
    """FLOP/s of the best of `repeats` float32 matmuls (compiled once, timed after)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best
