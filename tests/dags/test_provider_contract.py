"""What StageJobOperator relies on in the Google and cncf-kubernetes providers. Each test names one behaviour;
when a provider release changes it, this file fails loudly instead of the operator failing on a cluster.
(pyproject.toml caps the providers at the releases this was written against.)"""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace

import pytest
from airflow.providers.cncf.kubernetes.operators.job import KubernetesJobOperator
from airflow.providers.google.cloud.hooks.kubernetes_engine import GKEKubernetesAsyncHook
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from gemma_pipeline.operators import stage as operators
from gemma_pipeline.operators import triggers
from kubernetes.client import V1Job, V1JobCondition, V1JobStatus, V1ObjectMeta


def _operator(**kwargs):
    return operators.StageJobOperator(task_id="finetune", stage="finetune", profile_name="cpu", name="gemma-finetune",
                                      image="r/finetune:1", project_id="p", location="l", cluster_name="c",
                                      namespace="team-a", progress_uri="gs://b/runs/r/finetune/_progress.json",
                                      **kwargs)


def test_the_provider_defers_with_a_gke_job_trigger_that_ours_replaces():
    """The provider's execute_deferrable builds a GKEJobTrigger and calls self.defer; our defer swaps in the
    progress trigger with the same arguments, and the SDK's defer raises TaskDeferred with it."""
    from airflow.sdk.exceptions import TaskDeferred

    op = _operator()
    op.__dict__["cluster_info"] = ("https://1.2.3.4", "cert")
    op.job = V1Job(metadata=V1ObjectMeta(name="gemma-finetune-x", namespace="team-a"))
    op.pods = [SimpleNamespace(metadata=SimpleNamespace(name="pod-1", namespace="team-a"))]
    with pytest.raises(TaskDeferred) as deferred:
        op.execute_deferrable()  # the provider's own method: we do not override it
    trigger = deferred.value.trigger
    assert type(trigger) is triggers.ProgressGKEJobTrigger and deferred.value.method_name == "execute_complete"
    _, kwargs = trigger.serialize()
    assert kwargs["job_name"] == "gemma-finetune-x" and kwargs["pod_names"] == ["pod-1"]
    assert kwargs["progress_uri"] == "gs://b/runs/r/finetune/_progress.json"
    assert "execute_deferrable" not in operators.StageJobOperator.__dict__


def test_get_pods_and_the_label_selector_keep_their_signatures():
    # We override get_pods (to wait for Kueue admission first) and call the private selector builder.
    assert list(inspect.signature(KubernetesJobOperator.get_pods).parameters) == [
        "self", "pod_request_obj", "context", "exclude_checked"]
    assert list(inspect.signature(KubernetesJobOperator._build_find_pod_label_selector).parameters)[:3] == [
        "self", "context", "exclude_checked"]
    assert callable(KubernetesJobOperator._write_logs)


def test_build_job_request_obj_reads_the_attributes_we_set_at_run_time():
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    source = inspect.getsource(KubernetesJobOperator) + inspect.getsource(KubernetesPodOperator)
    for attribute in ("self.node_selector", "self.tolerations", "self.container_resources", "self.env_vars",
                      "self.image", "self.arguments"):
        assert attribute in source, f"the provider no longer reads {attribute} when building the Job"


def test_a_failed_job_surfaces_as_airflow_exception_from_execute_complete():
    op = _operator()
    op.__dict__["hook"] = SimpleNamespace(get_pod=lambda name, namespace: None)
    ti = SimpleNamespace(xcom_push=lambda **kw: None)
    event = {"status": "error", "message": "Job failed with error: PodFailurePolicy", "job": {}, "pod_names": [],
             "pod_namespace": "team-a"}
    with pytest.raises(AirflowException) as caught:
        KubernetesJobOperator.execute_complete(op, {"ti": ti}, event)
    assert not isinstance(caught.value, AirflowFailException)  # the provider leaves retry policy to us


def _job(state: str) -> V1Job:
    conditions = {
        "running": [],
        "suspended": [V1JobCondition(type="Suspended", status="True", reason="JobSuspended",
                                     message="Preempted to accommodate a workload due to prioritization")],
        "resumed": [V1JobCondition(type="Suspended", status="False", reason="JobResumed")],
        "complete": [V1JobCondition(type="Suspended", status="False"), V1JobCondition(type="Complete", status="True")],
    }[state]
    return V1Job(metadata=V1ObjectMeta(name="gemma-finetune-x", namespace="team-a"),
                 status=V1JobStatus(active=0 if state == "suspended" else 1, conditions=conditions))


def test_the_provider_wait_loop_keeps_polling_through_a_kueue_suspension():
    """The provider's own GKEJobTrigger loop (which ours extends) does not end a Job suspended again mid-run by
    Kueue preemption: it keeps polling until the Job completes."""
    states = ["running", "suspended", "suspended", "suspended", "resumed", "running", "complete"]
    seen: list[str] = []

    async def get_job_status(name: str, namespace: str) -> V1Job:
        state = states[min(len(seen), len(states) - 1)]
        seen.append(state)
        return _job(state)

    hook = object.__new__(GKEKubernetesAsyncHook)
    hook.get_job_status = get_job_status
    trigger = triggers.ProgressGKEJobTrigger(
        cluster_url="https://1.2.3.4", ssl_ca_cert="cert", job_name="gemma-finetune-x", job_namespace="team-a",
        pod_names=["pod-1"], pod_namespace="team-a", base_container_name="stage", poll_interval=0.001)
    trigger.__dict__["hook"] = hook

    async def first_event():
        async for event in trigger.run():
            return event.payload

    event = asyncio.run(first_event())
    assert seen == states
    assert event["status"] == "success"
