"""Fine-tune test helpers: a small config over a tiny model, and an adapter file's arrays."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from jobs.contract.configs.finetune import FinetuneConfig


def _config(data: Path | str, out: Path | str, model: Path, **kwargs) -> FinetuneConfig:
    defaults = dict(max_steps=6, batch_size=4, sequence_length=48, learning_rate=5e-3, lora_rank=4, checkpoint_every=0, warmup_fraction=0.0)
    return FinetuneConfig(data=str(data), output=str(out), base_model=str(model), **{**defaults, **kwargs})


def _adapter_arrays(path: Path) -> dict[str, np.ndarray]:
    arrays = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays
