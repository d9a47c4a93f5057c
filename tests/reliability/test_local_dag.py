"""The main job's path end to end, short (CI's guard that the main command cannot silently break): the real DAG
through `airflow dags test` on the local backend, every stage as a real subprocess against the Cloud Storage
emulator, on a tiny model and two fine-tune steps. Then idempotency: the same run again skips every stage; one
changed param reruns from the first stage it affects and only from there; bad input fails once, unretried."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT

BUCKET = "local-gemma-bucket"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("local-run")


def _local_run(root, conf: dict, timeout: float = 420) -> subprocess.CompletedProcess:
    """The main command as a user runs it: a clean environment (nothing from this test process's emulator or
    Airflow home), its own process group so a hang is killed whole and reported with its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "STORAGE_EMULATOR", "GEMMA_PIPELINE_"))}
    command = [sys.executable, "-m", "gemma_pipeline.local_run", "--root", str(root), "-c", json.dumps(conf)]
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            pytest.fail(f"the local run did not finish in {timeout:.0f} s:\n{out[-6000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _conf(tiny_gemma3, **overrides) -> dict:
    return {"base_model": str(tiny_gemma3), "max_steps": 2, "batch_size": 2, "max_tokens": 64, "sequence_length": 64,
            "run_name": "ci", **overrides}


@pytest.fixture(scope="module")
def first_run(root, tiny_gemma3):
    return _local_run(root, _conf(tiny_gemma3))


def test_the_dag_runs_every_stage_and_writes_the_report(first_run, root):
    assert first_run.returncode == 0, first_run.stdout[-4000:] + first_run.stderr[-4000:]
    prefix = root / "gcs" / BUCKET / "runs" / "ci"
    report = json.loads((prefix / "report.json").read_text())
    assert report["complete"] is True
    assert [s["stage"] for s in report["stages"]] == ["preprocess", "finetune", "benchmark", "convert"]
    assert all(s["backend"] == "local" and s["seconds"] > 0 and s["peak_rss_bytes"] > 0 for s in report["stages"])
    assert report["summary"]["steps"] == 2 and report["summary"]["parity"]["passed"] is True
    assert report["summary"]["base_perplexity"] > 1 and report["summary"]["tuned_perplexity"] > 1
    assert report["params"]["max_steps"] == 2 and report["params"]["run_name"] == "ci"
    for stage in ("preprocess", "finetune", "benchmark", "convert"):
        assert (prefix / stage / "_manifest.json").exists()
    assert (prefix / "convert" / "model.safetensors").exists() and (prefix / "finetune" / "adapter.lora.h5").exists()
    assert "data:image/png;base64," in (prefix / "report.html").read_text()
    # The task log carries the stage's own output, streamed from the subprocess.
    assert "stage finetune finished" in first_run.stdout and "jobs.finetuning" in first_run.stdout
    # What the command prints at the end: artifact paths and the summary table.
    assert str(prefix / "convert" / "parity.json") in first_run.stdout
    assert "| perplexity after |" in first_run.stdout and "| finetune | done | tpu-v5e-1 |" in first_run.stdout


def test_the_same_run_name_again_skips_every_finished_stage(first_run, root, tiny_gemma3):
    assert first_run.returncode == 0
    again = _local_run(root, _conf(tiny_gemma3))
    assert again.returncode == 0, again.stdout[-4000:]
    assert again.stdout.count("SKIPPED: gs://local-gemma-bucket/runs/ci/") == 4


def test_a_changed_param_reruns_only_from_the_first_stage_it_affects(first_run, root, tiny_gemma3):
    assert first_run.returncode == 0
    changed = _local_run(root, _conf(tiny_gemma3, export_dtype="bfloat16"))
    assert changed.returncode == 0, changed.stdout[-4000:]
    for stage in ("preprocess", "finetune", "benchmark"):
        assert f"SKIPPED: gs://local-gemma-bucket/runs/ci/{stage} " in changed.stdout
    assert "SKIPPED: gs://local-gemma-bucket/runs/ci/convert " not in changed.stdout
    manifest = json.loads((root / "gcs" / BUCKET / "runs" / "ci" / "convert" / "_manifest.json").read_text())
    assert manifest["config"]["dtype"] == "bfloat16"


def test_bad_input_fails_at_once_without_retry_and_still_reports(first_run, root, tiny_gemma3):
    bad = _local_run(root, _conf(tiny_gemma3, run_name="ci-bad", response_field="no_such_column"))
    assert bad.returncode == 1
    assert "--response-field" in bad.stdout and "no_such_column" in bad.stdout
    assert "stage preprocess exited with code 2" in bad.stdout and "non-retriable" in bad.stdout
    assert bad.stdout.count("[DAG TEST] starting task_id=preprocess") == 1  # no retry of a bad-input failure
    report = json.loads((root / "gcs" / BUCKET / "runs" / "ci-bad" / "report.json").read_text())
    assert report["complete"] is False and [s["done"] for s in report["stages"]] == [False] * 4
