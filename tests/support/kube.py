"""A fake Kubernetes API at the client's boundary (Jobs, pods, Kueue Workloads) and a fake clock, for the operator's
queue wait."""

from __future__ import annotations

from types import SimpleNamespace

PENDING = [{"type": "QuotaReserved", "status": "False", "reason": "Pending",
            "message": "couldn't assign flavors to pod set main: insufficient quota for google.com/tpu in flavor tpu-v5e-8"}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeKubernetes:
    """Just enough of BatchV1Api, CoreV1Api and CustomObjectsApi: the Job stays suspended until `admit_at`."""

    def __init__(self, clock: FakeClock, admit_at: float | None) -> None:
        self.clock, self.admit_at = clock, admit_at
        self.deleted: list[str] = []
        self.job_reads = 0

    def read_namespaced_job(self, name: str, namespace: str):
        self.job_reads += 1
        admitted = self.admit_at is not None and self.clock() >= self.admit_at
        return SimpleNamespace(spec=SimpleNamespace(suspend=not admitted), metadata=SimpleNamespace(uid="uid-1", name=name))

    def list_namespaced_custom_object(self, group, version, namespace, plural, label_selector):
        assert (group, version, plural) == ("kueue.x-k8s.io", "v1beta2", "workloads")
        assert label_selector == "kueue.x-k8s.io/job-uid=uid-1"
        return {"items": [{"status": {"conditions": PENDING}}]}

    def list_namespaced_pod(self, namespace: str, label_selector: str):
        admitted = self.admit_at is not None and self.clock() >= self.admit_at
        return SimpleNamespace(items=[SimpleNamespace(metadata=SimpleNamespace(name="pod-1", namespace=namespace))] if admitted else [])

    def delete_namespaced_job(self, name: str, namespace: str, propagation_policy: str):
        self.deleted.append(name)


def _operator(api: FakeKubernetes, timeout: int):
    from gemma_pipeline.operators.stage import StageJobOperator

    op = StageJobOperator(task_id="finetune", stage="finetune", profile_name="tpu-v5e-8", image="img:1", queue_timeout_s=str(timeout),
                          project_id="p", location="l", cluster_name="c", namespace="team-a", wait_until_job_complete=True,
                          parallelism=1)
    op.__dict__["hook"] = SimpleNamespace(batch_v1_client=api, custom_object_client=api, core_v1_client=api)
    op.__dict__["client"] = api
    op.job = SimpleNamespace(metadata=SimpleNamespace(name="gemma-finetune-x", namespace="team-a"))
    op._build_find_pod_label_selector = lambda context, exclude_checked=True: "job-name=gemma-finetune-x"
    op.log_matching_pod = lambda pod, context: None
    return op
