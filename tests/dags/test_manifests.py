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
from gemma_pipeline import jobspec, kueue, manifests, preflight, profiles

from tests.conftest import ROOT

SCHEMAS = ROOT / "tests" / "data" / "schemas" / "kueue-v0.19.2"
K8S_VERSION = "1.31"  # podFailurePolicy is GA here; GKE's regular channel is newer


def _closed(schema):
    """Reject unknown fields the way the API server prunes/refuses them, unless the CRD preserves them."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def _crd_validator(kind: str) -> jsonschema.Validator:
    plural = {"ResourceFlavor": "resourceflavors", "ClusterQueue": "clusterqueues", "LocalQueue": "localqueues",
              "WorkloadPriorityClass": "workloadpriorityclasses"}[kind]
    crd = yaml.safe_load((SCHEMAS / f"kueue.x-k8s.io_{plural}.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta2")
    schema = _closed(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def _validate_kueue(obj):
    assert obj["apiVersion"] == "kueue.x-k8s.io/v1beta2"
    _crd_validator(obj["kind"]).validate(obj)


def test_checked_in_job_manifests_are_current(tmp_path):
    assert manifests.main(["check", str(ROOT / "k8s" / "jobs")]) == 0
    manifests.main(["write", str(tmp_path)])
    (tmp_path / "02-finetune.yaml").write_text((tmp_path / "02-finetune.yaml").read_text().replace("suspend: true", "suspend: false"))
    assert manifests.main(["check", str(tmp_path)]) == 1


def test_checked_in_kueue_manifests_are_current():
    assert kueue.main(["check", str(ROOT / "k8s" / "kueue")]) == 0


@pytest.mark.parametrize("path", sorted((ROOT / "k8s" / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_manifests_validate_strictly(path):
    job = yaml.safe_load(path.read_text())
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
    job = yaml.safe_load((ROOT / "k8s" / "jobs" / "01-preprocess.yaml").read_text())
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


@pytest.mark.parametrize("profile", sorted(profiles.PROFILES))
def test_every_profile_builds_a_valid_job(profile):
    p = profiles.get(profile)
    settings = jobspec.JobSettings(namespace="team-a", queue="team-a-queue", service_account="sa", image="img:1.0", profile=p)
    job = jobspec.job_manifest("finetune", settings, jobspec.stage_args("finetune", {}, jobspec.prefixes("b", "run")), name="x")
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    if p.accelerator_resource:
        assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][p.accelerator_resource] == p.requests[p.accelerator_resource]


def test_kueue_objects_validate_against_crds():
    objects = kueue.base_objects()
    kinds = {o["kind"] for o in objects}
    assert kinds == {"ResourceFlavor", "ClusterQueue", "LocalQueue", "WorkloadPriorityClass"}
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
    queues = [o for o in objects if o["kind"] == "ClusterQueue"]
    assert len(queues) >= 2 and {q["spec"]["cohortName"] for q in queues} == {kueue.COHORT}
    assert all(q["spec"]["preemption"]["reclaimWithinCohort"] == "Any" for q in queues)
    assert {o["metadata"]["namespace"] for o in objects if o["kind"] == "LocalQueue"} == set(kueue.TEAMS)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
@pytest.mark.parametrize("overlay", ["base", "overlays/dev", "overlays/production"])
def test_kustomize_builds_validate(overlay):
    built = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "kueue" / overlay)], check=True, capture_output=True, text=True).stdout
    objects = [o for o in yaml.safe_load_all(built) if o]
    assert len(objects) == len(kueue.base_objects())
    for obj in objects:
        _validate_kueue(obj)


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


def test_quantities():
    assert preflight.quantity("16Gi") == 16 * 2**30 and preflight.quantity("500m") == 0.5 and preflight.quantity(8) == 8
    with pytest.raises(ValueError):
        preflight.quantity("lots")


def test_run_ids_are_made_safe():
    assert jobspec.safe_run_id("manual__2026-11-22T10:00:00+00:00") == "manual-2026-11-22t10-00-00-00-00"
    assert jobspec.stage_prefix("b", "Run/../x", "finetune") == "gs://b/runs/run-x/finetune"
