"""One DAG run at a time per run prefix: a lease object, `runs/RUN/_lease.json`, taken and released with Cloud
Storage preconditions, so that two runs with the same `run_name` (a double click on Trigger) never interleave
their writes.

The `plan` task takes the lease (create-only: `if_generation_match=0`). A second run finds it held by a run that
is still active and fails at once, naming the holder; a lease left by a run that is no longer active (killed,
or finished without releasing) is taken over with `if_generation_match=<its generation>`, so of two runs racing
for a stale lease exactly one wins. A retry or a cleared task of the holder's own run keeps the lease. The
`report` task releases it (again under a precondition), and writes the report only while it holds the lease.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from jobs.contract import artifacts

log = logging.getLogger(__name__)

LEASE = artifacts.LEASE


class LeaseHeld(RuntimeError):
    """The run prefix belongs to another active run."""


def _uri(run_prefix: str) -> str:
    return f"{run_prefix.rstrip('/')}/{LEASE}"


def holder(store: Any, run_prefix: str) -> tuple[dict[str, Any] | None, int]:
    data, generation = store.read_generation(_uri(run_prefix))
    return (json.loads(data) if data is not None else None), generation


def acquire(store: Any, run_prefix: str, owner: dict[str, str], is_active: Callable[[dict[str, Any]], bool]) -> int:
    """Take the lease for `owner` ({"dag_id", "run_id"}) and return its generation; LeaseHeld if an active run
    holds it."""
    from google.api_core.exceptions import PreconditionFailed

    body = json.dumps({**owner, "acquired_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2).encode()
    for _ in range(10):
        current, generation = holder(store, run_prefix)
        if current is not None and current.get("run_id") == owner["run_id"]:
            return generation  # this run's own retry, or a cleared task
        if current is not None and is_active(current):
            raise LeaseHeld(
                f"{run_prefix} is in use by DAG run {current.get('run_id')!r} (since {current.get('acquired_at')}); "
                "two runs with one run_name would interleave their writes. Wait for that run to finish and trigger "
                "again (finished stages are skipped), or trigger with another run_name.")
        if current is not None:
            log.warning("taking over the lease on %s from DAG run %r, which is no longer active", run_prefix, current.get("run_id"))
        try:
            return store.write(_uri(run_prefix), body, "application/json", if_generation_match=generation)
        except PreconditionFailed:
            continue  # another run took or changed it between our read and write: look again
    raise RuntimeError(f"could not take the lease on {run_prefix}: it kept changing")


def owns(store: Any, run_prefix: str, run_id: str) -> bool:
    current, _ = holder(store, run_prefix)
    return current is not None and current.get("run_id") == run_id


def release(store: Any, run_prefix: str, run_id: str) -> bool:
    """Drop the lease if `run_id` holds it; True when it did."""
    from google.api_core.exceptions import PreconditionFailed

    current, generation = holder(store, run_prefix)
    if current is None or current.get("run_id") != run_id:
        return False
    try:
        store.delete(_uri(run_prefix), if_generation_match=generation)
    except PreconditionFailed:
        return False  # taken over meanwhile: it is no longer ours to drop
    return True


def dag_run_active(context: Any) -> Callable[[dict[str, Any]], bool]:
    """Whether the lease holder's DAG run is still queued or running, asked of Airflow through the task SDK."""

    def active(current: dict[str, Any]) -> bool:
        try:
            state = context["ti"].get_dagrun_state(dag_id=current["dag_id"], run_id=current["run_id"])
        except Exception as err:  # an unknown run (deleted from the metadata DB) cannot be active
            log.info("lease holder %r: %s; treating it as finished", current.get("run_id"), err)
            return False
        return str(getattr(state, "value", state)) in ("queued", "running")

    return active
