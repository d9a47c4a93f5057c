"""Preemption: SIGTERM at three points of a fine-tune, then a restart, ends with the weights of an uninterrupted
run (within 1e-6); a stage that dies while uploading never leaves a prefix that looks complete."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jobs.contract.artifacts import ADAPTER, MANIFEST
from jobs.contract.configs.finetune import FinetuneConfig
from jobs.finetuning.core import run
from tests.conftest import run_module
from tests.support import nonempty
from tests.support.finetune import _adapter_arrays, sigterm_then_resume

STEPS = 12
FLAGS = ["--max-steps", str(STEPS), "--batch-size", "4", "--sequence-length", "48", "--learning-rate", "0.005",
         "--checkpoint-every", "100", "--warmup-fraction", "0.1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_gemma3, tiny_run):
    root = tmp_path_factory.mktemp("preemption")
    data = tiny_run["preprocess"]
    reference = root / "reference"
    run(FinetuneConfig(data=str(data), output=str(reference), base_model=str(tiny_gemma3), max_steps=STEPS, batch_size=4,
                       sequence_length=48, learning_rate=0.005, checkpoint_every=100, warmup_fraction=0.1), root / "w")
    return {"data": data, "model": tiny_gemma3, "reference": _adapter_arrays(reference / ADAPTER), "root": root}


# The middle point runs by default; the edges (long runs) with -m slow.
@pytest.mark.parametrize("stop_after", [pytest.param(1, marks=pytest.mark.slow), STEPS // 2,
                                        pytest.param(STEPS - 1, marks=pytest.mark.slow)],
                         ids=["early", "middle", "just-before-the-end"])
def test_sigterm_then_restart_ends_where_an_uninterrupted_run_ends(setup, stop_after):
    out = setup["root"] / f"stopped-after-{stop_after}"
    args = ["--data", str(setup["data"]), "--base-model", str(setup["model"]), *FLAGS, "--output", str(out)]
    actual = sigterm_then_resume(args, stop_after, STEPS)
    assert actual.keys() == setup["reference"].keys() and actual
    for key, expected in nonempty(setup["reference"], "reference adapter arrays").items():
        np.testing.assert_allclose(actual[key], expected, atol=1e-6, rtol=0)


def test_a_stage_killed_mid_upload_leaves_no_manifest_and_readers_refuse_it(setup, gcs, monkeypatch, tmp_path):
    from jobs.common import storage
    from jobs.contract.configs.preprocess import PreprocessConfig
    from jobs.preprocessing.core import run as preprocess

    uploaded = []
    real_write = storage.write_bytes

    def dying_publish(local_dir, uri, skip=()):
        names = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
        first = names[0]
        real_write(storage.join(uri, first), (local_dir / first).read_bytes())
        uploaded.append(first)
        raise KeyboardInterrupt("killed during upload")  # what SIGKILL looks like from the prefix's point of view

    monkeypatch.setattr(storage, "publish_dir", dying_publish)
    source = tmp_path / "d.jsonl"
    source.write_text("".join(f'{{"instruction": "q{i}?", "response": "a{i}."}}\n' for i in range(10)))
    prefix = f"{gcs}/runs/r/preprocess"
    with pytest.raises(KeyboardInterrupt):
        preprocess(PreprocessConfig(input=str(source), output=prefix, base_model=str(setup["model"])), tmp_path / "w")
    emulator = os.environ["STORAGE_EMULATOR_HOST"]  # the gcs fixture's; undo() below takes it away
    monkeypatch.undo()
    listed = storage.list_files(prefix)
    assert uploaded and uploaded[0] in listed and MANIFEST not in listed  # partial, and visibly so

    reader = run_module("jobs.finetuning", "--data", prefix, "--base-model", str(setup["model"]), "--output",
                        str(tmp_path / "ft"), env={"STORAGE_EMULATOR_HOST": emulator})
    message = reader.stdout + reader.stderr
    assert reader.returncode == 2, message[-2000:]
    assert "--data" in message and MANIFEST in message and prefix in message
