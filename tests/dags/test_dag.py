"""The DAG: imports cleanly, exact task order, the V1Job each task would submit, params and policy."""

from __future__ import annotations

import copy
import subprocess
import sys
from datetime import datetime
from types import SimpleNamespace

import pytest
from gemma_pipeline.plan import jobspec, profiles
from kubernetes.client import models as k8s

from jobs.contract import stages
from tests.conftest import ROOT
from tests.support.dag import RUN_ID, TASK_OF, params_of, render, render_fields, stage_task


def test_exact_task_order(dag):
    order = ["plan", "preprocess_engine", "preprocess", "preprocess_dataflow", "candidate.finetune", "candidate.benchmark",
             "select", "approve", "convert", "serve", "report"]
    assert [t.task_id for t in dag.topological_sort()] == order
    # The engine branch picks one of the two preprocess tasks; both lead to the candidates.
    assert dag.get_task("preprocess_engine").downstream_task_ids == {"preprocess", "preprocess_dataflow"}
    for task_id in ("preprocess", "preprocess_dataflow"):
        assert dag.get_task(task_id).downstream_task_ids == {"candidate.finetune"}
    chained = ["plan", "preprocess_engine", "preprocess", "candidate.finetune", "candidate.benchmark", "select", "approve",
               "convert", "serve", "report"]
    for upstream, downstream in zip(chained, chained[1:]):
        assert downstream in dag.get_task(upstream).downstream_task_ids
    # The plan feeds the preprocessing and the candidates' mapped tasks (select pulls it); nothing else skips a step.
    assert dag.get_task("plan").downstream_task_ids == {"preprocess_engine", "preprocess", "preprocess_dataflow",
                                                        "candidate.finetune", "candidate.benchmark"}
    assert dag.get_task("candidate.benchmark").downstream_task_ids == {"select"}
    # Convert expands over what the approve task promotes (a rejection skips it, and serve with it).
    assert dag.get_task("approve").downstream_task_ids == {"convert"}
    assert dag.get_task("approve").__class__.__mro__[1].__name__ == "HITLOperator"
    # One fine-tune and one benchmark per candidate, a convert per chosen candidate.
    assert dag.task_group_dict["candidate"].__class__.__name__ == "MappedTaskGroup"
    assert dag.get_task("convert").__class__.__name__ == "MappedOperator"
    # select and the report run after failures too: select chooses among the candidates that finished, and the
    # report fails itself when a stage did not finish, so the run still shows failed. The fine-tune runs after
    # whichever preprocess task the branch chose (the other is skipped), never after a failed one.
    assert dag.get_task("report").trigger_rule == "all_done" and dag.get_task("select").trigger_rule == "all_done"
    assert dag.get_task("candidate.finetune").trigger_rule == "none_failed_min_one_success"
    assert all(dag.get_task(TASK_OF[s]).trigger_rule == "all_success" for s in jobspec.STAGES if s != "finetune")


def test_policy(dag):
    assert dag.start_date == datetime(2026, 1, 1, tzinfo=dag.start_date.tzinfo)
    assert dag.catchup is False and dag.schedule is None
    assert {"gemma", "lora", "gke", "kueue"} <= set(dag.tags)
    assert dag.doc_md
    for task in dag.tasks:
        assert task.retries >= 1
    for task in (stage_task(dag, s) for s in jobspec.STAGES):
        assert task.deferrable is True and task.wait_until_job_complete is True
        assert not task.image.endswith(":latest") and task.image.rsplit(":", 1)[1]


@pytest.mark.parametrize("stage", jobspec.STAGES)
def test_job_each_task_would_submit(dag, stage):
    settings = {"finetune_profile": "tpu-v5e-8", "queue": "team-a-queue", "bucket": "bkt"}
    job = render(stage_task(dag, stage, settings), dag, settings)
    assert job.metadata.labels[jobspec.QUEUE_LABEL] == "team-a-queue"
    assert job.metadata.labels[jobspec.PRIORITY_LABEL] == "development"
    assert job.spec.suspend is True and job.spec.parallelism == 1
    assert job.spec.backoff_limit == 3 and job.spec.ttl_seconds_after_finished == 7 * 24 * 3600
    rules = job.spec.pod_failure_policy.rules
    assert rules[0].action == "FailJob" and rules[0].on_exit_codes.values == [2, 3, 4]
    assert rules[1].action == "Ignore" and rules[1].on_pod_conditions[0].type == "DisruptionTarget"
    pod = job.spec.template.spec
    assert pod.service_account_name == f"gemma-{stage}" and pod.restart_policy == "Never"
    assert pod.automount_service_account_token is False
    assert pod.security_context.run_as_non_root is True
    container = pod.containers[0]
    assert container.security_context.allow_privilege_escalation is False
    assert container.security_context.capabilities.drop == ["ALL"]
    assert container.security_context.read_only_root_filesystem is True
    assert [m.mount_path for m in container.volume_mounts] == ["/tmp"] and pod.volumes[0].empty_dir is not None
    assert {e.name: e.value for e in container.env}["HOME"] == "/tmp"
    assert container.command == ["python", "-m", stages.get(stage).module]
    prefix = "gs://bkt/runs/manual-2026-11-22t10-00-00-00-00"
    own = f"{prefix}/{stage}" if stage == "preprocess" else f"{prefix}/candidates/default/{stage}"
    assert own in container.args
    if stage == "finetune":
        assert pod.node_selector == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice", "cloud.google.com/gke-tpu-topology": "2x4"}
        assert container.resources.limits["google.com/tpu"] == "8"
        assert pod.tolerations[0].key == "google.com/tpu"
        assert container.args[-2:] == ["--distribution", "auto"]
        assert f"{prefix}/preprocess" in container.args
    if stage == "preprocess":
        assert pod.node_selector == {"cloud.google.com/machine-family": "n2"} and not pod.tolerations


def test_run_name_param_names_the_artifact_folder(dag):
    settings = {"bucket": "bkt", "run_name": "nightly-7"}
    job = render(stage_task(dag, "benchmark", settings), dag, settings)
    args = job.spec.template.spec.containers[0].args
    assert "gs://bkt/runs/nightly-7/candidates/default/benchmark" in args
    assert "gs://bkt/runs/nightly-7/candidates/default/finetune" in args and "gs://bkt/runs/nightly-7/preprocess" in args
    assert job.metadata.labels["gemma-lora-pipeline/run"] == "nightly-7"
    for overrides, prefix in (({"run_name": "nightly-7"}, "gs://bkt/runs/nightly-7"),
                              ({}, "gs://bkt/runs/manual-2026-11-22t10-00-00-00-00")):
        assert jobspec.run_layout(params_of(dag, {"bucket": "bkt", **overrides}), RUN_ID).prefix == prefix


def test_job_matches_the_validated_schema(dag):
    import kubernetes_validate
    from kubernetes.client import ApiClient

    job = ApiClient().sanitize_for_serialization(render(stage_task(dag, "finetune"), dag))
    kubernetes_validate.validate(job, "1.31", strict=True)


@pytest.mark.parametrize("name,value", [("lora_rank", 0), ("lora_rank", -3), ("finetune_profile", "tpu-v9-64"),
                                        ("require_improvement", 1.5), ("queue", "Not_A_Queue"), ("bucket", "x"),
                                        ("learning_rate", 0), ("chat_format", "llama"), ("priority_class", "urgent"),
                                        ("run_name", "Has Spaces"), ("run_name", "-leading-dash")])
def test_params_reject_bad_values(dag, name, value):
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    param = dag.params.get_param(name)
    with pytest.raises(ParamValidationError):
        Param(value, **param.schema).resolve()


def test_dag_module_imports_no_ml_frameworks():
    code = ("import sys; sys.path.insert(0, 'dags'); import gemma_lora_finetune; "
            "print(sorted(m for m in ('keras', 'jax', 'torch', 'tensorflow', 'keras_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


class _FakeCustomObjects:
    """The custom objects API as the operator uses it for a JobSet (and Kueue's Workloads while it queues)."""

    def __init__(self, suspended: bool) -> None:
        self.suspended, self.created, self.deleted = suspended, [], []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append((group, version, namespace, plural, body))
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        return {"metadata": {"name": name, "uid": "uid-1"}, "spec": {"suspend": self.suspended}}

    def list_namespaced_custom_object(self, *args, **kwargs):
        return {"items": [{"status": {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending",
                                                        "message": "insufficient quota for google.com/tpu"}]}}]}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self.deleted.append(name)


class _FakeCore:
    """Pods of a JobSet and their logs, as the core API returns them (listed out of host order)."""

    def __init__(self) -> None:
        self.selectors = []

    def list_namespaced_pod(self, namespace, label_selector):
        self.selectors.append(label_selector)
        pod = lambda i: k8s.V1Pod(metadata=k8s.V1ObjectMeta(  # noqa: E731
            name=f"js-w-0-{i}", namespace=namespace, annotations={jobspec.COMPLETION_INDEX: str(i)}))
        return SimpleNamespace(items=[pod(1), pod(0)])

    def read_namespaced_pod_log(self, name, **kwargs):
        return [f"line from {name}\n".encode()]


def _jobset_task(dag, monkeypatch, suspended: bool, timeout: int = 60):
    monkeypatch.setenv("GEMMA_PIPELINE_BACKEND", "gke")
    overrides = {"finetune_profile": "gpu-h100-8x2", "queue_timeout_minutes": 1}
    task, context = render_fields(stage_task(dag, "finetune", overrides), dag, overrides)
    fake = _FakeCustomObjects(suspended)
    task.__dict__["hook"] = SimpleNamespace(is_in_cluster=False, custom_object_client=fake)
    task.__dict__["client"] = _FakeCore()
    task.__dict__["cluster_info"] = ("https://10.0.0.1", "ca-cert")
    task.queue_timeout_s = timeout
    pushed = {}
    ti = SimpleNamespace(**vars(context["ti"]), xcom_push=lambda key, value: pushed.__setitem__(key, value))
    return task, {**context, "dag_run": None, "ti": ti}, fake, pushed


def test_a_multihost_profile_submits_a_jobset_and_defers_until_it_ends(dag, monkeypatch, capsys):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred
    from gemma_pipeline.operators import triggers

    task, context, fake, pushed = _jobset_task(dag, monkeypatch, suspended=False)
    with pytest.raises(TaskDeferred) as deferred:
        task.execute(context)
    [(group, version, namespace, plural, body)] = fake.created
    assert (group, version, plural) == triggers.JOBSET and body["kind"] == "JobSet"
    assert body["metadata"]["labels"][jobspec.QUEUE_LABEL] and body["spec"]["suspend"] is True
    child = body["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert child["parallelism"] == 2 and child["completionMode"] == "Indexed"
    args = child["template"]["spec"]["containers"][0]["args"]
    assert "--distribution" in args and "--max-steps" in args  # the same arguments as the single-host Job
    trigger = deferred.value.trigger
    assert isinstance(trigger, triggers.JobSetTrigger) and trigger.name == body["metadata"]["name"]
    assert trigger.cluster_url == "https://10.0.0.1" and trigger.progress_uri.endswith("/finetune/_progress.json")
    assert deferred.value.method_name == "execute_jobset_complete"

    done = {"metadata": {"creationTimestamp": "2026-11-24T10:00:00Z"},
            "status": {"conditions": [{"type": "Completed", "status": "True", "lastTransitionTime": "2026-11-24T10:30:00Z"}]}}
    capsys.readouterr()
    task.execute_jobset_complete(context, {"status": "success", "jobset": done, "name": trigger.name, "namespace": namespace})
    assert pushed["usage"]["seconds"] == 1800.0 and pushed["usage"]["profile"] == "gpu-h100-8x2"
    assert task.client.selectors == [f"jobset.sigs.k8s.io/jobset-name={trigger.name}"]
    shown = capsys.readouterr().out  # every host's log, in host order
    order = [shown.index(s) for s in ("log of host 0 (pod js-w-0-0)", "line from js-w-0-0", "log of host 1 (pod js-w-0-1)",
                                      "line from js-w-0-1")]
    assert order == sorted(order)
    non_retriable = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "FailJobSetFailurePolicyAction",
                                                "message": "applying FailJobSet failure policy action"}]}}
    with pytest.raises(AirflowFailException, match="non-retriable"):
        task.execute_jobset_complete(context, {"status": "error", "jobset": non_retriable, "message": "JobSet failed"})
    restarts_spent = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "ReachedMaxRestarts"}]}}
    with pytest.raises(AirflowException) as retriable:
        task.execute_jobset_complete(context, {"status": "error", "jobset": restarts_spent, "message": "JobSet failed"})
    assert not isinstance(retriable.value, AirflowFailException)


def test_a_jobset_kueue_never_admits_is_deleted_and_fails_once(dag, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    task, context, fake, _ = _jobset_task(dag, monkeypatch, suspended=True, timeout=0)
    with pytest.raises(AirflowFailException, match="insufficient quota for google.com/tpu"):
        task.execute(context)
    assert fake.deleted == [fake.created[0][4]["metadata"]["name"]]


def test_multihost_profiles_only_for_the_fine_tune(dag):
    from airflow.sdk.exceptions import AirflowFailException

    assert dag.params.get_param("benchmark_profile").schema["enum"] == \
        sorted(n for n, p in profiles.PROFILES.items() if not p.multihost)
    assert "cpu-x2" in dag.params.get_param("finetune_profile").schema["enum"]
    benchmark = copy.deepcopy(stage_task(dag, "benchmark"))
    benchmark.plan = {**benchmark.plan, "profile_name": "cpu-x2"}
    with pytest.raises(AirflowFailException, match="single-host profile"):
        render(benchmark, dag)
