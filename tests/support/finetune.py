"""Fine-tune test helpers: a small config over a tiny model, an adapter file's arrays, and a fine-tune stopped by
SIGTERM then resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


def sigterm_then_resume(args: list[str], stop_after: int, steps: int) -> dict[str, np.ndarray]:
    """Run `python -m jobs.finetuning ARGS`, SIGTERM it once step `stop_after` is logged, check it exits as
    preempted without a manifest, run it again, check it resumed; returns the finished adapter's arrays."""
    from jobs.contract.artifacts import ADAPTER, MANIFEST
    from jobs.contract.errors import EXIT_PREEMPTED
    from tests.conftest import ROOT, run_module

    out = Path(args[args.index("--output") + 1])
    proc = subprocess.Popen([sys.executable, "-m", "jobs.finetuning", *args], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"progress: step {stop_after}/{steps}" in line:
            proc.send_signal(signal.SIGTERM)
    log = "".join(lines)
    assert proc.wait(timeout=300) == EXIT_PREEMPTED, log[-3000:]
    assert f"preempted at step {stop_after + 1}/{steps}" in log or f"preempted at step {stop_after}/{steps}" in log
    assert not (out / MANIFEST).exists()  # an interrupted stage never looks finished

    resumed = run_module("jobs.finetuning", *args)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "RESUMED from checkpoint at step" in resumed.stdout
    return _adapter_arrays(out / ADAPTER)
