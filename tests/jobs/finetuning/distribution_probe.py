"""Run two LoRA steps of a tiny model (Gemma 3, Gemma 4) under each distribution and print the losses as JSON.

Started by the test in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8, which must be
set before JAX is imported.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")


def two_step_losses(kind: str, model_parallel: int, preset: str, quantization: str = "none") -> list[float]:
    import keras
    import numpy as np

    from jobs import families
    from jobs.contract.configs.finetune import FinetuneConfig
    from jobs.finetuning.distribution import check_model_parallel, setup
    from jobs.finetuning.train import Trainer, make_optimizer

    config = FinetuneConfig(data="-", output="-", distribution=kind, model_parallel=model_parallel, batch_size=8,
                            learning_rate=1e-2, warmup_fraction=0.0)
    keras.utils.set_random_seed(0)
    distribution = setup(kind, model_parallel, config.batch_size, families.of_source(preset))
    model = families.of_source(preset).load(preset)
    check_model_parallel(model.backbone, model_parallel)
    if quantization != "none":  # quantized under the distribution: the layout map must still fit the int8 kernels
        from jobs.finetuning.core import quantize_base

        quantize_base(model, quantization)
    model.backbone.enable_lora(4, target_layer_names=["query", "value"])
    trainer = Trainer(model, make_optimizer(config, 10)[0], distribution, "all" if quantization != "none" else "loss_positions")
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 300, size=(8, 33)).astype(np.int32)
    x = families.of_model(model).backbone_inputs(tokens[:, :-1], np.ones((8, 32), dtype=np.int32))
    batch = (x, tokens[:, 1:], np.ones((8, 32), dtype=np.float32))
    losses = [trainer.train_step(batch) for _ in range(3)]
    shardings = {v.path: str(getattr(v.value.sharding, "spec", "single")) for v in model.backbone.weights
                 if "ffw_gating/" in v.path or "moe_expert_bank" in v.path or "per_layer_token_embedding" in v.path}
    print(json.dumps({"kind": kind, "quantization": quantization, "shardings": shardings}), file=sys.stderr)
    return losses


if __name__ == "__main__":
    import jax

    preset = sys.argv[1]
    runs = {"none": ("none", 1, "none"), "data": ("data", 1, "none"), "model": ("model", 2, "none"),
            "int8_none": ("none", 1, "int8"), "int8_model": ("model", 2, "int8")}
    wanted = sys.argv[2].split(",") if len(sys.argv) > 2 else list(runs)  # a subset: "none,model"
    print(json.dumps({"devices": len(jax.devices()),
                      **{name: two_step_losses(runs[name][0], runs[name][1], preset, runs[name][2]) for name in wanted}}))
