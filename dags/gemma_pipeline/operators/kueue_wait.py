"""Wait for Kueue to admit a suspended Job before looking for its pods.

The provider's `get_pods` looks a few times right after creating the Job and fails with "No pods running
with labels" while Kueue still holds the Job suspended (apache/airflow #70585, #58496, #74373).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

WORKLOAD_GROUP, WORKLOAD_VERSION, WORKLOAD_PLURAL = "kueue.x-k8s.io", "v1beta2", "workloads"


class QueueTimeout(Exception):
    pass


def workload_conditions(custom_api: Any, namespace: str, job_uid: str) -> list[dict[str, Any]]:
    """Conditions of the Kueue Workload that owns the Job (QuotaReserved, Admitted, Evicted, ...)."""
    listing = custom_api.list_namespaced_custom_object(
        WORKLOAD_GROUP, WORKLOAD_VERSION, namespace, WORKLOAD_PLURAL, label_selector=f"kueue.x-k8s.io/job-uid={job_uid}"
    )
    items = listing.get("items", []) if isinstance(listing, dict) else []
    return [c for item in items for c in item.get("status", {}).get("conditions", [])]


def describe(conditions: list[dict[str, Any]]) -> str:
    if not conditions:
        return "no Workload status yet (is Kueue installed and does the queue label name a LocalQueue?)"
    return "; ".join(f"{c.get('type')}={c.get('status')} ({c.get('reason', '')}: {c.get('message', '')})" for c in conditions)


def wait_for_admission(batch_api: Any, custom_api: Any, name: str, namespace: str, timeout_s: float, **wait: Any) -> float:
    """Block until the Job is unsuspended; return the seconds waited. Raises QueueTimeout with the
    Workload's conditions when `timeout_s` passes first. `wait`: poll_s, log, clock, sleep."""

    def read() -> tuple[bool, str]:
        job = batch_api.read_namespaced_job(name=name, namespace=namespace)
        return bool(job.spec.suspend), job.metadata.uid

    return wait_until_admitted(read, custom_api, f"Job {namespace}/{name}", namespace, timeout_s, **wait)


def jobset_suspension(jobset: dict[str, Any]) -> tuple[bool, str]:
    """(suspended, uid) of a JobSet read from the custom objects API: Kueue admits it by unsuspending it."""
    return bool((jobset.get("spec") or {}).get("suspend")), (jobset.get("metadata") or {}).get("uid", "")


def wait_until_admitted(
    read: Callable[[], tuple[bool, str]],
    custom_api: Any,
    what: str,
    namespace: str,
    timeout_s: float,
    poll_s: float = 10.0,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> float:
    """The wait for any Kueue-managed object (a Job, a JobSet): `read` says whether it is still suspended and
    its uid, which labels its Workload."""
    clock, sleep = clock or time.monotonic, sleep or time.sleep
    started = clock()
    last_report = ""
    while True:
        suspended, uid = read()
        if not suspended:
            waited = clock() - started
            log(f"{what} admitted by Kueue after {waited:.0f} s")
            return waited
        conditions = workload_conditions(custom_api, namespace, uid)
        report = describe(conditions)
        if report != last_report:
            log(f"{what} is queued in Kueue: {report}")
            last_report = report
        if clock() - started >= timeout_s:
            raise QueueTimeout(
                f"{what} was not admitted by Kueue within {timeout_s:.0f} s; Workload: {report}. "
                "Run `python -m gemma_pipeline.tools.preflight` for the stage's profile and queue to see whether it can ever fit."
            )
        sleep(poll_s)


def wait_for_pods(core_api: Any, namespace: str, label_selector: str, timeout_s: float, poll_s: float = 5.0,
                  clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None) -> list[Any]:
    """After admission the Job controller needs a moment to create the pod; wait for it."""
    clock, sleep = clock or time.monotonic, sleep or time.sleep
    started = clock()
    while True:
        pods = core_api.list_namespaced_pod(namespace=namespace, label_selector=label_selector).items
        if pods:
            return pods
        if clock() - started >= timeout_s:
            return []
        sleep(poll_s)
