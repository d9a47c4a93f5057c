"""Promotion: the decision as pure functions (`plan.approval`) and the `approve` task around the provider's HITL
operator, without a scheduler: asking writes the request and parks the task; a response (or the timeout default)
resumes it in a fresh operator, as after a scheduler restart, and the decision lands in champion.json."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from gemma_pipeline.operators import approval as operator
from gemma_pipeline.plan import approval, report

from jobs.contract import documents
from jobs.contract.layout import RunLayout

RUN = "gs://b/runs/r1"
KEYS = ("default", "lr-high", "broken")


def _record(champion: str = "default") -> dict:
    rows = [{"key": k, "status": "failed" if k == "broken" else "finished", "champion": k == champion,
             "overrides": {}, "perplexity": 10.0 + i, "ci95": [9.0 + i, 11.0 + i],
             "prefixes": {s: f"{RUN}/candidates/{k}/{s}" for s in ("finetune", "benchmark", "convert")}}
            for i, k in enumerate(KEYS)]
    return {"champion": champion, "index": KEYS.index(champion), "why": "lowest perplexity", "candidates": rows,
            "quality_gate": {"passed": True}, "run_prefix": RUN, "convert_index": 0}


def _event(choice: str, comment: str = "", by: dict | None = None, timedout: bool = False) -> dict:
    return {"chosen_options": [choice], "params_input": {approval.COMMENT: comment} if comment else {},
            "responded_at": datetime(2026, 12, 4, 12, tzinfo=UTC), "timedout": timedout,
            "responded_by_user": None if timedout else (by or {"id": "alice", "name": "Alice"})}


def test_the_options_are_the_finished_candidates_champion_first_and_reject():
    assert approval.options(_record()) == ["default", "lr-high", approval.REJECT]
    assert approval.options(_record("lr-high")) == ["lr-high", "default", approval.REJECT]


@pytest.mark.parametrize(("choice", "decision", "candidate"), [("default", approval.APPROVED, "default"),
                                                                ("lr-high", approval.OVERRIDDEN, "lr-high"),
                                                                (approval.REJECT, approval.REJECTED, None)])
def test_a_response_becomes_a_decision(choice, decision, candidate):
    made = approval.decide(_record(), _event(choice, "looks right"))
    assert (made["decision"], made["candidate"], made["selected"]) == (decision, candidate, "default")
    assert made["by"] == {"id": "alice", "name": "Alice"} and made["comment"] == "looks right"
    assert made["at"] == "2026-12-04T12:00:00+00:00" and made["timed_out"] is False


@pytest.mark.parametrize("chosen", [["broken"], ["someone-elses"], ["default", "lr-high"], []])
def test_a_candidate_that_did_not_finish_or_is_not_in_the_run_is_refused(chosen):
    with pytest.raises(ValueError, match=r"approval: got .*; expected exactly one of default, lr-high, Reject"):
        approval.decide(_record(), {**_event("default"), "chosen_options": chosen})


def test_the_timeout_default_is_a_rejection_by_nobody():
    made = approval.decide(_record(), _event(approval.REJECT, timedout=True))
    assert made["decision"] == approval.REJECTED and made["timed_out"] and made["by"] is None
    assert "before it timed out" in approval.summary(made)


def test_choosing_another_candidate_makes_it_the_champion_and_keeps_the_automatic_choice():
    record = _record()
    decision = approval.decide(record, _event("lr-high", "shorter answers"))
    out = approval.apply(record, decision, _entries(), ["lr-high"])
    assert out["champion"] == "lr-high" and out["index"] == 1 and out["convert_index"] == 0
    assert [r["key"] for r in out["candidates"] if r["champion"]] == ["lr-high"]
    assert out["approval"]["selected"] == "default" and record["champion"] == "default"  # the input is not changed
    assert documents.champion_row(out)["key"] == "lr-high"
    assert approval.summary(decision) == ('Approved by Alice at 2026-12-04T12:00:00+00:00: lr-high, chosen over the '
                                          'automatic champion default. Comment: "shorter answers"')


def test_deployment_settings():
    assert approval.approvers("") == []
    assert approval.approvers("alice, bob:Bob B") == [{"id": "alice", "name": "alice"}, {"id": "bob", "name": "Bob B"}]
    with pytest.raises(ValueError, match="GEMMA_PIPELINE_APPROVERS: got ':x'"):
        approval.approvers(":x")
    assert approval.response_timeout("") == timedelta(hours=72)
    assert approval.response_timeout("0.5") == timedelta(minutes=30)
    for bad in ("0", "soon", "-3"):
        with pytest.raises(ValueError, match=f"GEMMA_PIPELINE_APPROVAL_TIMEOUT_HOURS: got '{bad}'"):
            approval.response_timeout(bad)


def test_the_request_links_the_report_and_never_a_script():
    record = _record()
    assert "[the run report](https://storage.cloud.google.com/b/runs/r1/report.html)" in approval.body(
        record, [], operator.report_link(RUN, "gke"))
    body = approval.body(record, [], "javascript:alert(1)")
    assert "](javascript" not in body and "`javascript:alert(1)`" in body


def test_the_report_says_what_was_decided():
    record = approval.apply(_record(), approval.decide(_record(), _event(approval.REJECT, "*not* <b>yet</b>")), _entries())
    built = report.build(RUN, {"approval": "required"}, {}, {}, {}, {}, record)
    assert built["rejected"] and not built["awaiting_approval"]
    md = report.markdown(built, {})
    assert "REJECTED at approval: nothing was converted or served" in md
    assert r'Comment: "\*not\* &lt;b&gt;yet&lt;/b&gt;"' in md  # the approver's text, shown literally
    waiting = report.markdown(report.build(RUN, {"approval": "required"}, {}, {}, {}, {}, _record(), asking=True), {})
    assert "awaiting approval" in waiting and "## Approval" in waiting


class FakeStore:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def read(self, uri: str) -> bytes | None:
        return self.files.get(uri)

    def write(self, uri: str, data: bytes, content_type: str = "") -> None:
        self.files[uri] = data


def _entries() -> list[dict]:
    return [{"key": k, "index": i, "run_prefix": RUN, "convert": {"key": k, "arguments": []}} for i, k in enumerate(KEYS)]


def _operator(monkeypatch, store: FakeStore, mode: str = "required"):
    monkeypatch.setenv("GEMMA_PIPELINE_BACKEND", "gke")
    monkeypatch.setattr(operator.PromoteOperator, "_store", lambda self: store)
    return operator.PromoteOperator(task_id="approve", mode=mode)


def _context(**params) -> dict:
    ti = SimpleNamespace(xcom_pull=lambda task_ids: _entries() if task_ids == "plan" else None, id="ti-1")
    return {"ti": ti, "task_instance": ti, "params": {"convert_all": False, **params}, "run_id": "manual__1",
            "dag": SimpleNamespace(dag_id="gemma_lora_finetune")}


def _champion(store: FakeStore) -> dict:
    return json.loads(store.files[RunLayout(RUN).champion])


def _store() -> FakeStore:
    return FakeStore({RunLayout(RUN).champion: documents.CHAMPION.dump(_record())})


def test_asking_writes_the_request_with_the_candidates_and_parks_the_task(monkeypatch):
    from airflow.providers.standard.operators import hitl
    from airflow.sdk.exceptions import TaskAwaitingInput

    store, asked = _store(), {}
    monkeypatch.setattr(hitl, "upsert_hitl_detail", lambda **kw: asked.update(kw))
    monkeypatch.setattr("gemma_pipeline.operators.report.publish", lambda context, store, prefix, asking: report.build(
        prefix, {}, {}, {}, {}, {}, _champion(store), asking=asking))
    with pytest.raises(TaskAwaitingInput):
        _operator(monkeypatch, store).execute(_context())
    assert asked["options"] == ["default", "lr-high", approval.REJECT] and asked["defaults"] == [approval.REJECT]
    assert asked["subject"] == "Promote a candidate of run r1? The automatic champion is default"
    assert "| candidate | overrides | status | eval perplexity | 95% interval |" in asked["body"]
    assert list(asked["params"]) == [approval.COMMENT]  # the DAG's params are not the request's form
    assert "approval" not in _champion(store)  # nothing decided yet


def test_a_response_resumes_a_fresh_operator_and_promotes_the_chosen_candidate(monkeypatch):
    store = _store()
    # A new operator object, as the task runner builds after the wait (and after any scheduler restart): nothing
    # from the asking process is needed, the options come from champion.json again.
    converts = _operator(monkeypatch, store).execute_complete(_context(), _event("lr-high", "fewer cut-offs"))
    assert [c["key"] for c in converts] == ["lr-high"]
    assert json.loads(converts[0]["arguments"][converts[0]["arguments"].index("--approval") + 1])["comment"] == "fewer cut-offs"
    saved = _champion(store)
    assert saved["champion"] == "lr-high" and saved["approval"]["decision"] == approval.OVERRIDDEN
    assert saved["approval"]["comment"] == "fewer cut-offs" and saved["convert_index"] == 0


def test_convert_all_converts_every_finished_candidate_and_points_at_the_chosen_one(monkeypatch):
    store = _store()
    converts = _operator(monkeypatch, store).execute_complete(_context(convert_all=True), _event("lr-high"))
    assert [c["key"] for c in converts] == ["default", "lr-high"] and _champion(store)["convert_index"] == 1


def test_a_rejection_is_recorded_and_skips_convert_and_serve(monkeypatch):
    store = _store()
    with pytest.raises(AirflowSkipException, match="Rejected by Alice"):
        _operator(monkeypatch, store).execute_complete(_context(), _event(approval.REJECT, "not better"))
    assert _champion(store)["approval"]["decision"] == approval.REJECTED


def test_an_answer_that_is_not_an_option_fails_the_resume(monkeypatch):
    with pytest.raises(ValueError, match=r"Responses \{'broken'\} not in"):  # the provider's own check, first
        _operator(monkeypatch, _store()).execute_complete(_context(), _event("broken"))


def test_without_approval_the_automatic_champion_goes_on_unasked(monkeypatch):
    store = _store()
    converts = _operator(monkeypatch, store, mode="none").execute(_context())
    assert [c["key"] for c in converts] == ["default"]
    assert _champion(store)["approval"]["decision"] == approval.AUTOMATIC
    with pytest.raises(AirflowFailException, match="approval: got 'maybe'; expected one of none, required"):
        _operator(monkeypatch, store, mode="maybe").execute(_context())


def test_a_retry_asks_again_from_what_select_chose():
    decided = approval.apply(_record(), approval.decide(_record(), _event("lr-high")), _entries(), ["default", "lr-high"])
    again = approval.undo(decided, _entries())
    assert again["champion"] == "default" and again["index"] == 0 and "approval" not in again
    assert [r["key"] for r in again["candidates"] if r["champion"]] == ["default"]
    assert approval.options(again) == approval.options(_record()) and again["convert_index"] == 0


def test_each_converted_candidates_card_gets_the_decision_as_it_concerns_it(monkeypatch):
    decision = approval.decide(_record(), _event("lr-high", "fewer cut-offs"))
    mine, other = approval.card_record(decision, "lr-high"), approval.card_record(decision, "default")
    assert mine["decision"] == approval.OVERRIDDEN and "at" not in mine  # the same decision in a rerun: same config
    assert other["decision"] == documents.NOT_APPROVED and other["candidate"] == "lr-high"
    op = _operator(monkeypatch, _store())
    jobs = [op.convert_job({"key": k, "convert": {"arguments": ["--output", f"{RUN}/candidates/{k}/convert"]}},
                           decision, {"serve": "gke"}, 2) for k in ("default", "lr-high")]
    args = [dict(zip(j["arguments"][::2], j["arguments"][1::2])) for j in jobs]
    assert json.loads(args[1]["--approval"]) == mine and json.loads(args[0]["--approval"]) == other
    # One vLLM base for every adapter: only the promoted candidate's convert exports it.
    assert args[1]["--export-base"] == "true" and "--export-base" not in args[0]
    single = op.convert_job({"key": "lr-high", "convert": {"arguments": []}}, decision, {"serve": "gke"}, 1)
    assert "--export-base" not in single["arguments"]


def test_the_convert_stage_reads_the_decision_it_is_given():
    from jobs.contract.configs.convert import ConvertConfig
    from jobs.contract.errors import BadInputError

    record = approval.card_record(approval.decide(_record(), _event("default")), "default")
    config = ConvertConfig(output="o", finetune="f", approval=json.dumps(record))
    assert config.approval_record() == record
    with pytest.raises(BadInputError, match="--approval"):
        ConvertConfig(output="o", finetune="f", approval="{not json")


def test_an_approver_listed_twice_is_refused():
    with pytest.raises(ValueError, match="user id 'alice' is listed twice"):
        approval.approvers("alice,alice:Alice A")
