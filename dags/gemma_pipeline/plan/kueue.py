"""Kueue objects for the pipeline: ResourceFlavors matching the accelerator profiles (accelerator flavors name a
Topology for topology-aware scheduling of multi-host JobSets), per-team ClusterQueues sharing a cohort, with a
Dynamic Workload Scheduler (ProvisioningRequest) admission check on the flex-start flavors, LocalQueues and
WorkloadPriorityClasses. `python -m gemma_pipeline.tools.generate write kueue`
renders the kustomize base and overlays that are checked in (a test fails when they are stale)."""

from __future__ import annotations

from typing import Any

from gemma_pipeline.plan import GENERATED_HEADER, profiles

API = "kueue.x-k8s.io/v1beta2"
COHORT = "ml-platform"
TEAMS = ("team-a", "team-b")
RESOURCES = ("cpu", "memory", "google.com/tpu", "nvidia.com/gpu")
PRIORITIES = {"production": 1000, "development": 100}
# Serving has its own ClusterQueue outside the training cohort (nothing to borrow from it, nothing reclaimed from
# it) and the highest priority: a training Job can never preempt the model users are calling.
SERVING = {"queue": "serving-cq", "local_queue": "serving-queue", "namespace": "serving", "flavor": "gpu-l4",
           "priority": ("serving", 10000), "quota": {"cpu": "16", "memory": "64Gi", "google.com/tpu": "0", "nvidia.com/gpu": "2"}}
OVERLAYS = {"dev": 0.25, "production": 4.0}  # quota scale of each k8s/kueue overlay against the base
# Topologies for topology-aware scheduling: a multi-host TPU slice is one node pool; GPU VMs are placed by the
# block / sub-block / host hierarchy GKE labels them with. Levels run from the widest to a single node.
TOPOLOGIES = {
    "gke-tpu-slice": [profiles.NODEPOOL, "kubernetes.io/hostname"],
    "gke-gpu": [profiles.GCE_BLOCK, "cloud.google.com/gce-topology-subblock", "cloud.google.com/gce-topology-host",
                "kubernetes.io/hostname"],
}
DWS_CHECK = "dws-prov"
DWS_CONFIG = "dws-config"


def flavor_name(profile: profiles.Profile) -> str:
    """One flavor per node shape: GPU profiles that differ only in GPU count or host count share a flavor; TPU
    profiles differ in topology (a node label), so each has its own; spot and flex-start nodes have their own."""
    suffix = next((s for s in ("-spot", "-dws") if profile.name.endswith(s)), "")
    base = profile.name.removesuffix(suffix)
    if base.startswith("gpu-"):
        base = "-".join(base.split("-")[:2])
    elif base.startswith("cpu"):
        base = "cpu"
    return base + suffix


def flavors() -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for profile in profiles.PROFILES.values():
        out[flavor_name(profile)] = dict(profile.node_selector)
    return out


def topology_of(labels: dict[str, str]) -> str | None:
    if profiles.TPU_ACCELERATOR in labels:
        return "gke-tpu-slice"
    if profiles.GPU_ACCELERATOR in labels:
        return "gke-gpu"
    return None


def dws_flavors() -> list[str]:
    return sorted({flavor_name(p) for p in profiles.PROFILES.values() if p.dws})


def flavor_taints(labels: dict[str, str]) -> list[dict[str, str]]:
    """Taints Kueue checks against a workload's tolerations, so CPU jobs never take accelerator quota and
    on-demand jobs never take spot quota (GKE taints these node pools the same way)."""
    taints = []
    if profiles.TPU_ACCELERATOR in labels:
        taints.append({"key": "google.com/tpu", "value": "present", "effect": "NoSchedule"})
    if profiles.GPU_ACCELERATOR in labels:
        taints.append({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"})
    if profiles.SPOT in labels:
        taints.append({"key": profiles.SPOT, "value": "true", "effect": "NoSchedule"})
    if profiles.QUEUED in labels:
        taints.append({"key": profiles.QUEUED, "value": "true", "effect": "NoSchedule"})
    return taints


def resource_flavor(name: str, labels: dict[str, str]) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeLabels": labels}
    if taints := flavor_taints(labels):
        spec["nodeTaints"] = taints
    if topology := topology_of(labels):
        spec["topologyName"] = topology
    return {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": name}, "spec": spec}


def topology(name: str, levels: list[str]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "Topology", "metadata": {"name": name},
            "spec": {"levels": [{"nodeLabel": label} for label in levels]}}


def dws_objects() -> list[dict[str, Any]]:
    """Flex-start: the admission check asks GKE's queued provisioning for all of a workload's nodes at once."""
    config = {"apiVersion": API, "kind": "ProvisioningRequestConfig", "metadata": {"name": DWS_CONFIG}, "spec": {
        "provisioningClassName": "queued-provisioning.gke.io",
        "managedResources": ["nvidia.com/gpu", "google.com/tpu"],
        "retryStrategy": {"backoffLimitCount": 2, "backoffBaseSeconds": 60, "backoffMaxSeconds": 1800},
        "podSetMergePolicy": "IdenticalWorkloadSchedulingRequirements"}}
    check = {"apiVersion": API, "kind": "AdmissionCheck", "metadata": {"name": DWS_CHECK}, "spec": {
        "controllerName": "kueue.x-k8s.io/provisioning-request",
        "parameters": {"apiGroup": "kueue.x-k8s.io", "kind": "ProvisioningRequestConfig", "name": DWS_CONFIG}}}
    return [config, check]


def _quota(flavor: str, scale: float) -> dict[str, Any]:
    """Nominal quota per flavor: chips for accelerators plus the CPU and memory their hosts offer."""
    members = [p for p in profiles.PROFILES.values() if flavor_name(p) == flavor]
    largest = max(members, key=lambda p: p.hosts * int(p.requests.get(p.accelerator_resource or "cpu", "0")))
    copies = largest.hosts if largest.accelerator_resource else 4  # the largest profile's hosts, all at once
    nominal = {}
    for resource in RESOURCES:
        value = largest.requests.get(resource)
        if value is None:
            nominal[resource] = "0"
        elif resource == "memory":
            nominal[resource] = f"{int(int(value.removesuffix('Gi')) * copies * scale)}Gi"
        else:
            nominal[resource] = str(max(1, int(int(value) * copies * scale)))
    return {"name": flavor, "resources": [{"name": r, "nominalQuota": q} for r, q in nominal.items()]}


def cluster_queue(team: str, scale: float) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "ClusterQueue",
        "metadata": {"name": f"{team}-cq", "labels": {"gemma-lora-pipeline/queue": "training"}},
        "spec": {
            "cohortName": COHORT,
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": team}},
            "queueingStrategy": "BestEffortFIFO",
            "preemption": {
                "reclaimWithinCohort": "Any",
                "borrowWithinCohort": {"policy": "LowerPriority", "maxPriorityThreshold": PRIORITIES["development"]},
                "withinClusterQueue": "LowerPriority",
            },
            "resourceGroups": [{
                "coveredResources": list(RESOURCES),
                "flavors": _flavor_quotas(scale),
            }],
            "admissionChecksStrategy": {"admissionChecks": [{"name": DWS_CHECK, "onFlavors": dws_flavors()}]},
        },
    }


def local_queue(team: str) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "LocalQueue", "metadata": {"name": f"{team}-queue", "namespace": team},
            "spec": {"clusterQueue": f"{team}-cq"}}


def priority_class(name: str, value: int) -> dict[str, Any]:
    what = "model serving" if name == "serving" else f"{name} fine-tuning runs"
    return {"apiVersion": API, "kind": "WorkloadPriorityClass", "metadata": {"name": name}, "value": value,
            "description": what}


def serving_objects() -> list[dict[str, Any]]:
    queue = {"apiVersion": API, "kind": "ClusterQueue", "metadata": {"name": SERVING["queue"]}, "spec": {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": SERVING["namespace"]}},
        "queueingStrategy": "BestEffortFIFO",
        "resourceGroups": [{"coveredResources": list(RESOURCES), "flavors": [{"name": SERVING["flavor"], "resources": [
            {"name": r, "nominalQuota": q} for r, q in SERVING["quota"].items()]}]}]}}
    local = {"apiVersion": API, "kind": "LocalQueue", "metadata": {"name": SERVING["local_queue"], "namespace": SERVING["namespace"]},
             "spec": {"clusterQueue": SERVING["queue"]}}
    return [queue, local, priority_class(*SERVING["priority"])]


PRODUCTION_NAMESPACE_LABEL = "gemma-lora-pipeline/production-priority"


def production_policy() -> list[dict[str, Any]]:
    """Kueue lets any workload name any WorkloadPriorityClass, so the cluster itself refuses a Job or JobSet at
    `production` priority outside the namespaces labelled PRODUCTION_NAMESPACE_LABEL=allowed (the DAG's `plan` checks
    who may ask for it; this holds for `kubectl` users too)."""
    name = "gemma-production-priority"
    label = "kueue.x-k8s.io/priority-class"
    operations = ["CREATE", "UPDATE"]
    policy = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy", "metadata": {"name": name},
              "spec": {"failurePolicy": "Fail", "matchConstraints": {"resourceRules": [
                  {"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": operations, "resources": ["jobs"]},
                  {"apiGroups": ["jobset.x-k8s.io"], "apiVersions": ["*"], "operations": operations, "resources": ["jobsets"]}]},
                  "validations": [{
                      "expression": f"!has(object.metadata.labels) || !('{label}' in object.metadata.labels) || "
                                    f"object.metadata.labels['{label}'] != 'production'",
                      "message": f"priority class 'production' may preempt other teams' work: only namespaces labelled "
                                 f"{PRODUCTION_NAMESPACE_LABEL}=allowed may use it; use 'development'",
                      "reason": "Forbidden"}]}}
    binding = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
               "metadata": {"name": name}, "spec": {"policyName": name, "validationActions": ["Deny"], "matchResources": {
                   "namespaceSelector": {"matchExpressions": [
                       {"key": PRODUCTION_NAMESPACE_LABEL, "operator": "NotIn", "values": ["allowed"]}]}}}}
    return [policy, binding]


def base_objects(scale: float = 1.0) -> list[dict[str, Any]]:
    objects = [topology(n, levels) for n, levels in TOPOLOGIES.items()]
    objects += [resource_flavor(n, labels) for n, labels in flavors().items()]
    objects += dws_objects()
    objects += [cluster_queue(team, scale) for team in TEAMS]
    objects += [local_queue(team) for team in TEAMS]
    objects += [priority_class(n, v) for n, v in PRIORITIES.items()]
    return objects + production_policy() + serving_objects()


def quota_patch(scale: float) -> list[dict[str, Any]]:
    """JSON patch ops (RFC 6902) turning the base's quotas into `scale` times them: only the values that change,
    by position, since kustomize cannot merge a CRD's lists by name. Every ClusterQueue has the same layout; a
    `test` op per flavor makes the build fail, rather than patch the wrong flavor, if the base's order changes."""
    ops = []
    base, scaled = _flavor_quotas(1.0), _flavor_quotas(scale)
    for f, (before, after) in enumerate(zip(base, scaled, strict=True)):
        ops.append({"op": "test", "path": f"/spec/resourceGroups/0/flavors/{f}/name", "value": before["name"]})
        for r, (old, new) in enumerate(zip(before["resources"], after["resources"], strict=True)):
            if old["nominalQuota"] != new["nominalQuota"]:
                ops.append({"op": "replace", "path": f"/spec/resourceGroups/0/flavors/{f}/resources/{r}/nominalQuota",
                            "value": new["nominalQuota"]})
    return ops


def _flavor_quotas(scale: float) -> list[dict[str, Any]]:
    return [_quota(name, scale) for name in flavors()]


def render() -> dict[str, str]:
    import yaml

    header = GENERATED_HEADER

    def dump(objects: list[dict[str, Any]]) -> str:
        return header + yaml.safe_dump_all(objects, sort_keys=False, width=120)

    def dump_ops(ops: list[dict[str, Any]]) -> str:  # one op per line: the patch reads as a list of changes
        return header + "".join(f"- {{op: {o['op']}, path: {o['path']}, value: '{o['value']}'}}\n" for o in ops)

    files = {"base/kueue.yaml": dump(base_objects()),
             "base/kustomization.yaml": dump([{"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                               "resources": ["kueue.yaml"]}])}
    # Overlays patch only the ClusterQueues' quotas: a small dev cluster, and production at four times the base.
    for overlay, scale in OVERLAYS.items():
        files[f"overlays/{overlay}/quota-patch.yaml"] = dump_ops(quota_patch(scale))
        files[f"overlays/{overlay}/kustomization.yaml"] = dump([{
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../../base"],
            "patches": [{"path": "quota-patch.yaml", "target": {"group": "kueue.x-k8s.io", "kind": "ClusterQueue",
                                                                 "labelSelector": "gemma-lora-pipeline/queue=training"}}]}])
    return files
