"""The preflight's live mode against a fake Kubernetes API at the client's boundary: CustomObjectsApi, CoreV1Api and
BatchV1Api stand-ins with the real methods' signatures (checked below), serving the repository's own Kueue objects
(k8s/kueue/base/kueue.yaml) with a status block as Kueue writes it, and real `kubernetes.client` models for
events and Jobs. Also the CLI: its modes, its exit statuses and the options it refuses.

Nothing here talks to a cluster; the live mode has run only against these fakes."""

from __future__ import annotations

import copy
import inspect
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from gemma_pipeline.tools import preflight, preflight_live
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.conftest import ROOT

BASE = ROOT / "k8s" / "kueue" / "base" / "kueue.yaml"
SCHEMAS = ROOT / "tests" / "data" / "schemas" / "kueue-v0.19.2"
PLURALS = {"localqueues": "LocalQueue", "clusterqueues": "ClusterQueue", "resourceflavors": "ResourceFlavor",
           "topologies": "Topology", "admissionchecks": "AdmissionCheck",
           "provisioningrequestconfigs": "ProvisioningRequestConfig", "workloads": "Workload"}
T0 = "2026-03-01T10:00:00Z"
PENDING = ("couldn't assign flavors to pod set main: insufficient unused quota for google.com/tpu in flavor tpu-v5e-8, "
           "8 more needed")


def _not_found(what: str) -> ApiException:
    return ApiException(status=404, reason=f"Not Found: {what}")


class FakeCustomObjects:
    """CustomObjectsApi's read calls over a list of objects; a missing object, or a group/version the cluster does
    not serve, is a 404 as from the API server; `errors` maps a plural to the status every call on it answers."""

    def __init__(self, objects: list[dict[str, Any]], served: bool = True, errors: dict[str, int] | None = None) -> None:
        self.objects, self.served, self.errors = objects, served, errors or {}
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def _select(self, group: str, version: str, plural: str, namespace: str) -> list[dict[str, Any]]:
        if plural in self.errors:
            raise ApiException(status=self.errors[plural], reason="Forbidden")
        if not self.served or (group, version) != ("kueue.x-k8s.io", "v1beta2") or plural not in PLURALS:
            raise _not_found(f"{group}/{version} {plural}")
        return [o for o in self.objects
                if o["kind"] == PLURALS[plural] and o["metadata"].get("namespace", "") == namespace]

    def _get(self, group: str, version: str, plural: str, namespace: str, name: str) -> dict[str, Any]:
        found = [o for o in self._select(group, version, plural, namespace) if o["metadata"]["name"] == name]
        if not found:
            raise _not_found(f"{plural} {name}")
        return copy.deepcopy(found[0])

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self.calls.append(("get_namespaced_custom_object", (group, version, namespace, plural, name), kwargs))
        return self._get(group, version, plural, namespace, name)

    def get_cluster_custom_object(self, group, version, plural, name, **kwargs):
        self.calls.append(("get_cluster_custom_object", (group, version, plural, name), kwargs))
        return self._get(group, version, plural, "", name)

    def list_namespaced_custom_object(self, group, version, namespace, plural, **kwargs):
        self.calls.append(("list_namespaced_custom_object", (group, version, namespace, plural), kwargs))
        assert "label_selector" not in kwargs, "the fake does not filter by labels; the code under test must not rely on it"
        return {"apiVersion": f"{group}/{version}", "items": copy.deepcopy(self._select(group, version, plural, namespace))}


class FakeCore:
    """CoreV1Api.list_namespaced_event with the field selector the API server understands for events."""

    def __init__(self, events: list[client.CoreV1Event]) -> None:
        self.events = events
        self.selectors: list[str] = []

    def list_namespaced_event(self, namespace, **kwargs):
        selector = kwargs.get("field_selector", "")
        self.selectors.append(selector)
        wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        assert set(wanted) <= {"involvedObject.name", "involvedObject.kind"}, selector
        items = [e for e in self.events if e.metadata.namespace == namespace
                 and e.involved_object.name == wanted.get("involvedObject.name", e.involved_object.name)]
        return client.CoreV1EventList(items=items)


class FakeBatch:
    """BatchV1Api.list_namespaced_job with equality label selectors (`a=b,c=d`)."""

    def __init__(self, jobs: list[client.V1Job]) -> None:
        self.jobs = jobs

    def list_namespaced_job(self, namespace, **kwargs):
        wanted = dict(term.split("=", 1) for term in kwargs.get("label_selector", "").split(",") if term)
        return client.V1JobList(items=[j for j in self.jobs if j.metadata.namespace == namespace
                                       and wanted.items() <= (j.metadata.labels or {}).items()])


def base_objects() -> list[dict[str, Any]]:
    """The repository's Kueue objects as the cluster serves them: with the status Kueue writes."""
    objects = [o for o in yaml.safe_load_all(BASE.read_text()) if o]
    for obj in objects:
        if obj["kind"] == "ClusterQueue":
            reserved = [{"name": f["name"], "resources": [{"name": r["name"], "total": "0", "borrowed": "0"} for r in f["resources"]]}
                        for group in obj["spec"]["resourceGroups"] for f in group["flavors"]]
            obj["status"] = {"pendingWorkloads": 0, "reservingWorkloads": 0, "admittedWorkloads": 0,
                             "flavorsReservation": reserved, "flavorsUsage": copy.deepcopy(reserved),
                             "conditions": [active(True, "Ready", "Can admit new workloads")]}
        if obj["kind"] == "LocalQueue":
            obj["status"] = {"pendingWorkloads": 0, "reservingWorkloads": 0, "admittedWorkloads": 0,
                             "conditions": [active(True, "Ready", "Can submit new workloads to localQueue")]}
    return objects


def active(status: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": "Active", "status": str(status), "reason": reason, "message": message, "lastTransitionTime": T0}


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def workload(name: str, owner: str, uid: str, conditions: list[dict[str, Any]], owner_kind: str = "Job") -> dict[str, Any]:
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
            "metadata": {"name": name, "namespace": "team-a", "labels": {"kueue.x-k8s.io/job-uid": uid},
                         "ownerReferences": [{"apiVersion": "batch/v1" if owner_kind == "Job" else "jobset.x-k8s.io/v1alpha2",
                                              "kind": owner_kind, "name": owner, "uid": uid,
                                              "controller": True, "blockOwnerDeletion": True}]},
            "spec": {"queueName": "team-a-queue", "active": True, "podSets": [{"name": "main", "count": 1, "template": {
                "spec": {"containers": [{"name": "stage", "image": "stage:1",
                                         "resources": {"requests": {"google.com/tpu": "8"}}}]}}}]},
            "status": {"conditions": conditions}}


def condition(kind: str, status: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": str(status), "reason": reason, "message": message, "lastTransitionTime": T0}


def event(involved: str, reason: str, message: str, minute: int, kind: str = "Workload", count: int = 1) -> client.CoreV1Event:
    at = datetime(2026, 3, 1, 10, minute, tzinfo=UTC)
    return client.CoreV1Event(
        metadata=client.V1ObjectMeta(name=f"{involved}.{minute}", namespace="team-a"),
        involved_object=client.V1ObjectReference(kind=kind, name=involved, namespace="team-a"),
        reason=reason, message=message, type="Normal", count=count, first_timestamp=at, last_timestamp=at)


def run(capsys, monkeypatch, custom: FakeCustomObjects, argv: list[str], core: FakeCore | None = None,
        batch: FakeBatch | None = None) -> tuple[int, str, str]:
    """The CLI with the kubeconfig step replaced by the fakes: everything past the client boundary is real."""
    contexts: list[str | None] = []
    monkeypatch.setattr(preflight_live, "clients", lambda context: contexts.append(context) or (custom, core or FakeCore([]), batch or FakeBatch([])))
    code = preflight.main(["--namespace", "team-a", "--queue", "team-a-queue", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fakes_have_the_real_clients_signatures():
    """A fake that drifts from the client (a renamed or reordered parameter) fails here, not on a cluster."""
    pairs = [(FakeCustomObjects, client.CustomObjectsApi), (FakeCore, client.CoreV1Api), (FakeBatch, client.BatchV1Api)]
    checked = []
    for fake, real in pairs:
        methods = [m for m in vars(fake) if not m.startswith("_")]
        assert methods, fake
        for method in methods:
            ours, theirs = inspect.signature(getattr(fake, method)), inspect.signature(getattr(real, method))
            assert [(p.name, p.kind) for p in ours.parameters.values()] == [(p.name, p.kind) for p in theirs.parameters.values()], method
            checked.append(method)
    assert {"get_namespaced_custom_object", "get_cluster_custom_object", "list_namespaced_custom_object",
            "list_namespaced_event", "list_namespaced_job"} <= set(checked)


@pytest.mark.parametrize("kind", ["ClusterQueue", "LocalQueue"])
def test_fake_objects_match_kueues_schema(kind):
    """The status blocks the fake serves are ones Kueue v0.19's v1beta2 schema accepts (unknown fields refused)."""
    crd = yaml.safe_load((SCHEMAS / f"kueue.x-k8s.io_{kind.lower()}s.yaml").read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta2")["schema"]["openAPIV3Schema"]
    status = schema["properties"]["status"]
    closed = {**schema, "properties": {**schema["properties"], "status": {**status, "additionalProperties": False}}}
    objects = [o for o in base_objects() if o["kind"] == kind]
    assert objects
    for obj in objects:
        jsonschema.Draft7Validator(closed).validate(obj)
        assert set(obj["status"]) <= set(status["properties"])


def test_admissible_reads_the_queue_and_exits_0(capsys, monkeypatch):
    custom = FakeCustomObjects(base_objects())
    code, out, _ = run(capsys, monkeypatch, custom, ["--profile", "tpu-v5e-8", "--context", "gke-dev"])
    assert code == 0, out
    assert out.startswith("OK: profile tpu-v5e-8 fits flavor tpu-v5e-8 of ClusterQueue team-a-cq and its quota is free now")
    assert "quota on flavor tpu-v5e-8: " in out and "requested 8 google.com/tpu, nominal 8, in use 0" in out
    assert "ClusterQueue team-a-cq: active; 0 pending" in out
    reads = {(call[0], call[1][-2], call[1][-1]) for call in custom.calls if call[0].startswith("get")}
    assert ("get_namespaced_custom_object", "localqueues", "team-a-queue") in reads
    assert ("get_cluster_custom_object", "resourceflavors", "tpu-v5e-8") in reads
    assert ("get_cluster_custom_object", "provisioningrequestconfigs", "dws-config") in reads  # named by the DWS check
    assert all(call[1][:2] == ("kueue.x-k8s.io", "v1beta2") for call in custom.calls)


def test_live_mode_runs_the_same_spec_check_as_offline(capsys, monkeypatch):
    """A flex-start profile needs the ProvisioningRequest check, read live through the AdmissionCheck."""
    objects = [o for o in base_objects() if o["kind"] != "ProvisioningRequestConfig"]
    code, out, _ = run(capsys, monkeypatch, FakeCustomObjects(objects), ["--profile", "tpu-v5e-16-dws", "--live"])
    assert code == 1
    assert out.startswith("NOT ADMISSIBLE: profile tpu-v5e-16-dws can never be admitted by ClusterQueue team-a-cq")
    assert "names ProvisioningRequestConfig dws-config, which does not exist" in out
    assert out.splitlines()[0].split(": ", 1)[1] == preflight.check("tpu-v5e-16-dws", "team-a", "team-a-queue", objects).message


def test_inactive_cluster_queue(capsys, monkeypatch):
    objects = base_objects()
    message = "Can't admit new workloads: references missing ResourceFlavor(s): tpu-v5e-8."
    named(objects, "ClusterQueue", "team-a-cq")["status"]["conditions"] = [active(False, "FlavorNotFound", message)]
    named(objects, "LocalQueue", "team-a-queue")["status"]["conditions"] = [
        active(False, "ClusterQueueIsInactive", "Can't submit new workloads to clusterQueue")]
    code, out, _ = run(capsys, monkeypatch, FakeCustomObjects(objects), ["--profile", "tpu-v5e-8"])
    assert code == 1
    assert out.splitlines()[0] == f"NOT ADMISSIBLE: ClusterQueue team-a-cq is inactive: FlavorNotFound: {message}"
    assert "LocalQueue team-a/team-a-queue: inactive (ClusterQueueIsInactive: " in out


def test_quota_held_by_other_workloads(capsys, monkeypatch):
    objects = base_objects()
    status = named(objects, "ClusterQueue", "team-a-cq")["status"]
    status.update(reservingWorkloads=1, admittedWorkloads=1, pendingWorkloads=1)
    flavor = next(f for f in status["flavorsReservation"] if f["name"] == "tpu-v5e-8")
    next(r for r in flavor["resources"] if r["name"] == "google.com/tpu")["total"] = "4"  # 8 requested, 4 of 8 free
    code, out, _ = run(capsys, monkeypatch, FakeCustomObjects(objects), ["--profile", "tpu-v5e-8"])
    assert code == 1
    assert out.splitlines()[0] == ("WAITING: quota: requested 8 google.com/tpu, nominal 8, in use 4 by 1 workload(s) holding "
                                   "quota (ClusterQueue team-a-cq is in cohort ml-platform, which may lend unused quota; not read here)")
    assert "cpu, nominal" not in out.splitlines()[0]  # only the short resource is named in the diagnosis
    assert "ClusterQueue team-a-cq: active; 1 pending, 1 holding quota, 1 admitted workload(s)" in out


def test_pending_workload_with_its_condition_and_events(capsys, monkeypatch):
    objects = base_objects() + [
        workload("job-gemma-finetune-x-3f2a1", "gemma-finetune-x", "uid-1", [condition("QuotaReserved", False, "Pending", PENDING)]),
        workload("job-other-9d8c7", "other", "uid-2", [condition("QuotaReserved", False, "Pending", "not this one")]),
    ]
    core = FakeCore([event("job-gemma-finetune-x-3f2a1", "Pending", PENDING, 1, count=3),
                     event("job-other-9d8c7", "Pending", "not this one", 2),
                     event("gemma-finetune-x", "CreatedWorkload", "Created Workload: team-a/job-gemma-finetune-x-3f2a1", 0, kind="Job")])
    code, out, _ = run(capsys, monkeypatch, FakeCustomObjects(objects), ["--profile", "tpu-v5e-8", "--job", "gemma-finetune-x"], core=core)
    assert code == 1
    assert out.splitlines()[0] == f"WAITING: Workload job-gemma-finetune-x-3f2a1 pending: {PENDING}"
    assert f"Workload team-a/job-gemma-finetune-x-3f2a1: QuotaReserved=False (Pending: {PENDING})" in out
    assert f"event Normal Pending: {PENDING} (x3)" in out
    assert "not this one" not in out  # another Job's Workload and its events are left out
    assert core.selectors == ["involvedObject.name=job-gemma-finetune-x-3f2a1"]


def test_admitted_workload_is_ok_although_its_own_usage_fills_the_quota(capsys, monkeypatch):
    objects = base_objects() + [workload("job-gemma-finetune-x-3f2a1", "gemma-finetune-x", "uid-1", [
        condition("QuotaReserved", True, "QuotaReserved", "Quota reserved in ClusterQueue team-a-cq"),
        condition("Admitted", True, "Admitted", "The workload is admitted")])]
    status = named(objects, "ClusterQueue", "team-a-cq")["status"]
    flavor = next(f for f in status["flavorsReservation"] if f["name"] == "tpu-v5e-8")
    next(r for r in flavor["resources"] if r["name"] == "google.com/tpu")["total"] = "8"
    code, out, _ = run(capsys, monkeypatch, FakeCustomObjects(objects), ["--profile", "tpu-v5e-8", "--job", "gemma-finetune-x"])
    assert code == 0, out
    assert out.splitlines()[0] == "OK: the Workload of Job gemma-finetune-x is admitted by ClusterQueue team-a-cq"
    assert "quota on flavor" not in out  # its own 8 chips in use are not reported as a shortage


def test_selector_finds_the_workloads_of_a_runs_jobs(capsys, monkeypatch):
    """Kueue does not copy a Job's labels to its Workload: the selector picks Jobs, their uids pick Workloads (a
    JobSet's child Job stands for the JobSet, which owns the Workload)."""
    labels = {"gemma-lora-pipeline/run": "demo", "gemma-lora-pipeline/stage": "finetune"}
    jobset_ref = client.V1OwnerReference(api_version="jobset.x-k8s.io/v1alpha2", kind="JobSet", name="gemma-finetune-mh", uid="uid-js")
    jobs = [client.V1Job(metadata=client.V1ObjectMeta(name="gemma-finetune-x", namespace="team-a", uid="uid-1", labels=labels)),
            client.V1Job(metadata=client.V1ObjectMeta(name="gemma-finetune-mh-workers-0", namespace="team-a", uid="uid-c",
                                                      labels=labels, owner_references=[jobset_ref])),
            client.V1Job(metadata=client.V1ObjectMeta(name="gemma-benchmark-x", namespace="team-a", uid="uid-3",
                                                      labels={**labels, "gemma-lora-pipeline/stage": "benchmark"}))]
    objects = base_objects() + [
        workload("job-gemma-finetune-x-3f2a1", "gemma-finetune-x", "uid-1", [condition("QuotaReserved", False, "Pending", PENDING)]),
        workload("jobset-gemma-finetune-mh-1b2c3", "gemma-finetune-mh", "uid-js", [condition("QuotaReserved", False, "Pending", "gang")], "JobSet"),
        workload("job-gemma-benchmark-x-77aa1", "gemma-benchmark-x", "uid-3", [condition("QuotaReserved", False, "Pending", "benchmark")]),
    ]
    selector = "gemma-lora-pipeline/run=demo,gemma-lora-pipeline/stage=finetune"
    code, out, _ = run(capsys, monkeypatch, FakeCustomObjects(objects), ["--profile", "tpu-v5e-8", "--selector", selector],
                       batch=FakeBatch(jobs))
    assert code == 1
    assert "Workload team-a/job-gemma-finetune-x-3f2a1:" in out and "Workload team-a/jobset-gemma-finetune-mh-1b2c3:" in out
    assert "benchmark" not in out
    code, _, err = run(capsys, monkeypatch, FakeCustomObjects(objects), ["--profile", "tpu-v5e-8", "--selector", "gemma-lora-pipeline/run=nope"],
                       batch=FakeBatch(jobs))
    assert code == 2 and "no Job in namespace team-a matches 'gemma-lora-pipeline/run=nope'" in err


def test_job_without_a_workload(capsys, monkeypatch):
    core = FakeCore([event("gemma-finetune-x", "Suspended", "Kueue did not create a Workload", 0, kind="Job")])
    code, out, _ = run(capsys, monkeypatch, FakeCustomObjects(base_objects()), ["--profile", "cpu", "--job", "gemma-finetune-x"], core=core)
    assert code == 1
    assert out.startswith("WAITING: no Workload in team-a is owned by Job gemma-finetune-x: Kueue has not seen it")
    assert "event Normal Suspended: Kueue did not create a Workload" in out  # the Job's own events, the only clue left


def test_missing_queue_names_namespace_queue_and_the_known_ones(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, FakeCustomObjects(base_objects()), ["--profile", "cpu", "--queue", "no-such-queue"])
    assert code == 2 and out == ""
    assert err.strip() == "ERROR: queue: no LocalQueue team-a/no-such-queue in the cluster; known in namespace team-a: team-a/team-a-queue"


def test_a_404_becomes_a_message_not_a_traceback(capsys, monkeypatch):
    objects = [o for o in base_objects() if o["kind"] != "ClusterQueue"]  # the LocalQueue points at a deleted ClusterQueue
    code, out, _ = run(capsys, monkeypatch, FakeCustomObjects(objects), ["--profile", "cpu"])
    assert code == 1
    assert out.splitlines()[0] == ("NOT ADMISSIBLE: LocalQueue team-a/team-a-queue points at ClusterQueue team-a-cq, "
                                   "which does not exist")
    code, out, err = run(capsys, monkeypatch, FakeCustomObjects(base_objects(), served=False), ["--profile", "cpu"])
    assert code == 2 and out == ""
    assert err.strip() == ("ERROR: the cluster does not serve kueue.x-k8s.io/v1beta2 LocalQueues: is Kueue installed, "
                           "at a version that serves v1beta2?")
    code, out, err = run(capsys, monkeypatch, FakeCustomObjects(base_objects(), errors={"clusterqueues": 403}), ["--profile", "cpu"])
    assert code == 2 and "ERROR: reading ClusterQueue team-a-cq: the API answered 403 Forbidden (your account needs" in err
    assert "Traceback" not in out + err


def test_no_kubeconfig_is_a_message(capsys, monkeypatch, tmp_path):
    from kubernetes.config import kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code = preflight.main(["--profile", "cpu", "--namespace", "team-a", "--queue", "team-a-queue"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ERROR: kubeconfig: ") and "expected a kubeconfig with a current context" in err


@pytest.mark.parametrize("argv", [
    ["--bogus"],
    ["--liv"],  # abbreviations are refused: a typo must not pick an option
    ["--kueue", "k8s/kueue/base", "--live"],
    ["--kueue", "k8s/kueue/base", "--job", "x"],
    ["--job", "x", "--selector", "a=b"],
])
def test_cli_refuses_unknown_and_conflicting_options(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        preflight.main(["--profile", "cpu", "--namespace", "team-a", "--queue", "team-a-queue", *argv])
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_unknown_profile_exits_2_before_the_cluster_is_read(capsys, monkeypatch):
    monkeypatch.setattr(preflight_live, "clients", lambda context: pytest.fail("the cluster was contacted"))
    code = preflight.main(["--profile", "tpu-v9-1", "--namespace", "team-a", "--queue", "team-a-queue"])
    assert code == 2 and "expected one of" in capsys.readouterr().err


def test_offline_mode_exit_statuses(capsys, tmp_path: Path):
    objects = [o for o in yaml.safe_load_all(BASE.read_text()) if o]
    for obj in objects:
        if obj["kind"] == "ClusterQueue":
            for group in obj["spec"]["resourceGroups"]:
                for entry in group["flavors"]:
                    for resource in entry["resources"]:
                        if resource["name"] == "google.com/tpu" and entry["name"] == "tpu-v5e-8":
                            resource["nominalQuota"] = "4"
    small = tmp_path / "kueue.yaml"
    small.write_text(yaml.safe_dump_all(objects))
    args = ["--namespace", "team-a", "--queue", "team-a-queue", "--kueue", str(small)]
    assert preflight.main(["--profile", "cpu", *args]) == 0
    assert preflight.main(["--profile", "tpu-v5e-8", *args]) == 1
    assert "google.com/tpu needs 8 but nominal quota is 4" in capsys.readouterr().out
    assert preflight.main(["--profile", "cpu", *args[:2], "--queue", "nope", *args[4:]]) == 2
    assert preflight.main(["--profile", "cpu", *args[:4], "--kueue", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
