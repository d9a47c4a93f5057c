"""Promotion: whether a person approves what gets served, and the record of their decision.

With the `approval` Param at `required`, the `approve` task (`operators.approval`, the standard provider's
human-in-the-loop operator) asks under Required Actions in the Airflow UI, or through the REST API: one option per
finished candidate, the automatic champion first, and `Reject`. Only those are options, so Airflow's API itself
refuses (400) a candidate that did not finish or is not in this run, and the request stays open. The answer,
or the timeout default (`Reject`), is recorded in `champion.json` (`approval`), in the run report and in the model
card; a rejected run converts and serves nothing. With `none`, the automatic champion is promoted as before.

Who may answer and how long they have are deployment settings (environment variables of the Airflow workers):
`GEMMA_PIPELINE_APPROVERS` (comma-separated user ids; empty: any user allowed to act on the DAG) and
`GEMMA_PIPELINE_APPROVAL_TIMEOUT_HOURS` (default 72). Pure functions; stdlib only.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

from jobs.contract.documents import APPROVED, AUTOMATIC, NOT_APPROVED, OVERRIDDEN, REJECTED

MODES = ("none", "required")
REJECT = "Reject"
COMMENT = "comment"
APPROVERS_ENV = "GEMMA_PIPELINE_APPROVERS"
TIMEOUT_ENV = "GEMMA_PIPELINE_APPROVAL_TIMEOUT_HOURS"
DEFAULT_TIMEOUT_HOURS = 72.0


def approvers(value: str | None = None) -> list[dict[str, str]]:
    """`GEMMA_PIPELINE_APPROVERS` as the operator's `assigned_users`: `id` or `id:display name`, comma-separated."""
    value = os.environ.get(APPROVERS_ENV, "") if value is None else value
    users = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        user_id, _, name = item.partition(":")
        if not user_id.strip():
            raise ValueError(f"{APPROVERS_ENV}: got {value!r}; expected comma-separated user ids, each optionally "
                             "followed by :display name (e.g. 'alice,bob:Bob B')")
        if any(u["id"] == user_id.strip() for u in users):
            raise ValueError(f"{APPROVERS_ENV}: got {value!r}; user id {user_id.strip()!r} is listed twice")
        users.append({"id": user_id.strip(), "name": name.strip() or user_id.strip()})
    return users


def response_timeout(value: str | None = None) -> timedelta:
    """`GEMMA_PIPELINE_APPROVAL_TIMEOUT_HOURS`: how long a request waits before its default (Reject) applies."""
    value = os.environ.get(TIMEOUT_ENV, "") if value is None else value
    try:
        hours = float(value) if value.strip() else DEFAULT_TIMEOUT_HOURS
    except ValueError:
        hours = -1.0
    if not 0 < hours <= 24 * 365:
        raise ValueError(f"{TIMEOUT_ENV}: got {value!r}; expected a number of hours, more than 0 and at most 8760")
    return timedelta(hours=hours)


def finished(record: dict[str, Any]) -> list[str]:
    """The candidates a person may choose: those whose benchmark finished, the automatic champion first."""
    keys = [r["key"] for r in record["candidates"] if r.get("status") == "finished"]
    return sorted(keys, key=lambda k: k != record["champion"])


def options(record: dict[str, Any]) -> list[str]:
    return [*finished(record), REJECT]


def subject(record: dict[str, Any]) -> str:
    run = record["run_prefix"].rstrip("/").rsplit("/", 1)[-1]
    return f"Promote a candidate of run {run}? The automatic champion is {record['champion']}"


def body(record: dict[str, Any], sections: list[str], report_link: str) -> str:
    """The request's Markdown: how to answer, then the report's own sections (candidates with every metric and
    interval, why the champion, the answers side by side), each already escaped by `plan.report`."""
    from gemma_pipeline.plan import markup

    link = f"[the run report]({report_link})" if markup.safe_link(report_link) and "://" in report_link \
        else f"the run report at {markup.code(report_link)}"
    others = [k for k in finished(record) if k != record["champion"]]
    return "\n".join([
        f"Choose **{markup.text(record['champion'])}** to serve the automatic champion"
        + (f", another finished candidate ({', '.join(markup.text(k) for k in others)}) to serve it instead" if others else "")
        + f", or **{REJECT}** to convert and serve nothing. A comment is recorded with the decision in champion.json, "
        f"the run report and the model card. Without an answer the request is rejected when it times out.\n",
        f"Everything below is also in {link}.\n",
        *sections,
    ])


def decide(record: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """The decision a response (or the timeout default) makes; a ValueError names a choice that is not an option."""
    chosen = list(event.get("chosen_options") or [])
    allowed = options(record)
    if len(chosen) != 1 or chosen[0] not in allowed:
        raise ValueError(f"approval: got {chosen!r}; expected exactly one of {', '.join(allowed)} (a candidate of "
                         "this run whose benchmark finished, or Reject)")
    at = event.get("responded_at")
    at = at.isoformat() if isinstance(at, datetime) else (at or datetime.now(UTC).isoformat())
    timed_out = bool(event.get("timedout"))
    choice = chosen[0]
    decision = REJECTED if choice == REJECT else APPROVED if choice == record["champion"] else OVERRIDDEN
    return {"required": True, "decision": decision, "candidate": None if choice == REJECT else choice,
            "selected": record["champion"], "by": event.get("responded_by_user"), "at": at, "timed_out": timed_out,
            "comment": str((event.get("params_input") or {}).get(COMMENT) or "")}


def automatic(record: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    """`approval` = none: the automatic champion, promoted without asking."""
    return {"required": False, "decision": AUTOMATIC, "candidate": record["champion"], "selected": record["champion"],
            "by": None, "at": (now or datetime.now(UTC)).isoformat(), "timed_out": False, "comment": ""}


def apply(record: dict[str, Any], decision: dict[str, Any], entries: list[dict[str, Any]],
          keys: list[str] | None = None) -> dict[str, Any]:
    """The record with the decision in it; a candidate chosen over the automatic one becomes the champion (the
    automatic choice stays in `approval.selected`). `entries`: the plan's candidates (their map `index`); `keys`:
    the candidates to convert, in order, for `convert_index` (the chosen one's position among them)."""
    out = {**record, "approval": decision, "candidates": [dict(r) for r in record["candidates"]]}
    chosen = decision["candidate"]
    if chosen is not None and chosen != record["champion"]:
        out["champion"] = chosen
        out["index"] = next(e["index"] for e in entries if e["key"] == chosen)
        for row in out["candidates"]:
            row["champion"] = row["key"] == chosen
    if chosen is not None and keys is not None:
        out["convert_index"] = keys.index(chosen)
        out["converted"] = list(keys)  # what serve may serve: these candidates' exports and adapters
    return out


CARD_KEYS = ("decision", "candidate", "selected", "by", "comment", "timed_out")


def card_record(decision: dict[str, Any], key: str) -> dict[str, Any]:
    """What convert's model card records for candidate `key` (convert's `--approval`): the decision without its
    time, so the same decision in a rerun leaves the converted export as it is, and a new one rewrites its card. A
    candidate converted beside the promoted one (`convert_all`) is marked as not the approved one."""
    record = {k: decision.get(k) for k in CARD_KEYS}
    if decision.get("candidate") != key:
        record = {**record, "decision": NOT_APPROVED}
    return record


def undo(record: dict[str, Any], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The record as `select` wrote it, before any decision (`apply` is undone): the automatic champion again."""
    decision = record.get("approval")
    if not decision:
        return record
    out = {k: v for k, v in record.items() if k not in ("approval", "converted")}
    selected = decision["selected"]
    out["champion"] = selected
    out["index"] = next(e["index"] for e in entries if e["key"] == selected)
    out["candidates"] = [{**r, "champion": r["key"] == selected} for r in record["candidates"]]
    converted = [k for k in record.get("converted") or [] if k in finished(out)]
    out["convert_index"] = converted.index(selected) if selected in converted else 0
    return out


def summary(decision: dict[str, Any] | None) -> str | None:
    """One sentence for the report, the log and the model card (plain text: callers escape it)."""
    if not decision:
        return None
    who = (decision.get("by") or {}).get("name") or (decision.get("by") or {}).get("id")
    comment = f' Comment: "{decision["comment"]}"' if decision.get("comment") else ""
    if decision["decision"] == AUTOMATIC:
        return f"Promoted without review (approval = none): {decision['candidate']}, the automatic champion."
    if decision["timed_out"]:
        return f"Rejected: nobody answered the approval request before it timed out ({decision['at']}); nothing was served."
    if decision["decision"] == REJECTED:
        return f"Rejected by {who} at {decision['at']}: nothing was converted or served.{comment}"
    if decision["decision"] == OVERRIDDEN:
        return (f"Approved by {who} at {decision['at']}: {decision['candidate']}, chosen over the automatic champion "
                f"{decision['selected']}.{comment}")
    return f"Approved by {who} at {decision['at']}: {decision['candidate']}, the automatic champion.{comment}"


def rejected(record: dict[str, Any] | None) -> bool:
    return ((record or {}).get("approval") or {}).get("decision") == REJECTED
