"""Accelerator profiles: what a stage asks Kueue for, and how the fine-tune spreads over the devices.

Each profile maps to node selectors, tolerations, container resources (per host), the fine-tune's JAX
distribution flags and an hourly price in USD for all its hosts, used only for cost estimates: rough
placeholders, not quoted prices; set your own per deployment.

A profile with several hosts (a multi-host TPU slice, two 8-GPU nodes) runs its stage as a JobSet, one pod per
host, admitted by Kueue as one gang and placed by topology-aware scheduling (`topology_level`: the node label
whose value all hosts must share). `-dws` variants ask for capacity through Dynamic Workload Scheduler
flex-start (a ProvisioningRequest admission check on their own flavor).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

TPU_ACCELERATOR = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY = "cloud.google.com/gke-tpu-topology"
GPU_ACCELERATOR = "cloud.google.com/gke-accelerator"
SPOT = "cloud.google.com/gke-spot"
NODEPOOL = "cloud.google.com/gke-nodepool"  # a multi-host TPU slice is exactly one node pool
GCE_BLOCK = "cloud.google.com/gce-topology-block"  # GPU VMs in one block share the fastest network fabric
QUEUED = "cloud.google.com/gke-queued"  # label and taint of nodes created by queued provisioning (DWS)


@dataclass(frozen=True)
class Profile:
    name: str
    node_selector: dict[str, str]
    requests: dict[str, str]
    limits: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, str], ...] = ()
    distribution_args: tuple[str, ...] = ("--distribution", "auto")
    hourly_usd: float = 0.0
    hosts: int = 1
    topology_level: str = ""  # Kueue topology-aware scheduling: hosts must share this node label's value
    dws: bool = False  # capacity from Dynamic Workload Scheduler flex-start
    # The stage's scratch emptyDir (models, checkpoints and shards being staged): past it the kubelet evicts the pod
    # instead of filling the node's disk. Room for the largest model's staged base plus its merged float32 export
    # (Gemma 3 27B: about 54 + 108 GB); the node's disk must hold it too.
    scratch: str = "500Gi"
    # The Job's activeDeadlineSeconds: the longest one stage may hold its hardware, retries included (Kubernetes
    # restarts the clock when Kueue suspends the Job, so queueing does not count).
    deadline_s: int = 24 * 3600

    @property
    def multihost(self) -> bool:
        return self.hosts > 1

    @property
    def tpu(self) -> bool:
        return "google.com/tpu" in self.requests

    @property
    def accelerator_resource(self) -> str | None:
        for key in ("google.com/tpu", "nvidia.com/gpu"):
            if key in self.requests:
                return key
        return None


    @property
    def devices_per_host(self) -> int:
        """Accelerator chips per host (a CPU host is one JAX device)."""
        resource = self.accelerator_resource
        return int(self.requests[resource]) if resource else 1


def check_model_parallel(profile: Profile, model_parallel: int) -> None:
    """Model parallel stays within one host, so it must divide that host's devices (checked before any Job)."""
    if model_parallel > 1 and (profile.distribution_args == ("--distribution", "none")
                               or profile.devices_per_host % model_parallel):
        raise ValueError(f"model_parallel: got {model_parallel}; expected a divisor of the {profile.devices_per_host} "
                         f"device(s) per host of profile {profile.name!r} (model parallel stays within one host)")


def _toleration(key: str, value: str | None = None) -> dict[str, str]:
    if value is None:
        return {"key": key, "operator": "Exists", "effect": "NoSchedule"}
    return {"key": key, "operator": "Equal", "value": value, "effect": "NoSchedule"}


def _tpu(name: str, accelerator: str, topology: str, chips: int, cpu: str, memory: str, price: float,
         hosts: int = 1) -> Profile:
    """`chips` and `cpu`/`memory` per host; `topology` is the whole slice's."""
    return Profile(
        name=name,
        node_selector={TPU_ACCELERATOR: accelerator, TPU_TOPOLOGY: topology},
        requests={"cpu": cpu, "memory": memory, "google.com/tpu": str(chips)},
        limits={"memory": memory, "google.com/tpu": str(chips)},
        tolerations=(_toleration("google.com/tpu"),),
        hourly_usd=price,
        hosts=hosts,
        topology_level=NODEPOOL if hosts > 1 else "",
    )


def _gpu(name: str, accelerator: str, count: int, cpu: str, memory: str, price: float, hosts: int = 1) -> Profile:
    return Profile(
        name=name,
        node_selector={GPU_ACCELERATOR: accelerator},
        requests={"cpu": cpu, "memory": memory, "nvidia.com/gpu": str(count)},
        limits={"memory": memory, "nvidia.com/gpu": str(count)},
        tolerations=(_toleration("nvidia.com/gpu"),),
        hourly_usd=price,
        hosts=hosts,
        topology_level=GCE_BLOCK if hosts > 1 else "",
    )


def _spot(profile: Profile, discount: float) -> Profile:
    return replace(profile, name=profile.name + "-spot", node_selector={**profile.node_selector, SPOT: "true"},
                   tolerations=(*profile.tolerations, _toleration(SPOT, "true")),
                   hourly_usd=round(profile.hourly_usd * discount, 4))


def _dws(profile: Profile) -> Profile:
    """Flex-start: Kueue admits the workload once a ProvisioningRequest got all its nodes at once."""
    return replace(profile, name=profile.name + "-dws", node_selector={**profile.node_selector, QUEUED: "true"},
                   tolerations=(*profile.tolerations, _toleration(QUEUED, "true")), dws=True)


_ON_DEMAND = [
    Profile(name="cpu", node_selector={"cloud.google.com/machine-family": "n2"},
            requests={"cpu": "4", "memory": "16Gi"}, limits={"memory": "16Gi"},
            distribution_args=("--distribution", "none"), hourly_usd=0.19, scratch="50Gi", deadline_s=12 * 3600),
    _tpu("tpu-v5e-1", "tpu-v5-lite-podslice", "1x1", 1, "20", "44Gi", 1.20),
    _tpu("tpu-v5e-4", "tpu-v5-lite-podslice", "2x2", 4, "100", "180Gi", 4.80),
    _tpu("tpu-v5e-8", "tpu-v5-lite-podslice", "2x4", 8, "200", "360Gi", 9.60),
    _tpu("tpu-v6e-1", "tpu-v6e-slice", "1x1", 1, "40", "170Gi", 2.70),
    _tpu("tpu-v6e-4", "tpu-v6e-slice", "2x2", 4, "160", "680Gi", 10.80),
    _tpu("tpu-v6e-8", "tpu-v6e-slice", "2x4", 8, "170", "1360Gi", 21.60),
    _gpu("gpu-l4-1", "nvidia-l4", 1, "6", "24Gi", 0.85),
    _gpu("gpu-a100-1", "nvidia-tesla-a100", 1, "10", "80Gi", 3.67),
    _gpu("gpu-h100-1", "nvidia-h100-80gb", 1, "24", "200Gi", 11.06),
    _gpu("gpu-h100-8", "nvidia-h100-80gb", 8, "200", "1800Gi", 88.49),
    # Multi-host: data parallel across the hosts (each process feeds its share of every global batch).
    _tpu("tpu-v5e-16", "tpu-v5-lite-podslice", "4x4", 4, "100", "180Gi", 19.20, hosts=4),
    _tpu("tpu-v6e-16", "tpu-v6e-slice", "4x4", 4, "160", "680Gi", 43.20, hosts=4),
    _gpu("gpu-h100-8x2", "nvidia-h100-80gb", 8, "200", "1800Gi", 176.98, hosts=2),
    # Two CPU hosts: the multi-host path at the price of CPUs (a cluster smoke test; the local backend runs it
    # as two processes on this machine).
    Profile(name="cpu-x2", node_selector={"cloud.google.com/machine-family": "n2"},
            requests={"cpu": "4", "memory": "16Gi"}, limits={"memory": "16Gi"}, hourly_usd=0.38, hosts=2,
            scratch="50Gi", deadline_s=12 * 3600),
]
_DWS = [p for p in _ON_DEMAND if p.accelerator_resource and (p.multihost or p.name == "gpu-h100-8")]

PROFILES: dict[str, Profile] = {p.name: p for p in _ON_DEMAND}
PROFILES.update({s.name: s for s in (_spot(p, 0.35) for p in _ON_DEMAND)})
PROFILES.update({d.name: d for d in (_dws(p) for p in _DWS)})


MULTIHOST_STAGES = ("finetune",)  # the stages that run as several cooperating processes


def names_for(stage: str) -> list[str]:
    """The profiles a stage may use: multi-host ones only for the stages written for several processes."""
    return sorted(n for n, p in PROFILES.items() if stage in MULTIHOST_STAGES or not p.multihost)


def get(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"accelerator profile: got {name!r}; expected one of {', '.join(sorted(PROFILES))}") from None


def as_dict(profile: Profile) -> dict[str, Any]:
    return {"node_selector": profile.node_selector, "requests": profile.requests, "limits": profile.limits,
            "tolerations": list(profile.tolerations), "hourly_usd": profile.hourly_usd, "hosts": profile.hosts,
            "topology_level": profile.topology_level, "dws": profile.dws, "scratch": profile.scratch,
            "deadline_s": profile.deadline_s}
