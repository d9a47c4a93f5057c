"""Every manifest validated offline: Jobs against Kubernetes' batch/v1 schema (strict), Kueue objects against
their CRD schemas; checked-in files must match the generators; preflight finds inadmissible profiles."""

from __future__ import annotations

import copy
import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml
from gemma_pipeline.plan import jobspec, kueue, manifests, profiles
from gemma_pipeline.tools import generate, preflight

from jobs.contract import layout, stages
from jobs.contract.layout import RunLayout
from tests.conftest import ROOT

SCHEMAS = ROOT / "tests" / "data" / "schemas" / "kueue-v0.19.2"
JOBSET_CRD = ROOT / "tests" / "data" / "schemas" / "jobset-v0.12.0" / "jobset.x-k8s.io_jobsets.yaml"
K8S_VERSION = "1.31"  # podFailurePolicy is GA here; GKE's regular channel is newer


def _closed(schema):
    """Reject unknown fields the way the API server prunes/refuses them, unless the CRD preserves them; Go's
    regular expressions spelled as Python reads them."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        pattern = schema.get("pattern")
        if isinstance(pattern, str) and "(?i)" in pattern[1:]:  # RE2 takes `^(?i)...`; Python wants flags first
            schema["pattern"] = "(?i)" + pattern.replace("(?i)", "")
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def _crd_validator(kind: str) -> jsonschema.Validator:
    if kind == "JobSet":
        crd, version_name = yaml.safe_load(JOBSET_CRD.read_text()), "v1alpha2"
    else:
        plural = {"ResourceFlavor": "resourceflavors", "ClusterQueue": "clusterqueues", "LocalQueue": "localqueues",
                  "WorkloadPriorityClass": "workloadpriorityclasses", "Topology": "topologies",
                  "AdmissionCheck": "admissionchecks", "ProvisioningRequestConfig": "provisioningrequestconfigs"}[kind]
        crd, version_name = yaml.safe_load((SCHEMAS / f"kueue.x-k8s.io_{plural}.yaml").read_text()), "v1beta2"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == version_name)
    schema = _closed(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def _validate_jobset(jobset):
    """The JobSet against its CRD (unknown fields refused), and its child Job against Kubernetes' batch/v1."""
    assert jobset["apiVersion"] == jobspec.JOBSET_API
    _crd_validator("JobSet").validate(jobset)
    [replicated] = jobset["spec"]["replicatedJobs"]
    child = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "child"}, "spec": replicated["template"]["spec"]}
    kubernetes_validate.validate(child, K8S_VERSION, strict=True)


def _validate_kueue(obj):
    """A Kueue object against its CRD; the admission policy that guards the `production` class against Kubernetes'."""
    if obj["apiVersion"].startswith("admissionregistration.k8s.io/"):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        return
    assert obj["apiVersion"] == "kueue.x-k8s.io/v1beta2"
    _crd_validator(obj["kind"]).validate(obj)


@pytest.mark.parametrize("target", list(generate.TARGETS))
def test_checked_in_generated_files_are_current(target):
    assert generate.stale(target) == []


def test_a_stale_generated_file_is_named(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "configuration.md").write_text((ROOT / "docs" / "configuration.md").read_text())
    assert generate.main(["write", "--root", str(tmp_path)]) == 0
    job = tmp_path / "k8s" / "jobs" / "base" / "finetune" / "job.yaml"
    job.write_text(job.read_text().replace("suspend: true", "suspend: false"))
    assert generate.main(["check", "--root", str(tmp_path)]) == 1
    assert "k8s/jobs/base/finetune/job.yaml" in capsys.readouterr().out


def _kustomize(path) -> list[dict]:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl (with kustomize) is needed to build the overlays")
    built = subprocess.run(["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True).stdout
    return list(yaml.safe_load_all(built))


def _overlay_job(stage: str) -> dict:
    objects = _kustomize(ROOT / "k8s" / "jobs" / "overlays" / "example" / stage)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "Job"], kinds
    return next(o for o in objects if o["kind"] == "Job")




@pytest.mark.parametrize("stage", jobspec.STAGES)
def test_job_manifests_validate_strictly(stage):
    job = _overlay_job(stage)
    assert job["metadata"]["namespace"] == "team-a" and job["metadata"]["name"] == f"gemma-{stage}-manual-001"
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GEMMA_BUCKET"]["valueFrom"]["configMapKeyRef"]["name"].startswith("gemma-pipeline-run-manual-001-")
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    spec = job["spec"]
    assert spec["suspend"] is True and spec["parallelism"] == 1
    assert job["metadata"]["labels"][jobspec.QUEUE_LABEL]
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert not container["image"].endswith(":latest") and ":" in container["image"].rsplit("/", 1)[-1]
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "stage", "operator": "In", "values": [2, 3, 4]}}
    assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"


def test_unknown_job_field_is_rejected():
    job = manifests.base_job("preprocess")
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


@pytest.mark.parametrize("profile", sorted(profiles.PROFILES))
def test_every_profile_builds_a_valid_job(profile):
    p = profiles.get(profile)
    settings = jobspec.JobSettings(namespace="team-a", queue="team-a-queue", service_account="sa", image="img:1.0", profile=p)
    job = jobspec.job_manifest("finetune", settings, jobspec.stage_args("finetune", {}, RunLayout.of("b", "run").stages()), name="x")
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    if p.accelerator_resource:
        assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][p.accelerator_resource] == p.requests[p.accelerator_resource]
    if p.multihost:
        _validate_jobset(jobspec.jobset_manifest(job, p))


@pytest.mark.parametrize("profile", sorted(n for n, p in profiles.PROFILES.items() if p.multihost))
def test_multihost_profiles_build_a_gang_jobset(profile):
    p = profiles.get(profile)
    settings = jobspec.JobSettings(namespace="team-a", queue="team-a-queue", service_account="sa", image="img:1.0", profile=p,
                                   priority_class="production")
    job = jobspec.job_manifest("finetune", settings, ["--max-steps", "2"], name="ft")
    jobset = jobspec.jobset_manifest(job, p)
    _validate_jobset(jobset)
    assert jobset["metadata"]["labels"][jobspec.QUEUE_LABEL] == "team-a-queue"  # Kueue admits the JobSet as one workload
    assert jobset["metadata"]["labels"][jobspec.PRIORITY_LABEL] == "production"
    spec = jobset["spec"]
    assert spec["suspend"] is True and spec["coordinator"] == {"replicatedJob": "hosts", "jobIndex": 0, "podIndex": 0}
    assert spec["network"]["enableDNSHostnames"] is True
    child = spec["replicatedJobs"][0]["template"]["spec"]
    assert (child["parallelism"], child["completions"], child["completionMode"]) == (p.hosts, p.hosts, "Indexed")
    assert child["backoffLimit"] == 0 and "suspend" not in child  # the JobSet restarts the whole group
    pod = child["template"]
    assert pod["metadata"].get("annotations", {}).get(jobspec.TOPOLOGY_ANNOTATION) == (p.topology_level or None)
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    if p.tpu:  # GKE injects TPU_WORKER_HOSTNAMES / TPU_WORKER_ID; JAX finds the coordinator from them
        assert jobspec.COORDINATOR_ENV not in env
    else:
        assert env[jobspec.NUM_PROCESSES_ENV]["value"] == str(p.hosts)
        assert jobspec.COORDINATOR_ANNOTATION in env[jobspec.COORDINATOR_ENV]["valueFrom"]["fieldRef"]["fieldPath"]
    rules = {r["name"]: r for r in spec["failurePolicy"]["rules"]}
    assert rules["NonRetriableExit"]["action"] == "FailJobSet" and rules["Disruption"]["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    assert (jobspec.DWS_RUN_ANNOTATION in jobset["metadata"].get("annotations", {})) == p.dws


def test_failure_policy_patterns_match_kubernetes_wording():
    """The JobSet rules read the child Job's failure message; these are the Job controller's own phrasings."""
    import re

    [exit_rule, disruption_rule, deadline_rule] = jobspec.jobset_failure_policy(3)["rules"]
    assert deadline_rule["action"] == "FailJobSet" and deadline_rule["onJobFailureReasons"] == ["DeadlineExceeded"]
    exit_message = "Container stage for pod team-a/ft-hosts-0-0-abcde failed with exit code 2 matching FailJob rule at index 0"
    disrupted = "Pod team-a/ft-hosts-0-1-fghij has condition DisruptionTarget matching FailJob rule at index 1"
    crashed = "Container stage for pod team-a/ft-hosts-0-0-abcde failed with exit code 143 matching FailJob rule at index 0"
    assert re.search(exit_rule["onJobFailureMessagePatterns"][0], exit_message)
    assert not re.search(exit_rule["onJobFailureMessagePatterns"][0], disrupted + crashed.replace("143", "1"))
    assert re.search(disruption_rule["onJobFailureMessagePatterns"][0], disrupted)


def test_a_jobset_with_an_unknown_field_is_rejected():
    p = profiles.get("gpu-h100-8x2")
    settings = jobspec.JobSettings(namespace="n", queue="q", service_account="sa", image="img:1.0", profile=p)
    jobset = jobspec.jobset_manifest(jobspec.job_manifest("finetune", settings, [], name="ft"), p)
    jobset["spec"]["coordinatorr"] = jobset["spec"].pop("coordinator")
    with pytest.raises(jsonschema.ValidationError):
        _crd_validator("JobSet").validate(jobset)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_the_kubectl_multihost_overlay_builds_a_valid_jobset():
    objects = _kustomize(ROOT / "k8s" / "jobs" / "overlays" / "example" / "finetune-multihost")
    config = next(o for o in objects if o["kind"] == "ConfigMap")
    [jobset] = [o for o in objects if o["kind"] == "JobSet"]
    _validate_jobset(jobset)
    assert jobset["metadata"]["namespace"] == "team-a"
    pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == f"{manifests.EXAMPLE['registry']}/finetune:{manifests.EXAMPLE['tag']}"
    refs = [e["valueFrom"]["configMapKeyRef"]["name"] for e in container["env"] if "configMapKeyRef" in e.get("valueFrom", {})]
    assert refs and set(refs) == {config["metadata"]["name"]}  # the hashed name reached the JobSet's pods


def test_kueue_objects_validate_against_crds():
    objects = kueue.base_objects()
    kinds = {o["kind"] for o in objects}
    assert kinds == {"ResourceFlavor", "ClusterQueue", "LocalQueue", "WorkloadPriorityClass", "Topology",
                     "AdmissionCheck", "ProvisioningRequestConfig", "ValidatingAdmissionPolicy",
                     "ValidatingAdmissionPolicyBinding"}
    for obj in objects:
        _validate_kueue(obj)
    broken = copy.deepcopy(next(o for o in objects if o["kind"] == "ClusterQueue"))
    broken["spec"]["cohort"] = "old-v1beta1-name"
    with pytest.raises(jsonschema.ValidationError):
        _validate_kueue(broken)


def test_flavors_match_profiles_and_teams_share_a_cohort():
    objects = kueue.base_objects()
    flavor_labels = [o["spec"]["nodeLabels"] for o in objects if o["kind"] == "ResourceFlavor"]
    for profile in profiles.PROFILES.values():
        assert profile.node_selector in flavor_labels, profile.name
    queues = [o for o in objects if o["kind"] == "ClusterQueue" and o["metadata"]["name"] != kueue.SERVING["queue"]]
    assert len(queues) >= 2 and {q["spec"]["cohortName"] for q in queues} == {kueue.COHORT}
    assert all(q["spec"]["preemption"]["reclaimWithinCohort"] == "Any" for q in queues)
    assert {o["metadata"]["namespace"] for o in objects if o["kind"] == "LocalQueue"} == {*kueue.TEAMS, kueue.SERVING["namespace"]}
    # Serving's queue is outside the cohort (training neither borrows its quota nor reclaims it) and its
    # priority is above every training priority.
    serving = next(o for o in objects if o["metadata"]["name"] == kueue.SERVING["queue"])
    assert "cohortName" not in serving["spec"] and "preemption" not in serving["spec"]
    values = {o["metadata"]["name"]: o["value"] for o in objects if o["kind"] == "WorkloadPriorityClass"}
    assert values["serving"] > max(v for k, v in values.items() if k != "serving")


def test_the_cluster_refuses_production_priority_outside_the_namespaces_allowed_it():
    policy, binding = kueue.production_policy()
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    assert {(r["apiGroups"][0], r["resources"][0]) for r in rules} == {("batch", "jobs"), ("jobset.x-k8s.io", "jobsets")}
    (check,) = policy["spec"]["validations"]
    assert f"'{jobspec.PRIORITY_LABEL}'" in check["expression"] and "!= 'production'" in check["expression"]
    assert policy["spec"]["failurePolicy"] == "Fail" and binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    # A namespace without the label is matched (NotIn selects it), so the policy applies there.
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == [
        {"key": kueue.PRODUCTION_NAMESPACE_LABEL, "operator": "NotIn", "values": ["allowed"]}]


def test_multihost_and_flex_start_flavors():
    """Each multi-host profile's flavor names a Topology that has the profile's placement level; the flex-start
    flavors, and only they, carry the ProvisioningRequest admission check."""
    objects = kueue.base_objects()
    flavors = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ResourceFlavor"}
    topologies = {o["metadata"]["name"]: [lvl["nodeLabel"] for lvl in o["spec"]["levels"]] for o in objects if o["kind"] == "Topology"}
    for profile in profiles.PROFILES.values():
        flavor = flavors[kueue.flavor_name(profile)]
        assert flavor["spec"]["nodeLabels"] == profile.node_selector
        if profile.topology_level:
            assert profile.topology_level in topologies[flavor["spec"]["topologyName"]], profile.name
    dws = {kueue.flavor_name(p) for p in profiles.PROFILES.values() if p.dws}
    queues = [o for o in objects if o["kind"] == "ClusterQueue" and "cohortName" in o["spec"]]
    for queue in queues:
        [check] = queue["spec"]["admissionChecksStrategy"]["admissionChecks"]
        assert check["name"] == kueue.DWS_CHECK and set(check["onFlavors"]) == dws
    assert all({"key": profiles.QUEUED, "value": "true", "effect": "NoSchedule"} in flavors[f]["spec"]["nodeTaints"] for f in dws)
    check = next(o for o in objects if o["kind"] == "AdmissionCheck")
    assert check["spec"]["parameters"]["name"] == next(o for o in objects if o["kind"] == "ProvisioningRequestConfig")["metadata"]["name"]
    # Quota holds the largest profile of a flavor whole: all hosts at once.
    quota = {r["name"]: r["nominalQuota"] for r in kueue._quota("tpu-v5e-16", 1.0)["resources"]}
    assert quota["google.com/tpu"] == "16"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
@pytest.mark.parametrize("overlay", ["base", "overlays/dev", "overlays/production"])
def test_kustomize_builds_validate(overlay):
    built = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "kueue" / overlay)], check=True, capture_output=True, text=True).stdout
    objects = [o for o in yaml.safe_load_all(built) if o]
    assert len(objects) == len(kueue.base_objects())
    for obj in objects:
        _validate_kueue(obj)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
@pytest.mark.parametrize("overlay", sorted(kueue.OVERLAYS))
def test_overlays_are_quota_patches_that_give_the_scaled_queues(overlay, tmp_path):
    path = ROOT / "k8s" / "kueue" / "overlays" / overlay
    assert sorted(p.name for p in path.iterdir()) == ["kustomization.yaml", "quota-patch.yaml"]
    built = [o for o in yaml.safe_load_all(subprocess.run(["kubectl", "kustomize", str(path)], check=True, capture_output=True,
                                                           text=True).stdout) if o]
    queues = {o["metadata"]["name"]: o for o in built if o["kind"] == "ClusterQueue"}
    assert queues == {**{f"{t}-cq": kueue.cluster_queue(t, kueue.OVERLAYS[overlay]) for t in kueue.TEAMS},
                      kueue.SERVING["queue"]: kueue.serving_objects()[0]}  # serving's quota is not scaled
    # The patch refuses to apply to a base whose flavors were reordered.
    shutil.copytree(ROOT / "k8s" / "kueue", tmp_path / "kueue")
    base = tmp_path / "kueue" / "base" / "kueue.yaml"
    objects = [o for o in yaml.safe_load_all(base.read_text()) if o]
    for o in objects:
        if o["kind"] == "ClusterQueue":
            o["spec"]["resourceGroups"][0]["flavors"].reverse()
    base.write_text(yaml.safe_dump_all(objects))
    broken = subprocess.run(["kubectl", "kustomize", str(tmp_path / "kueue" / "overlays" / overlay)], capture_output=True, text=True)
    assert broken.returncode != 0 and "test" in broken.stderr.lower()


def test_preflight():
    objects = kueue.base_objects()
    ok = preflight.check("tpu-v5e-8", "team-a", "team-a-queue", objects)
    assert ok.ok and ok.flavor == "tpu-v5e-8"
    assert preflight.check("tpu-v5e-8-spot", "team-b", "team-b-queue", objects).ok
    assert preflight.check("cpu", "team-a", "team-a-queue", objects).flavor == "cpu"
    small = [o for o in objects if o["kind"] != "ClusterQueue"] + [kueue.cluster_queue(t, 0.25) for t in kueue.TEAMS]
    too_big = preflight.check("tpu-v5e-8", "team-a", "team-a-queue", small)
    assert not too_big.ok and "google.com/tpu needs 8 but nominal quota is 2" in too_big.message
    missing = preflight.check("gpu-l4-1", "team-a", "no-such-queue", objects)
    assert not missing.ok and "no LocalQueue team-a/no-such-queue" in missing.message
    no_flavor = [o for o in objects if not (o["kind"] == "ResourceFlavor" and o["metadata"]["name"].startswith("gpu-h100"))]
    gone = preflight.check("gpu-h100-1", "team-a", "team-a-queue", no_flavor)
    assert not gone.ok and "gpu-h100: no such ResourceFlavor" in gone.message
    assert "expected one of" in preflight.check("tpu-v9-1", "team-a", "team-a-queue", objects).message


def test_preflight_for_multihost_and_flex_start_profiles():
    objects = kueue.base_objects()
    assert preflight.check("gpu-h100-8x2", "team-a", "team-a-queue", objects).flavor == "gpu-h100"
    assert preflight.check("tpu-v5e-16-dws", "team-a", "team-a-queue", objects).flavor == "tpu-v5e-16-dws"
    small = [o for o in objects if o["kind"] != "ClusterQueue"] + [kueue.cluster_queue(t, 0.25) for t in kueue.TEAMS]
    gang = preflight.check("tpu-v5e-16", "team-a", "team-a-queue", small)  # 4 hosts x 4 chips against quota 4
    assert not gang.ok and "google.com/tpu needs 4 x 4 but nominal quota is 4" in gang.message
    no_level = [o for o in objects if o["kind"] != "Topology"] + [
        kueue.topology("gke-tpu-slice", ["kubernetes.io/hostname"]), kueue.topology("gke-gpu", ["kubernetes.io/hostname"])]
    level = preflight.check("tpu-v6e-16", "team-a", "team-a-queue", no_level)
    assert not level.ok and "Topology gke-tpu-slice has no level cloud.google.com/gke-nodepool" in level.message
    no_check = [o for o in objects if o["kind"] != "ClusterQueue"] + [
        {**q, "spec": {k: v for k, v in q["spec"].items() if k != "admissionChecksStrategy"}}
        for q in objects if q["kind"] == "ClusterQueue"]
    dws = preflight.check("gpu-h100-8x2-dws", "team-a", "team-a-queue", no_check)
    assert not dws.ok and "no ProvisioningRequest admission check" in dws.message


def test_quantities():
    assert preflight.quantity("16Gi") == 16 * 2**30 and preflight.quantity("500m") == 0.5 and preflight.quantity(8) == 8
    with pytest.raises(ValueError):
        preflight.quantity("lots")


def test_run_ids_are_made_safe():
    assert layout.safe_run_id("manual__2026-11-22T10:00:00+00:00") == "manual-2026-11-22t10-00-00-00-00"
    assert RunLayout.of("b", layout.safe_run_id("Run/../x")).stage("finetune") == "gs://b/runs/run-x/candidates/default/finetune"
    assert RunLayout.of("b", layout.safe_run_id("Run/../x")).stage("preprocess") == "gs://b/runs/run-x/preprocess"


@pytest.mark.parametrize("stage", stages.NAMES)
def test_the_dag_task_submits_the_jobspec_job(stage, dag):
    """One builder, two doors: the Job the DAG's task hands the provider is `jobspec.job_manifest` of its plan, with
    the name and the pod labels the provider gives every task; k8s/jobs renders the same builder
    (test_checked_in_job_manifests_are_current)."""
    from kubernetes.client import ApiClient

    from tests.support.dag import render, render_fields, stage_task

    bag_dag = dag
    overrides = {"bucket": "bkt", "run_name": "r1", "finetune_profile": "gpu-l4-1"}
    task = stage_task(bag_dag, stage, overrides)
    dag_job = ApiClient().sanitize_for_serialization(render(task, bag_dag, overrides))
    rendered, context = render_fields(task, bag_dag, overrides)
    rendered.__dict__["hook"] = None
    rendered._apply_plan()
    expected = jobspec.job_manifest(stage, rendered.job_settings(), list(rendered.arguments), name=dag_job["metadata"]["name"],
                                    labels=rendered.labels, pod_labels=rendered._get_ti_pod_labels(context))
    assert dag_job == expected
    assert dag_job["metadata"]["name"].startswith(f"job-gemma-{stage}-")
