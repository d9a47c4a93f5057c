"""The sweep `local_run` runs beside `airflow dags test`: Airflow's own awaiting-input sweep, called until the run
ends, through errors. What it does to a real parked request is shown end to end by the slow
`test_nobody_answering_before_the_timeout_rejects_the_run` in tests/reliability/test_local_dag.py."""

from __future__ import annotations

import pytest
from gemma_pipeline.tools import approval_timeouts


def test_the_sweep_is_the_schedulers_survives_an_error_and_ends_with_its_parent(monkeypatch, capsys):
    from airflow.jobs import scheduler_job_runner

    calls: list[str] = []
    parents = iter([10, 10, 10, 10, 1])  # at start, before each of three sweeps, then local_run is gone

    class Runner:
        def __init__(self, job):
            calls.append("init")

        def check_awaiting_input_timeouts(self):
            calls.append("sweep")
            if len(calls) == 2:
                raise RuntimeError("database is locked")

    monkeypatch.setattr(scheduler_job_runner, "SchedulerJobRunner", Runner)
    monkeypatch.setattr(approval_timeouts.os, "getppid", lambda: next(parents))
    monkeypatch.setattr(approval_timeouts.time, "sleep", lambda s: None)
    approval_timeouts.sweep_forever(0.01)
    assert calls == ["init", "sweep", "sweep", "sweep"]
    assert "database is locked" in capsys.readouterr().err


def test_the_interval_must_be_positive():
    with pytest.raises(SystemExit) as exit_:
        approval_timeouts.main(["--every", "0"])
    assert exit_.value.code == 2
