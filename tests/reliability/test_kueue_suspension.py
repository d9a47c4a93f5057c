"""Kueue: a Job never admitted fails after the queue timeout, without retry, quoting the Workload's reason. (That a
Job suspended again mid-run is waited on is the provider's trigger loop: tests/dags/test_provider_contract.py.)"""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException

from tests.support.kube import FakeClock, FakeKubernetes, _operator  # the fake Kubernetes API


def test_a_job_never_admitted_fails_after_the_queue_timeout_without_retry(monkeypatch):
    clock = FakeClock()
    api = FakeKubernetes(clock, admit_at=None)
    monkeypatch.setattr("gemma_pipeline.operators.kueue_wait.time.monotonic", clock)
    monkeypatch.setattr("gemma_pipeline.operators.kueue_wait.time.sleep", clock.sleep)
    with pytest.raises(AirflowFailException, match="not admitted by Kueue within 120 s.*insufficient quota"):
        _operator(api, timeout=120).get_pods(pod_request_obj=None, context={})
    assert api.deleted == ["gemma-finetune-x"]  # nothing left queued behind the failed task
