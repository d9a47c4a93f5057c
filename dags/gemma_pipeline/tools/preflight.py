"""Preflight: would Kueue ever admit this stage's Job? The usual reason a Job sits suspended forever is a
queue whose ClusterQueue has no ResourceFlavor matching the Job's node selectors, or a request larger than
that flavor's nominal quota (plus what the cohort could lend). For a multi-host profile the request is all its
hosts at once (one gang), its flavor must name a Topology with the profile's placement level, and a flex-start
(`-dws`) profile's flavor must carry a ProvisioningRequest admission check in the ClusterQueue.

Live (the default): the same check on the objects the cluster has (kubeconfig's current context, --context, or
the pod's service account), plus the live state the YAML cannot show: inactive queues, quota held by other
workloads, and with --job (or --selector) the Job's Workload, its conditions and events:

  python -m gemma_pipeline.tools.preflight --profile tpu-v5e-8 --namespace team-a --queue team-a-queue --job gemma-finetune-x

Offline: the same check on the repository's Kueue objects, before they are applied:

  python -m gemma_pipeline.tools.preflight --profile tpu-v5e-8 --namespace team-a --queue team-a-queue --kueue k8s/kueue/overlays/dev

Exit status: 0 admissible (live: and not blocked now), 1 not admissible (live: or waiting), 2 bad input (an
unknown profile, a missing LocalQueue, an unreadable cluster or file).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma_pipeline.plan import profiles

_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3, "": 1}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("16Gi", "500m", "8") as a number."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value).strip())
    if not match or match.group(2) not in _SUFFIX:
        raise ValueError(f"resource quantity: got {value!r}; expected a number with an optional unit such as Gi or m")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


@dataclass
class Result:
    ok: bool
    message: str
    flavor: str | None = None
    bad_input: bool = False  # the question itself is wrong (unknown profile or queue): exit 2, not 1


def load_objects(source: Path) -> list[dict[str, Any]]:
    """Kueue objects from a YAML file, or from a kustomize directory (built with `kubectl kustomize`)."""
    import yaml

    text = subprocess.run(["kubectl", "kustomize", str(source)], check=True, capture_output=True, text=True).stdout if source.is_dir() else source.read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc]


def check(profile_name: str, namespace: str, queue: str, objects: list[dict[str, Any]]) -> Result:
    try:
        profile = profiles.get(profile_name)
    except ValueError as err:
        return Result(False, str(err), bad_input=True)
    by_kind: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for obj in objects:
        meta = obj.get("metadata", {})
        by_kind.setdefault(obj.get("kind", ""), {})[(meta.get("namespace", ""), meta.get("name", ""))] = obj
    local = by_kind.get("LocalQueue", {}).get((namespace, queue))
    if local is None:
        known = sorted(f"{ns}/{n}" for ns, n in by_kind.get("LocalQueue", {}))
        return Result(False, f"queue: no LocalQueue {namespace}/{queue}; known: {', '.join(known) or 'none'}", bad_input=True)
    cq_name = local["spec"]["clusterQueue"]
    cq = by_kind.get("ClusterQueue", {}).get(("", cq_name))
    if cq is None:
        return Result(False, f"LocalQueue {namespace}/{queue} points at ClusterQueue {cq_name}, which does not exist")
    flavors = {name: obj.get("spec", {}) for (_, name), obj in by_kind.get("ResourceFlavor", {}).items()}
    request = {k: quantity(v) * profile.hosts for k, v in profile.requests.items()}  # the gang, all hosts
    reasons = []
    for group in cq["spec"].get("resourceGroups", []):
        missing = [r for r in request if r not in group.get("coveredResources", [])]
        for entry in group.get("flavors", []):
            name = entry["name"]
            flavor = flavors.get(name)
            if flavor is None:
                reasons.append(f"{name}: no such ResourceFlavor")
                continue
            labels = flavor.get("nodeLabels", {})
            conflicts = {k: v for k, v in labels.items() if k in profile.node_selector and profile.node_selector[k] != v}
            if conflicts or not all(tolerates(profile.tolerations, taint) for taint in flavor.get("nodeTaints", [])):
                continue  # a different node shape, or taints the Job does not tolerate: Kueue skips it
            if missing:
                reasons.append(f"{name}: resources {', '.join(missing)} are not covered by the ClusterQueue")
                continue
            quota = {r["name"]: quantity(r["nominalQuota"]) for r in entry["resources"]}
            if profile.accelerator_resource and not quota.get(profile.accelerator_resource):
                continue  # offers none of the accelerator this profile needs
            short = [f"{r} needs {gang(profile, r)} but nominal quota is {quota_repr(entry, r)}" for r in request if request[r] > quota.get(r, 0)]
            if short:
                reasons.append(f"{name}: " + "; ".join(short))
                continue
            if problem := placement_problem(profile, flavor, cq, by_kind):
                reasons.append(f"{name}: {problem}")
                continue
            return Result(True, f"profile {profile.name} fits flavor {name} of ClusterQueue {cq_name}", name)
    detail = "; ".join(reasons) if reasons else "no ResourceFlavor has node labels compatible with " + str(profile.node_selector)
    return Result(False, f"profile {profile.name} can never be admitted by ClusterQueue {cq_name} (queue {namespace}/{queue}): {detail}")


def gang(profile: profiles.Profile, resource: str) -> str:
    per_host = profile.requests[resource]
    return per_host if profile.hosts == 1 else f"{profile.hosts} x {per_host}"


def placement_problem(profile: profiles.Profile, flavor: dict[str, Any], cq: dict[str, Any],
                      by_kind: dict[str, dict[tuple[str, str], dict[str, Any]]]) -> str | None:
    """What keeps a multi-host or flex-start profile off a flavor whose quota fits, or None."""
    if profile.topology_level:
        topology_name = flavor.get("topologyName")
        topology = by_kind.get("Topology", {}).get(("", topology_name or ""))
        if topology is None:
            return (f"profile {profile.name} asks for hosts placed within one {profile.topology_level}, but the flavor "
                    f"names {'no Topology' if not topology_name else f'Topology {topology_name}, which does not exist'}")
        levels = [level.get("nodeLabel") for level in topology.get("spec", {}).get("levels", [])]
        if profile.topology_level not in levels:
            return f"Topology {topology_name} has no level {profile.topology_level} (levels: {', '.join(levels)})"
    if profile.dws:
        name = next((n for (_, n), f in by_kind.get("ResourceFlavor", {}).items() if f.get("spec") == flavor), "")
        strategy = cq["spec"].get("admissionChecksStrategy", {}).get("admissionChecks", [])
        checks = [c["name"] for c in strategy if not c.get("onFlavors") or name in c["onFlavors"]]
        for check_name in checks:
            check = by_kind.get("AdmissionCheck", {}).get(("", check_name), {}).get("spec", {})
            if check.get("controllerName") == "kueue.x-k8s.io/provisioning-request":
                config = check.get("parameters", {}).get("name", "")
                if ("", config) not in by_kind.get("ProvisioningRequestConfig", {}):
                    return f"AdmissionCheck {check_name} names ProvisioningRequestConfig {config}, which does not exist"
                return None
        return f"profile {profile.name} is flex-start, but the ClusterQueue has no ProvisioningRequest admission check on this flavor"
    return None


def tolerates(tolerations: tuple[dict[str, str], ...], taint: dict[str, str]) -> bool:
    for toleration in tolerations:
        key_ok = toleration.get("key") in (None, "", taint["key"])
        value_ok = toleration.get("operator") == "Exists" or toleration.get("value") == taint.get("value")
        effect_ok = toleration.get("effect") in (None, "", taint["effect"])
        if key_ok and value_ok and effect_ok:
            return True
    return False


def quota_repr(entry: dict[str, Any], resource: str) -> str:
    return next((str(r["nominalQuota"]) for r in entry["resources"] if r["name"] == resource), "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--profile", required=True, help=f"one of {', '.join(sorted(profiles.PROFILES))}")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--queue", required=True, help="the LocalQueue name (the kueue.x-k8s.io/queue-name label)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--live", action="store_true", help="read the cluster (the default when --kueue is not given)")
    mode.add_argument("--kueue", type=Path, help="offline: a kustomize directory or a YAML file of Kueue objects instead of the cluster")
    live = parser.add_argument_group("live mode")
    live.add_argument("--context", help="the kubeconfig context (default: the current one; in a pod, its service account)")
    target = live.add_mutually_exclusive_group()
    target.add_argument("--job", help="the stuck Job (or JobSet): report its Kueue Workload, conditions and events")
    target.add_argument("--selector", help="a label selector for the Jobs to report, e.g. gemma-lora-pipeline/run=RUN,gemma-lora-pipeline/stage=finetune")
    args = parser.parse_args(argv)
    if args.kueue is not None:
        if live_only := [f"--{n}" for n in ("context", "job", "selector") if getattr(args, n)]:
            parser.error(f"{', '.join(live_only)}: only for the live cluster; drop --kueue {args.kueue} to read the cluster, "
                         f"or drop {', '.join(live_only)}")
        try:
            objects = load_objects(args.kueue)
        except (OSError, subprocess.CalledProcessError) as err:
            print(f"ERROR: --kueue {args.kueue}: {getattr(err, 'stderr', None) or err}", file=sys.stderr)
            return 2
        result = check(args.profile, args.namespace, args.queue, objects)
        print(("OK: " if result.ok else "NOT ADMISSIBLE: ") + result.message)
        return 0 if result.ok else 2 if result.bad_input else 1
    # Imported here: it loads the kubernetes client, which the offline mode does not need.
    from gemma_pipeline.tools import preflight_live

    try:
        profiles.get(args.profile)  # a typo is reported before the cluster is contacted (no kubeconfig needed)
    except ValueError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    try:
        apis = preflight_live.clients(args.context)
        diagnosis = preflight_live.diagnose(args.profile, args.namespace, args.queue, *apis, job=args.job, selector=args.selector)
    except preflight_live.LiveError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    print("\n".join([diagnosis.headline] + [f"  {line}" for line in diagnosis.lines]))
    return 0 if diagnosis.ok else 1


if __name__ == "__main__":
    sys.exit(main())
