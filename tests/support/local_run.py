"""The main command as a user runs it (`python -m gemma_pipeline.tools.local_run`), from a test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT

BUCKET = "local-gemma-bucket"


def _local_run(root, conf: dict, timeout: float = 420, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The main command as a user runs it: a clean environment (nothing from this test process's emulator or
    Airflow home), its own process group so a hang is killed whole and reported with its output."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "STORAGE_EMULATOR", "GEMMA_PIPELINE_"))},
           **(env or {})}
    command = [sys.executable, "-m", "gemma_pipeline.tools.local_run", "--root", str(root), "-c", json.dumps(conf)]
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            pytest.fail(f"the local run did not finish in {timeout:.0f} s:\n{out[-6000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)
