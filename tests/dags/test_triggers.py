"""Live progress: the deferred trigger logs the stage's `_progress.json` while the Job runs; the JobSet trigger
waits for a JobSet's terminal state."""

from __future__ import annotations

import asyncio

from gemma_pipeline.operators import triggers


def _trigger(**extra):
    return triggers.ProgressGKEJobTrigger(
        cluster_url="https://1.2.3.4", ssl_ca_cert="cert", job_name="job", job_namespace="team-a", pod_names=["pod"],
        pod_namespace="team-a", base_container_name="stage", progress_uri="gs://b/runs/r/finetune/_progress.json",
        progress_interval=0.01, **extra)


def test_serializes_with_its_own_classpath_and_progress_uri():
    classpath, kwargs = _trigger().serialize()
    assert classpath == "gemma_pipeline.operators.triggers.ProgressGKEJobTrigger"
    assert kwargs["progress_uri"] == "gs://b/runs/r/finetune/_progress.json" and kwargs["job_name"] == "job"
    rebuilt = triggers.ProgressGKEJobTrigger(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)


def test_logs_each_new_progress_line(monkeypatch, capsys):
    records = iter([None, {"stage": "finetune", "line": "step 1/20 loss=5.9 eta=0:05:00"},
                    {"stage": "finetune", "line": "step 1/20 loss=5.9 eta=0:05:00"},
                    {"stage": "finetune", "line": "step 2/20 loss=5.1 eta=0:04:40"}])
    monkeypatch.setattr(triggers, "read_progress", lambda uri, conn: next(records, None))

    async def run_briefly():
        trigger = _trigger()
        task = asyncio.create_task(triggers.report_progress(trigger.progress_uri, trigger.progress_interval, trigger.log))
        await asyncio.sleep(0.2)
        task.cancel()

    asyncio.run(run_briefly())
    out = capsys.readouterr().out  # Airflow's structlog writes task and trigger logs to stdout
    assert out.count("finetune progress: step 1/20 loss=5.9 eta=0:05:00") == 1
    assert out.count("finetune progress: step 2/20 loss=5.1 eta=0:04:40") == 1


def _jobset_trigger():
    return triggers.JobSetTrigger(name="ft", namespace="team-a", cluster_url="https://1.2.3.4", ssl_ca_cert="cert",
                                  poll_interval=0.01)


def test_jobset_trigger_round_trips_and_reads_terminal_states():
    classpath, kwargs = _jobset_trigger().serialize()
    assert classpath == "gemma_pipeline.operators.triggers.JobSetTrigger"
    assert triggers.JobSetTrigger(**kwargs).serialize() == (classpath, kwargs)
    assert triggers.jobset_state({"status": {"terminalState": "Completed"}}) == "Completed"
    assert triggers.jobset_state({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}) == "Failed"
    assert triggers.jobset_state({"status": {"restarts": 1, "conditions": [{"type": "Suspended", "status": "False"}]}}) is None


def test_jobset_trigger_waits_for_the_terminal_state(monkeypatch):
    states = iter([{"status": {}}, {"status": {"restarts": 1}}, {"status": {"terminalState": "Failed"}}])
    trigger = _jobset_trigger()

    async def read():
        return next(states)

    monkeypatch.setattr(trigger, "read", read)

    async def first_event():
        return await trigger.run().__anext__()

    event = asyncio.run(first_event())
    assert event.payload["status"] == "error" and event.payload["jobset"]["status"]["terminalState"] == "Failed"
