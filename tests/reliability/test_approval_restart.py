"""Waiting for approval survives a scheduler restart, the way Composer runs the DAG: a real `airflow scheduler`
(LocalExecutor) and `airflow api-server` over one metadata database, the run triggered through the REST API, every
stage a real local process. While the `approve` task waits, the scheduler is killed (SIGKILL: nothing gets to
clean up); the answer arrives through the REST API while no scheduler runs, from the one assigned approver (another
user is refused); a new scheduler resumes the task and the run converts the candidate the answer chose."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gemma_pipeline import local
from gemma_pipeline.plan import approval

from tests.support import airflow_ui
from tests.support.local_run import BUCKET

pytestmark = pytest.mark.slow  # about 3 minutes: a whole DAG under a real scheduler, twice started


def _scheduler(env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "airflow", "scheduler"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _state(url: str, token: str, run_id: str, task_id: str | None = None) -> str:
    path = f"{url}/api/v2/dags/{airflow_ui.DAG_ID}/dagRuns/{run_id}" + (f"/taskInstances/{task_id}" if task_id else "")
    return airflow_ui.request(path, token=token)[1]["state"]


def test_a_scheduler_killed_while_waiting_loses_nothing(tmp_path, tiny_gemma3):
    home = tmp_path / "airflow"
    home.mkdir()
    api_port = airflow_ui.free_port()
    with local.Emulator(tmp_path) as emulator:
        env = {**airflow_ui.clean_env(home), "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
               "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False", "AIRFLOW__CORE__PARALLELISM": "4",
               "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
               "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(airflow_ui.free_port()),
               "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
               local.BACKEND_ENV: "local", local.ROOT_ENV: str(tmp_path), local.EMULATOR_ENV: emulator.url,
               "GEMMA_PIPELINE_RETRY_DELAY_S": "5",
               # Two users; only alice may answer (the deployment setting the DAG reads).
               "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
               "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "alice:admin,bob:admin", approval.APPROVERS_ENV: "alice:Alice"}
        airflow_ui.airflow(env, "db", "migrate")
        airflow_ui.airflow(env, "dags", "reserialize")
        with airflow_ui.api_server(home, env, api_port) as url:
            alice, bob = (airflow_ui.login(url, home, user) for user in ("alice", "bob"))
            conf = {"bucket": BUCKET, "run_name": "restart", "base_model": str(tiny_gemma3), "max_steps": 2,
                    "batch_size": 2, "max_tokens": 64, "sequence_length": 64, "approval": "required",
                    "candidates": [{}, {"lora_rank": 8, "learning_rate": 0.001}]}
            status, run = airflow_ui.request(f"{url}/api/v2/dags/{airflow_ui.DAG_ID}/dagRuns", "POST",
                                             {"logical_date": None, "conf": conf}, token=alice)
            assert status == 200, run
            run_id = run["dag_run_id"]
            scheduler = _scheduler(env, home / "scheduler.log")
            try:
                asked = airflow_ui.open_request(url, scheduler, token=alice)
                _kill(scheduler)  # the scheduler dies while the task waits for a person
                assert _state(url, alice, run_id, "approve") == "awaiting_input"
                assert asked["assigned_users"] == [{"id": "alice", "name": "Alice"}]
                chosen = asked["options"][1]
                path = airflow_ui.hitl_path(url, run_id)
                answer = {"chosen_options": [chosen], "params_input": {"comment": "after the restart"}}
                status, refused = airflow_ui.request(path, "PATCH", answer, token=bob)
                assert status == 403 and "is not a respondent" in refused["detail"], refused
                status, answered = airflow_ui.request(path, "PATCH", answer, token=alice)
                assert status == 200, answered  # answered while no scheduler runs
                scheduler = _scheduler(env, home / "scheduler.log")
                deadline = time.monotonic() + 600
                while _state(url, alice, run_id) not in ("success", "failed") and time.monotonic() < deadline:
                    assert scheduler.poll() is None, (home / "scheduler.log").read_text()[-3000:]
                    time.sleep(3)
                assert _state(url, alice, run_id) == "success", (home / "scheduler.log").read_text()[-5000:]
            finally:
                _kill(scheduler)
    prefix = tmp_path / "gcs" / BUCKET / "runs" / "restart"
    champion = json.loads((prefix / "champion.json").read_text())
    assert champion["champion"] == chosen and champion["approval"]["comment"] == "after the restart"
    assert champion["approval"]["by"] == {"id": "alice", "name": "alice"}
    assert [p.parent.name for p in (prefix / "candidates").glob("*/convert")] == [chosen]
    assert (prefix / "candidates" / chosen / "convert" / "_manifest.json").exists()
