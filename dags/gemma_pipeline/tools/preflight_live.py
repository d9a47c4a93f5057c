"""The preflight's live mode: the same spec check as the offline mode, on the Kueue objects the cluster really has
(the LocalQueue, its ClusterQueue and the ResourceFlavors, Topologies, AdmissionChecks and
ProvisioningRequestConfigs it names), plus what only the cluster knows: whether the queues are active, the quota
other workloads hold, and for a given Job its Workload's conditions and events.

Only reads (get/list); every call goes through the official `kubernetes` client, so a fake with the same method
names stands in for it in tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.rest import ApiException

from gemma_pipeline.operators.kueue_wait import describe
from gemma_pipeline.plan import profiles
from gemma_pipeline.plan.kueue import API
from gemma_pipeline.tools import preflight

GROUP, VERSION = API.split("/")  # the version our manifests are written in, so both modes read the same schema
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
EVENTS_SHOWN = 5


class LiveError(Exception):
    """Bad input, or a cluster that cannot be read: the CLI exits 2 with this message instead of a traceback."""


@dataclass
class Diagnosis:
    ok: bool
    headline: str
    lines: list[str] = field(default_factory=list)


def clients(context: str | None) -> tuple[Any, Any, Any]:
    """CustomObjectsApi, CoreV1Api and BatchV1Api for the kubeconfig's context, or the pod's service account."""
    from kubernetes import client, config

    try:
        config.load_kube_config(context=context)
    except config.ConfigException as err:
        # Inside a pod (an Airflow worker) there is no kubeconfig, only the service account; an explicit
        # --context means the user wants a kubeconfig, so its absence is the error to report.
        if context or not os.environ.get("KUBERNETES_SERVICE_HOST"):
            raise LiveError(f"kubeconfig: {str(err).rstrip('.')}; expected a kubeconfig with "
                            f"{'the context ' + context if context else 'a current context'} (kubectl config get-contexts)") from err
        try:
            config.load_incluster_config()
        except config.ConfigException as in_cluster:
            raise LiveError(f"in-cluster config: {in_cluster}") from in_cluster
    return client.CustomObjectsApi(), client.CoreV1Api(), client.BatchV1Api()


def _read(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """One API call; None for 404 (the caller says what a missing object means), LiveError for anything else."""
    try:
        return call(*args, **kwargs)
    except ApiException as err:
        if err.status == 404:
            return None
        hint = " (your account needs get/list on it: kubectl auth can-i)" if err.status in (401, 403) else ""
        raise LiveError(f"reading {what}: the API answered {err.status} {err.reason or ''}".rstrip() + hint) from err


def read_queue(custom: Any, namespace: str, queue: str) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any] | None]:
    """The objects check() needs, as the cluster has them, and the LocalQueue and ClusterQueue with their status."""
    local = _read(f"LocalQueue {namespace}/{queue}", custom.get_namespaced_custom_object,
                  GROUP, VERSION, namespace, "localqueues", queue)
    if local is None:
        listing = _read(f"LocalQueues in {namespace}", custom.list_namespaced_custom_object, GROUP, VERSION, namespace, "localqueues")
        if listing is None:  # the resource type itself is unknown, not just this queue
            raise LiveError(f"the cluster does not serve {API} LocalQueues: is Kueue installed, at a version that serves {VERSION}?")
        known = sorted(f"{namespace}/{item['metadata']['name']}" for item in listing.get("items", []))
        raise LiveError(f"queue: no LocalQueue {namespace}/{queue} in the cluster; known in namespace {namespace}: {', '.join(known) or 'none'}")
    objects = [{**local, "kind": "LocalQueue"}]
    cq_name = local.get("spec", {}).get("clusterQueue", "")
    cq = _read(f"ClusterQueue {cq_name}", custom.get_cluster_custom_object, GROUP, VERSION, "clusterqueues", cq_name)
    if cq is None:
        return objects, local, None  # check() says the LocalQueue points at a ClusterQueue that does not exist
    objects.append({**cq, "kind": "ClusterQueue"})

    def cluster_object(kind: str, plural: str, name: str) -> None:
        if name and not any(o["kind"] == kind and o["metadata"]["name"] == name for o in objects):
            found = _read(f"{kind} {name}", custom.get_cluster_custom_object, GROUP, VERSION, plural, name)
            if found is not None:
                objects.append({**found, "kind": kind})

    spec = cq.get("spec", {})
    for group in spec.get("resourceGroups", []):
        for entry in group.get("flavors", []):
            cluster_object("ResourceFlavor", "resourceflavors", entry["name"])
    for flavor in [o for o in objects if o["kind"] == "ResourceFlavor"]:
        cluster_object("Topology", "topologies", flavor.get("spec", {}).get("topologyName", ""))
    for entry in spec.get("admissionChecksStrategy", {}).get("admissionChecks", []):
        cluster_object("AdmissionCheck", "admissionchecks", entry["name"])
    for check in [o for o in objects if o["kind"] == "AdmissionCheck"]:
        parameters = check.get("spec", {}).get("parameters", {})
        if parameters.get("kind") == "ProvisioningRequestConfig":
            cluster_object("ProvisioningRequestConfig", "provisioningrequestconfigs", parameters.get("name", ""))
    return objects, local, cq


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c.get("type") == kind), None)


def is_true(obj: dict[str, Any], kind: str) -> bool:
    return (condition(obj, kind) or {}).get("status") == "True"


def _inactive(obj: dict[str, Any]) -> str | None:
    """'reason: message' of an Active=False condition; None when active or not yet reported."""
    active = condition(obj, "Active")
    if active is None or active.get("status") != "False":
        return None
    return f"{active.get('reason', '')}: {active.get('message', '')}".strip(": ")


def _counts(obj: dict[str, Any]) -> str:
    status = obj.get("status", {})
    return (f"{status.get('pendingWorkloads', 0)} pending, {status.get('reservingWorkloads', 0)} holding quota, "
            f"{status.get('admittedWorkloads', 0)} admitted workload(s)")


def quota_problem(profile: profiles.Profile, cq: dict[str, Any], flavor: str) -> tuple[str, str | None]:
    """(a line on the flavor's quota, a problem when the request does not fit what other workloads leave free)."""
    entry = next(f for g in cq["spec"].get("resourceGroups", []) for f in g.get("flavors", []) if f["name"] == flavor)
    # flavorsReservation, not flavorsUsage: Kueue admits against quota reserved, which includes workloads whose
    # admission checks are still running.
    reserved = next((f for f in cq.get("status", {}).get("flavorsReservation", []) if f["name"] == flavor), {})
    in_use = {r["name"]: str(r.get("total", "0")) for r in reserved.get("resources", [])}
    holders = cq.get("status", {}).get("reservingWorkloads", 0)
    parts, short = [], []
    for resource, per_host in profile.requests.items():
        need, nominal = preflight.quantity(per_host) * profile.hosts, preflight.quantity(preflight.quota_repr(entry, resource))
        used = in_use.get(resource, "0")
        text = (f"requested {preflight.gang(profile, resource)} {resource}, nominal {preflight.quota_repr(entry, resource)}, "
                f"in use {used}")
        parts.append(text)
        if need > nominal - preflight.quantity(used):
            short.append(f"{text} by {holders} workload(s) holding quota")
    line = f"quota on flavor {flavor}: " + "; ".join(parts)
    if not short:
        return line, None
    cohort = cq["spec"].get("cohortName")
    lend = f" (ClusterQueue {cq['metadata']['name']} is in cohort {cohort}, which may lend unused quota; not read here)" if cohort else ""
    return line, "quota: " + "; ".join(short) + lend


def owners(batch: Any, namespace: str, job: str | None, selector: str | None) -> list[tuple[str, str, str]]:
    """(kind, name, uid) of the objects whose Workloads to report: the named Job or JobSet, or the Jobs a label
    selector matches (a JobSet's child Job stands for its JobSet, which owns the Workload)."""
    if job:
        return [("", job, "")]  # kind and uid unknown: matched by name against Job and JobSet owners
    listing = _read(f"Jobs in {namespace} matching {selector}", batch.list_namespaced_job, namespace, label_selector=selector)
    found = []
    for item in listing.items if listing is not None else []:
        parent = next((o for o in item.metadata.owner_references or [] if o.kind == "JobSet"), None)
        found.append(("JobSet", parent.name, parent.uid) if parent else ("Job", item.metadata.name, item.metadata.uid))
    if not found:
        raise LiveError(f"--selector: no Job in namespace {namespace} matches {selector!r}; expected labels such as "
                        "gemma-lora-pipeline/run=RUN,gemma-lora-pipeline/stage=finetune (kubectl get jobs --show-labels)")
    return sorted(set(found))


def owned_by(workload: dict[str, Any], owner: tuple[str, str, str]) -> bool:
    kind, name, uid = owner
    meta = workload.get("metadata", {})
    if uid and meta.get("labels", {}).get(JOB_UID_LABEL) == uid:
        return True
    return any(ref.get("name") == name and ref.get("kind") in ((kind,) if kind else ("Job", "JobSet"))
               and (not uid or ref.get("uid") == uid) for ref in meta.get("ownerReferences", []))


def events(core: Any, namespace: str, name: str) -> list[str]:
    listing = _read(f"events of {namespace}/{name}", core.list_namespaced_event, namespace, field_selector=f"involvedObject.name={name}")
    oldest = datetime.min.replace(tzinfo=UTC)
    items = sorted(listing.items if listing is not None else [],
                   key=lambda e: e.last_timestamp or e.event_time or e.first_timestamp or oldest)
    return [f"event {e.type} {e.reason}: {e.message}" + (f" (x{e.count})" if (e.count or 0) > 1 else "")
            for e in items[-EVENTS_SHOWN:]]


def workload_problem(workload: dict[str, Any], queue: str) -> str | None:
    """Why this Workload is not running, or None when it is admitted or finished."""
    name = workload["metadata"]["name"]
    if is_true(workload, "Finished") or (is_true(workload, "Admitted") and not is_true(workload, "Evicted")):
        return None
    if workload.get("spec", {}).get("active") is False:
        return f"Workload {name} is deactivated (spec.active=false), so Kueue will not admit it until it is reactivated"
    if workload.get("spec", {}).get("queueName") not in (None, queue):
        return f"Workload {name} is in queue {workload['spec']['queueName']}, not {queue}: check the Job's kueue.x-k8s.io/queue-name label"
    if evicted := condition(workload, "Evicted"):
        if evicted.get("status") == "True":
            return f"Workload {name} was evicted: {evicted.get('reason', '')}: {evicted.get('message', '')}"
    if is_true(workload, "QuotaReserved"):
        checks = [f"{c.get('name')}={c.get('state')} ({c.get('message', '')})" for c in workload.get("status", {}).get("admissionChecks", [])]
        return f"Workload {name} holds quota, waiting for admission checks: {'; '.join(checks) or 'none reported yet'}"
    reserved = condition(workload, "QuotaReserved")
    if reserved is None:
        return f"Workload {name} has no QuotaReserved condition yet: Kueue has not tried to admit it"
    return f"Workload {name} pending: {reserved.get('message') or reserved.get('reason', '')}"


def diagnose(profile_name: str, namespace: str, queue: str, custom: Any, core: Any, batch: Any = None,
             job: str | None = None, selector: str | None = None) -> Diagnosis:
    try:
        profile = profiles.get(profile_name)
    except ValueError as err:
        raise LiveError(str(err)) from err
    objects, local, cq = read_queue(custom, namespace, queue)
    spec = preflight.check(profile_name, namespace, queue, objects)
    lines = [("spec OK: " if spec.ok else "spec NOT ADMISSIBLE: ") + spec.message,
             f"LocalQueue {namespace}/{queue}: " + (f"inactive ({why})" if (why := _inactive(local)) else "active") + f"; {_counts(local)}"]
    never: list[str] = [] if spec.ok else [spec.message]  # fixed only by changing the cluster's objects
    waiting: list[str] = []  # Kueue may still admit it once other workloads finish
    cq_name = local.get("spec", {}).get("clusterQueue", "")
    if cq is not None:
        cq_down = _inactive(cq)
        lines.append(f"ClusterQueue {cq_name}: " + (f"inactive ({cq_down})" if cq_down else "active") + f"; {_counts(cq)}")
        if cq_down:
            never.append(f"ClusterQueue {cq_name} is inactive: {cq_down}")
    if (lq_down := _inactive(local)) and not (cq is not None and _inactive(cq)):
        never.append(f"LocalQueue {namespace}/{queue} is inactive: {lq_down}")

    admitted, what = False, f"Job {job}" if job else f"the Jobs matching {selector!r}"
    if job or selector:
        targets = owners(batch, namespace, job, selector)
        listing = _read(f"Workloads in {namespace}", custom.list_namespaced_custom_object, GROUP, VERSION, namespace, "workloads")
        workloads = [w for w in (listing or {}).get("items", []) if any(owned_by(w, t) for t in targets)]
        if not workloads:
            waiting.append(f"no Workload in {namespace} is owned by {what}: Kueue has not seen it (does the Job carry the "
                           f"kueue.x-k8s.io/queue-name label, and is Kueue's batch/Job or JobSet integration enabled?)")
            for _, name, _ in targets:
                lines += [f"  {e}" for e in events(core, namespace, name)]
        for workload in workloads:
            name = workload["metadata"]["name"]
            flavors = sorted({f for p in workload.get("status", {}).get("admission", {}).get("podSetAssignments", [])
                              for f in p.get("flavors", {}).values()})
            lines.append(f"Workload {namespace}/{name}: {describe(workload.get('status', {}).get('conditions', []))}"
                         + (f"; flavors {', '.join(flavors)}" if flavors else ""))
            lines += [f"  {e}" for e in events(core, namespace, name)]
            if problem := workload_problem(workload, queue):
                waiting.append(problem)
        admitted = bool(workloads) and not waiting

    if spec.ok and cq is not None and spec.flavor and not admitted:
        # An admitted Workload's own usage is in these counts, so the check only means something before admission.
        line, problem = quota_problem(profile, cq, spec.flavor)
        lines.append(line)
        if problem:
            waiting.append(problem)

    if admitted:
        return Diagnosis(True, f"OK: the Workload of {what} is admitted by ClusterQueue {cq_name}", lines)
    if never:
        return Diagnosis(False, "NOT ADMISSIBLE: " + never[0], lines + [f"also: {p}" for p in never[1:] + waiting])
    if waiting:
        return Diagnosis(False, "WAITING: " + waiting[0], lines + [f"also: {p}" for p in waiting[1:]])
    return Diagnosis(True, "OK: " + spec.message + " and its quota is free now", lines)
