"""The fine-tune as several processes on JAX's multi-process runtime (what a JobSet runs, one process per host),
for real on localhost: 2 processes x 1 CPU device end with the LoRA weights of 1 process x 2 devices (within
1e-6), the same on both processes, and so do 2 processes x 2 devices with the model sharded within each; a SIGTERM to one process stops both at one checkpointed step, and the resume
(on 2 processes, or on 1 process with the same global batch) ends with the same weights."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.contract.artifacts import ADAPTER, MANIFEST
from jobs.contract.artifacts import MERGED_MODEL as MERGED
from jobs.contract.errors import EXIT_PREEMPTED
from jobs.finetuning import checkpoint
from tests.conftest import ROOT
from tests.pipeline import tiny_pipeline
from tests.support import nonempty
from tests.support.finetune import _adapter_arrays

STEPS = 8
FLAGS = ["--max-steps", str(STEPS), "--batch-size", "4", "--sequence-length", "48", "--learning-rate", "0.005",
         "--checkpoint-every", "100", "--warmup-fraction", "0.1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(root: Path, name: str, devices: int, cluster: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "NO_PROXY", "no_proxy", "JAX_NUM_CPU_DEVICES") and not k.startswith("GEMMA_PIPELINE_")}
    workdir = root / "work" / name
    workdir.mkdir(parents=True, exist_ok=True)
    return {**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "STAGE_WORKDIR": str(workdir),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **cluster}


def _start(setup: dict, out: Path, processes: int, devices_each: int, flags: tuple[str, ...] = ("--distribution", "data")
           ) -> list[subprocess.Popen]:
    args = ["--data", str(setup["data"]), "--base-model", str(setup["model"]), *FLAGS, *flags, "--output", str(out)]
    port = _free_port()
    started = []
    for i in range(processes):
        cluster = {"GEMMA_PIPELINE_NUM_PROCESSES": str(processes), "GEMMA_PIPELINE_PROCESS_ID": str(i),
                   "GEMMA_PIPELINE_COORDINATOR": f"127.0.0.1:{port}"} if processes > 1 else {}
        started.append(subprocess.Popen([sys.executable, "-m", "jobs.finetuning", *args], cwd=ROOT, text=True,
                                        env=_env(setup["root"], f"{out.name}-{i}", devices_each, cluster),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
    return started


def _finish(processes: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    results = []
    for proc in processes:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"a fine-tune process did not finish in {timeout:.0f} s")
        results.append((proc.returncode, out))
    return results


def _digests(results: list[tuple[int, str]]) -> list[str]:
    return [line.split("sha256 ")[1].split()[0] for _, out in results for line in out.splitlines()
            if "final LoRA weights: sha256" in line]


def _assert_same_weights(out: Path, reference: dict[str, np.ndarray]) -> None:
    actual = _adapter_arrays(out / ADAPTER)
    assert actual.keys() == reference.keys() and actual
    for key, expected in nonempty(reference, "reference arrays").items():
        np.testing.assert_allclose(actual[key], expected, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_gemma3):
    root = tmp_path_factory.mktemp("multihost")
    data = tiny_pipeline(root, tiny_gemma3, steps=1)["preprocess"]
    setup = {"data": data, "model": tiny_gemma3, "root": root}
    [(code, log)] = _finish(_start(setup, root / "one-process", processes=1, devices_each=2))
    assert code == 0, log[-3000:]
    assert "distribution DataParallel over 2 cpu devices" in log
    return {**setup, "reference": _adapter_arrays(root / "one-process" / ADAPTER)}


@pytest.mark.slow  # the model-parallel test below also trains across two processes against this reference
def test_two_processes_train_the_weights_of_one_process_with_two_devices(setup):
    out = setup["root"] / "two-processes"
    results = _finish(_start(setup, out, processes=2, devices_each=1))
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert "process 1 of 2 joined" in results[1][1] and "DataParallel over 2 cpu devices" in results[0][1]
    digests = _digests(results)
    assert len(digests) == 2 and digests[0] == digests[1]  # every process holds the same final weights
    _assert_same_weights(out, setup["reference"])
    assert (out / MANIFEST).exists()
    wrote = f"wrote {out / MANIFEST}"
    assert wrote in results[0][1] and wrote not in results[1][1]  # written once, by process 0 alone


@pytest.mark.slow  # ~75 s; one process's preemption: test_preemption.py; two processes: the default suite's DAG run (cpu-x2)
def test_sigterm_on_one_process_stops_both_at_one_checkpoint_and_the_resume_ends_alike(setup):
    out = setup["root"] / "preempted"
    processes = _start(setup, out, processes=2, devices_each=1)
    lines = []
    for line in processes[0].stdout:  # process 0 logs progress; the signal goes to process 1 only
        lines.append(line)
        if f"progress: step 3/{STEPS}" in line:
            processes[1].send_signal(signal.SIGTERM)
    rest = _finish(processes)
    log0, log1 = "".join(lines) + rest[0][1], rest[1][1]
    assert [code for code, _ in rest] == [EXIT_PREEMPTED, EXIT_PREEMPTED], log0[-3000:] + log1[-3000:]
    stopped = [s for s in range(1, STEPS + 1) if f"preempted at step {s}/{STEPS}" in log0]
    assert len(stopped) == 1 and f"preempted at step {stopped[0]}/{STEPS}" in log1  # the same step on both
    assert checkpoint._complete_steps(str(out)) == stopped  # one checkpoint, at that step
    assert "checkpoint saved at step" in log0 and "checkpoint saved at step" not in log1  # written by process 0
    assert not (out / MANIFEST).exists()

    across = setup["root"] / "preempted-resumed-on-one-process"
    shutil.copytree(out, across)
    resumed = _finish(_start(setup, out, processes=2, devices_each=1))
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-3000:]
    assert all(f"RESUMED from checkpoint at step {stopped[0]}/{STEPS}" in log for _, log in resumed)
    _assert_same_weights(out, setup["reference"])

    [(code, log)] = _finish(_start(setup, across, processes=1, devices_each=2))
    assert code == 0 and "saved by 2 process(es), resumed by 1" in log, log[-3000:]
    _assert_same_weights(across, setup["reference"])


@pytest.mark.slow  # ~50 s; two-process training runs in the default suite's DAG run (a cpu-x2 candidate), model
# parallel in tests/jobs/finetuning/test_finetuning.py::test_data_and_model_parallel_match_one_device
def test_model_parallel_within_each_host_and_data_parallel_across_hosts(setup):
    """Two hosts x 2 devices, the model sharded over each host's devices: sharded variables are gathered for
    process 0's save, and the weights are those of the data-parallel reference."""
    out = setup["root"] / "model-parallel"
    results = _finish(_start(setup, out, processes=2, devices_each=2, flags=["--distribution", "model",
                                                                              "--model-parallel", "2"]))
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert "ModelParallel over 4 cpu devices" in results[0][1]
    digests = _digests(results)
    assert len(digests) == 2 and digests[0] == digests[1]
    _assert_same_weights(out, setup["reference"])
    merged, reference = _h5_arrays(out / MERGED / "model.weights.h5"), _h5_arrays(setup["root"] / "one-process" / MERGED / "model.weights.h5")
    assert merged.keys() == reference.keys() and merged
    for key, expected in nonempty(reference, "reference arrays").items():  # the merged model was saved whole, from every host's shards
        np.testing.assert_allclose(merged[key], expected, atol=1e-6, rtol=0)


def _h5_arrays(path: Path) -> dict[str, np.ndarray]:
    import h5py

    arrays: dict[str, np.ndarray] = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays
