"""The main command as a user runs it (`python -m gemma_pipeline.tools.local_run`), from a test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import ROOT

BUCKET = "local-gemma-bucket"


def start_local_run(root, conf: dict, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> subprocess.Popen:
    """The main command as a user runs it: a clean environment (nothing from this test process's emulator or
    Airflow home), its own process group so a hang is killed whole and reported with its output. Output goes to
    files, so a run that waits for a person does not block on a full pipe."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "STORAGE_EMULATOR", "GEMMA_PIPELINE_"))},
           **(env or {})}
    command = [sys.executable, "-m", "gemma_pipeline.tools.local_run", "--root", str(root), "-c", json.dumps(conf), *args]
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
    process.outputs = (out, err)  # type: ignore[attr-defined]
    return process


def finish_local_run(process: subprocess.Popen, timeout: float = 420) -> subprocess.CompletedProcess:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    out, err = process.outputs  # type: ignore[attr-defined]
    texts = []
    for stream in (out, err):
        stream.seek(0)
        texts.append(stream.read())
        stream.close()
    if process.returncode == -signal.SIGKILL:
        pytest.fail(f"the local run did not finish in {timeout:.0f} s:\n{texts[0][-6000:]}\n{texts[1][-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, *texts)


def abandon(process: subprocess.Popen) -> None:
    """Stop a run the test gave up on (one waiting for an answer would wait forever), its UI and stages with it."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for stream in process.outputs:  # type: ignore[attr-defined]
        stream.close()


def _local_run(root, conf: dict, timeout: float = 420, env: dict[str, str] | None = None,
               args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return finish_local_run(start_local_run(root, conf, env, args), timeout)
