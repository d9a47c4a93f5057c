"""The Kueue wait against a fake Kubernetes API: a Job Kueue keeps suspended for a while and then admits,
and one it never admits (timeout naming the Workload's reason)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from gemma_pipeline.operators.kueue_wait import QueueTimeout, wait_for_admission

from tests.support.kube import FakeClock, FakeKubernetes, _operator


def test_waits_while_suspended_then_returns():
    clock = FakeClock()
    api = FakeKubernetes(clock, admit_at=95)
    lines: list[str] = []
    waited = wait_for_admission(api, api, "job", "team-a", timeout_s=600, poll_s=10, log=lines.append, clock=clock, sleep=clock.sleep)
    assert waited == 100 and api.job_reads == 11
    assert "insufficient quota for google.com/tpu" in lines[0]
    assert lines[-1].startswith("Job team-a/job admitted by Kueue after 100 s")
    assert len(lines) == 2  # the same queued status is logged once, not every poll


def test_never_admitted_times_out_with_the_workload_reason():
    clock = FakeClock()
    api = FakeKubernetes(clock, admit_at=None)
    with pytest.raises(QueueTimeout, match="not admitted by Kueue within 300 s.*insufficient quota for google.com/tpu.*preflight"):
        wait_for_admission(api, api, "job", "team-a", timeout_s=300, poll_s=30, log=lambda _: None, clock=clock, sleep=clock.sleep)


def test_operator_waits_for_admission_instead_of_failing(monkeypatch):
    from gemma_pipeline.operators import kueue_wait

    clock = FakeClock()
    api = FakeKubernetes(clock, admit_at=120)
    monkeypatch.setattr(kueue_wait.time, "monotonic", clock)
    monkeypatch.setattr(kueue_wait.time, "sleep", clock.sleep)
    pods = _operator(api, timeout=3600).get_pods(pod_request_obj=None, context={})
    assert [p.metadata.name for p in pods] == ["pod-1"] and not api.deleted


@pytest.mark.parametrize("reason,retriable", [("PodFailurePolicy", False), ("BackoffLimitExceeded", True),
                                             ("DeadlineExceeded", False)])
def test_failure_classes_come_from_the_jobs_conditions(reason, retriable):
    """The Job controller's Failed condition names the podFailurePolicy; the error message is not read (it says
    nothing here), so a provider rewording its message cannot turn a bad input into three retries."""

    from airflow.sdk.exceptions import AirflowException, AirflowFailException
    from gemma_pipeline.operators.stage import StageJobOperator

    op = StageJobOperator(task_id="finetune", stage="finetune", profile_name="cpu", name="gemma-finetune",
                          image="r/finetune:1", project_id="p", location="l", cluster_name="c", namespace="team-a")
    op.__dict__["hook"] = SimpleNamespace(get_pod=lambda name, namespace: None)
    job = {"metadata": {"name": "gemma-finetune-x", "namespace": "team-a"},
           "status": {"conditions": [{"type": "Failed", "status": "True", "reason": reason}]}}
    event = {"status": "error", "message": "the Job failed", "job": job, "pod_names": [], "pod_namespace": "team-a"}
    with pytest.raises(AirflowException) as caught:
        op.execute_complete({"ti": SimpleNamespace(xcom_push=lambda **kw: None)}, event)
    assert isinstance(caught.value, AirflowFailException) is (not retriable)
