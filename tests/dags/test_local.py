"""The local backend: the Job's container spec becomes a local process; the emulator keeps objects on disk."""

from __future__ import annotations

import sys
import textwrap
import threading
import time

import pytest
from gemma_pipeline import local
from gemma_pipeline.plan import jobspec, profiles


def _container(stage: str = "preprocess", env: dict[str, str] | None = None) -> dict:
    settings = jobspec.JobSettings(namespace="ns", queue="q", service_account="sa", image="img:1", profile=profiles.get("cpu"))
    job = jobspec.job_manifest(stage, settings, ["--output", "gs://b/runs/r/preprocess"], name="j", env=env)
    return local.container_of(job)


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv(local.BACKEND_ENV, "local")
    assert local.backend() == "local"
    monkeypatch.setenv(local.BACKEND_ENV, "gke")
    assert local.backend() == "gke"
    monkeypatch.setenv(local.BACKEND_ENV, "laptop")
    with pytest.raises(ValueError, match=r"GEMMA_PIPELINE_BACKEND: got 'laptop'; expected one of gke, local"):
        local.backend()


def test_process_spec_is_the_jobs_container_with_scratch_mapped(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_PIPELINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AIRFLOW__CORE__SECRET", "not for stages")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
    command, env = local.process_spec(_container(env={"EXTRA": "/tmpfoo"}), tmp_path / "scratch")
    assert command[:3] == [sys.executable, "-m", "jobs.preprocessing"]
    assert command[3:] == ["--output", "gs://b/runs/r/preprocess"]
    assert env["HOME"] == str(tmp_path / "scratch") and env["STAGE_WORKDIR"] == str(tmp_path / "scratch")
    assert env["KERAS_HOME"] == str(tmp_path / "scratch" / ".keras")
    assert env["EXTRA"] == "/tmpfoo"  # only the mount itself is remapped, not a look-alike prefix
    assert env["GEMMA_PIPELINE_CACHE"] == str(tmp_path / "cache")  # the model is prepared once, not per stage
    assert env["MPLCONFIGDIR"] == str(tmp_path / "cache" / "matplotlib")  # the font list too
    assert env["PYTHONUNBUFFERED"] == "1" and env["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=true"
    assert "AIRFLOW__CORE__SECRET" not in env


def test_secret_references_take_the_hosts_value_or_stay_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_host")
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    _, env = local.process_spec(_container(), tmp_path)
    assert env["HF_TOKEN"] == "hf_from_host" and "KAGGLE_KEY" not in env


def test_process_spec_refuses_what_it_cannot_reproduce(tmp_path):
    container = _container()
    container["env"].append({"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}})
    with pytest.raises(ValueError, match="env TOKEN: the local backend supports literal values and optional"):
        local.process_spec(container, tmp_path)
    with pytest.raises(ValueError, match="has no command"):
        local.process_spec({"env": []}, tmp_path)


def test_run_process_streams_output_and_returns_the_exit_code(tmp_path):
    lines: list[str] = []
    code = local.run_process([sys.executable, "-c", "import sys; print('one'); print('two', file=sys.stderr); sys.exit(3)"],
                             {"PYTHONUNBUFFERED": "1"}, tmp_path, lines.append)
    assert code == 3 and lines == ["one", "two"]


def test_killing_the_task_sends_sigterm_and_waits_for_the_checkpoint(tmp_path):
    script = textwrap.dedent("""
        import signal, sys, time
        def stop(*_):
            time.sleep(0.5)  # a checkpoint being written
            open("checkpointed", "w").write("yes")
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(60)
    """)
    processes = []
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", local.run_process(
        [sys.executable, "-c", script], {}, tmp_path, lambda line: None, started=processes.append)))
    thread.start()
    deadline = time.monotonic() + 30
    while not processes and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # let it install its handler
    local.terminate(processes[0], grace_s=20)
    thread.join(30)
    assert result["code"] == 143 and (tmp_path / "checkpointed").read_text() == "yes"


def test_scratch_is_fresh_per_attempt_and_removed(tmp_path):
    with local.scratch_dir(tmp_path, "job", "try-1") as scratch:
        (scratch / "partial").write_text("x")
    assert not scratch.exists()
    scratch.mkdir(parents=True)
    (scratch / "stale").write_text("x")
    with local.scratch_dir(tmp_path, "job", "try-1") as again:
        assert list(again.iterdir()) == []


def test_emulator_keeps_objects_as_files_across_restarts(tmp_path, monkeypatch):
    monkeypatch.delenv(local.EMULATOR_ENV, raising=False)
    with local.Emulator(tmp_path) as emulator:
        emulator.ensure_bucket("bkt")
        emulator.ensure_bucket("bkt")  # idempotent
        local.storage_client().bucket("bkt").blob("runs/r/x.json").upload_from_string(b'{"a": 1}')
        assert emulator.path_of("gs://bkt/runs/r/x.json").read_bytes() == b'{"a": 1}'
    assert local.EMULATOR_ENV not in __import__("os").environ
    with local.Emulator(tmp_path):
        assert local.storage_client().bucket("bkt").blob("runs/r/x.json").download_as_bytes() == b'{"a": 1}'


def test_an_emulator_already_configured_is_reused(tmp_path, monkeypatch, gcs_server):
    monkeypatch.setenv(local.EMULATOR_ENV, gcs_server.url)
    with local.Emulator(tmp_path) as emulator:
        assert emulator.url == gcs_server.url and emulator._process is None


def test_a_configured_emulator_that_does_not_answer_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv(local.EMULATOR_ENV, "http://127.0.0.1:1")
    with pytest.raises(RuntimeError, match=r"STORAGE_EMULATOR_HOST=http://127.0.0.1:1 does not answer.*unset"):
        local.Emulator(tmp_path).__enter__()


def test_a_failing_host_stops_the_group_at_once(tmp_path):
    """As a JobSet fails its whole group: a host that exits non-zero stops the others (here one that would
    otherwise run for a minute), whichever index it has."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    failing = [sys.executable, "-c", "import sys; print('bad input'); sys.exit(2)"]
    started = time.monotonic()
    lines = []
    code = local.run_group([(sleeper, {}, tmp_path), (failing, {}, tmp_path)], lines.append)
    assert code == 2 and time.monotonic() - started < 30
    assert "[host 1] bad input" in lines
