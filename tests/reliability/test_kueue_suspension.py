"""Kueue: a Job suspended again mid-run (preempted by a higher-priority workload) is waited on, not failed; a Job
never admitted fails after the queue timeout, without retry, quoting the Workload's reason."""

from __future__ import annotations

import asyncio

import pytest
from airflow.sdk.exceptions import AirflowFailException
from gemma_pipeline import triggers
from kubernetes.client import V1Job, V1JobCondition, V1JobStatus, V1ObjectMeta

from tests.dags.test_kueue_wait import FakeClock, FakeKubernetes, _operator  # the fake Kubernetes API


def _job(state: str) -> V1Job:
    conditions = {
        "running": [],
        "suspended": [V1JobCondition(type="Suspended", status="True", reason="JobSuspended",
                                     message="Preempted to accommodate a workload (UID: hi-prio) due to prioritization in the ClusterQueue")],
        "resumed": [V1JobCondition(type="Suspended", status="False", reason="JobResumed")],
        "complete": [V1JobCondition(type="Suspended", status="False"), V1JobCondition(type="Complete", status="True")],
    }[state]
    return V1Job(metadata=V1ObjectMeta(name="gemma-finetune-x", namespace="team-a"),
                 status=V1JobStatus(active=0 if state == "suspended" else 1, conditions=conditions))


def test_a_job_resuspended_by_kueue_is_waited_on_until_it_completes():
    from airflow.providers.google.cloud.hooks.kubernetes_engine import GKEKubernetesAsyncHook

    states = ["running", "suspended", "suspended", "suspended", "resumed", "running", "complete"]
    seen: list[str] = []

    async def get_job_status(name: str, namespace: str) -> V1Job:
        state = states[min(len(seen), len(states) - 1)]
        seen.append(state)
        return _job(state)

    hook = object.__new__(GKEKubernetesAsyncHook)  # the provider's own wait loop, against a scripted API
    hook.get_job_status = get_job_status
    trigger = triggers.ProgressGKEJobTrigger(
        cluster_url="https://1.2.3.4", ssl_ca_cert="cert", job_name="gemma-finetune-x", job_namespace="team-a",
        pod_names=["pod-1"], pod_namespace="team-a", base_container_name="stage", poll_interval=0.001)
    trigger.__dict__["hook"] = hook

    async def first_event():
        async for event in trigger.run():
            return event.payload

    event = asyncio.run(first_event())
    assert seen == states  # it kept polling through the suspension instead of giving up
    assert event["status"] == "success" and event["message"] == "Job completed successfully"


def test_a_job_never_admitted_fails_after_the_queue_timeout_without_retry(monkeypatch):
    clock = FakeClock()
    api = FakeKubernetes(clock, admit_at=None)
    monkeypatch.setattr("gemma_pipeline.kueue_wait.time.monotonic", clock)
    monkeypatch.setattr("gemma_pipeline.kueue_wait.time.sleep", clock.sleep)
    with pytest.raises(AirflowFailException, match="not admitted by Kueue within 120 s.*insufficient quota"):
        _operator(api, timeout=120).get_pods(pod_request_obj=None, context={})
    assert api.deleted == ["gemma-finetune-x"]  # nothing left queued behind the failed task
