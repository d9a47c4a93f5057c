"""Checkpoints: trainable weights, optimizer state, step and data position, under `checkpoints/step-N/`.

A checkpoint counts only once its `_COMPLETE` marker exists; the marker is written after everything else.
Keras' `model.save` would store the frozen base weights too; LoRA runs only need the small trainable set.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from jobs.common import storage
from jobs.contract import artifacts
from jobs.contract.errors import BadInputError

log = logging.getLogger(__name__)

CHECKPOINTS = artifacts.CHECKPOINTS
COMPLETE = "_COMPLETE"
_NAME = re.compile(r"^step-(\d{8})$")


def save(local_root: Path, output: str, step: int, trainable: list, optimizer_vars: list, meta: dict[str, Any], keep: int) -> None:
    """Takes host arrays (`multihost.to_host`), so the caller gathers sharded state on every process first."""
    name = f"step-{step:08d}"
    local = local_root / CHECKPOINTS / name
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    arrays = {f"t{i}": np.asarray(v) for i, v in enumerate(trainable)}
    arrays |= {f"o{i}": np.asarray(v) for i, v in enumerate(optimizer_vars)}
    np.savez(local / "state.npz", **arrays)
    (local / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    uri = storage.join(output, CHECKPOINTS, name)
    if storage.is_gcs(output):
        storage.publish_dir(local, uri)
    storage.write_bytes(storage.join(uri, COMPLETE), b"")
    (local / COMPLETE).touch()
    _prune(local_root, output, keep)
    log.info("checkpoint saved at step %d -> %s", step, uri)


def _complete_steps(output: str) -> list[int]:
    steps = set()
    for rel in storage.list_files(storage.join(output, CHECKPOINTS)):
        parts = rel.split("/")
        if len(parts) == 2 and parts[1] == COMPLETE and (m := _NAME.match(parts[0])):
            steps.add(int(m.group(1)))
    return sorted(steps)


def _prune(local_root: Path, output: str, keep: int) -> None:
    for step in _complete_steps(output)[:-keep]:
        name = f"step-{step:08d}"
        uri = storage.join(output, CHECKPOINTS, name)
        storage.delete(storage.join(uri, COMPLETE))  # first, so a half-deleted checkpoint is never "complete"
        for rel in storage.list_files(uri):
            storage.delete(storage.join(uri, rel))
        shutil.rmtree(local_root / CHECKPOINTS / name, ignore_errors=True)


def latest(output: str, workdir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The newest complete checkpoint under `output`, staged locally: (meta, arrays)."""
    steps = _complete_steps(output)
    if not steps:
        return None
    uri = storage.join(output, CHECKPOINTS, f"step-{steps[-1]:08d}")
    local = storage.stage_in(uri, workdir / "resume")
    try:
        meta = json.loads((local / "meta.json").read_text())
        with np.load(local / "state.npz") as data:
            arrays = {k: data[k] for k in data.files}
        if not isinstance(meta.get("step"), int):
            raise ValueError("meta.json has no integer step")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        # Marked complete yet unreadable: a retry would hit it again, so this is not worth retrying.
        raise BadInputError("--output", uri, "a readable checkpoint (or rerun with --no-resume, or delete that "
                            "checkpoint folder)", f"{type(err).__name__}: {err}") from err
    return meta, arrays


def remove_all(output: str) -> None:
    for step in _complete_steps(output):
        storage.delete(storage.join(output, CHECKPOINTS, f"step-{step:08d}", COMPLETE))
