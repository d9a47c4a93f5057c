"""The fine-tune as several processes (one per host of a TPU slice or GPU/CPU node group), on JAX's own
multi-process runtime.

Where the processes learn who they are:
- TPU multi-host on GKE: GKE injects `TPU_WORKER_HOSTNAMES` and `TPU_WORKER_ID` into every pod of the slice;
  `jax.distributed.initialize()` with no arguments detects the cluster from them.
- GPU and CPU (a JobSet, or the local backend's N processes): `GEMMA_PIPELINE_COORDINATOR` (process 0's
  `host[:port]`; the JobSet's coordinator annotation through the downward API), `GEMMA_PIPELINE_NUM_PROCESSES`,
  and the process id from `GEMMA_PIPELINE_PROCESS_ID` or else the Indexed Job's `JOB_COMPLETION_INDEX`.

Every process computes every step (the data-parallel gradient is reduced across them); only process 0 writes
checkpoints, manifests, progress and outputs. A SIGTERM on any host is agreed on by all processes at the next
step boundary, so every process stops at the same checkpointed step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jobs.contract.env import COORDINATOR_ENV, NUM_PROCESSES_ENV
from jobs.contract.errors import BadInputError

log = logging.getLogger(__name__)

PROCESS_ID_ENV = "GEMMA_PIPELINE_PROCESS_ID"
INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in every pod of an Indexed Job (a JobSet's replicated Job)
TPU_HOSTS_ENV = "TPU_WORKER_HOSTNAMES"
COORDINATOR_PORT = 8476  # JAX's conventional coordinator port; the JobSet's headless service exposes it


@dataclass(frozen=True)
class Cluster:
    num_processes: int = 1
    process_id: int = 0
    coordinator: str | None = None  # host:port of process 0; None when JAX detects the cluster (TPU) or single
    tpu: bool = False


def _int(environ: Mapping[str, str], name: str, minimum: int) -> int:
    raw = environ.get(name, "")
    try:
        value = int(raw)
    except ValueError:
        raise BadInputError(f"environment {name}", raw, f"an integer >= {minimum}") from None
    if value < minimum:
        raise BadInputError(f"environment {name}", raw, f"an integer >= {minimum}")
    return value


def detect(environ: Mapping[str, str] | None = None) -> Cluster:
    """Who this process is, from the environment its pod (or the local backend) gives it."""
    env = os.environ if environ is None else environ
    tpu_hosts = [h for h in env.get(TPU_HOSTS_ENV, "").split(",") if h]
    if len(tpu_hosts) > 1:
        return Cluster(num_processes=len(tpu_hosts), process_id=_int(env, "TPU_WORKER_ID", 0), tpu=True)
    if NUM_PROCESSES_ENV not in env:
        return Cluster()
    num = _int(env, NUM_PROCESSES_ENV, 1)
    if num == 1:
        return Cluster()
    id_name = PROCESS_ID_ENV if PROCESS_ID_ENV in env else INDEX_ENV
    if id_name not in env:
        raise BadInputError(f"environment {PROCESS_ID_ENV}", None, f"this process's id (0..{num - 1}); an Indexed Job "
                            f"sets {INDEX_ENV} instead")
    process_id = _int(env, id_name, 0)
    if process_id >= num:
        raise BadInputError(f"environment {id_name}", process_id, f"a process id below {NUM_PROCESSES_ENV}={num}")
    coordinator = env.get(COORDINATOR_ENV, "").strip()
    if not coordinator:
        raise BadInputError(f"environment {COORDINATOR_ENV}", coordinator, "process 0's host[:port] "
                            f"(with {NUM_PROCESSES_ENV}={num})")
    if ":" not in coordinator.rsplit("]", 1)[-1]:
        coordinator = f"{coordinator}:{COORDINATOR_PORT}"
    return Cluster(num_processes=num, process_id=process_id, coordinator=coordinator)


def initialize(cluster: Cluster) -> None:
    """Join the other processes (before any JAX computation). A single process does nothing."""
    if cluster.num_processes == 1:
        return
    import jax

    if cluster.tpu:
        jax.distributed.initialize()  # GkeTpuCluster reads what GKE injected
    else:
        jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id)
    log.info("process %d of %d joined (coordinator %s): %d local of %d devices", jax.process_index(),
             jax.process_count(), cluster.coordinator or "from the TPU environment", jax.local_device_count(),
             jax.device_count())


def process_count() -> int:
    import jax

    return jax.process_count()


def process_index() -> int:
    import jax

    return jax.process_index()


def is_primary() -> bool:
    import jax

    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True on every process when it is true on any: a collective, so every process calls it at the same point."""
    if process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.array([flag]))).any())


def barrier(name: str) -> None:
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(values: list) -> list:
    """Host (numpy) copies of arrays that may be sharded over other hosts' devices. A collective when any is: every
    process calls it at the same point, with the same arrays."""
    import numpy as np

    if process_count() == 1 or all(_local(v) for v in values):
        return [np.asarray(v) for v in values]
    from jax.experimental import multihost_utils

    return [np.asarray(v) if _local(v) else np.asarray(multihost_utils.process_allgather(v, tiled=True)) for v in values]


def _local(value: Any) -> bool:
    return getattr(value, "is_fully_addressable", True) or getattr(value, "is_fully_replicated", False)


def localize(variables: list) -> None:
    """Give keras variables sharded across hosts (model parallel) a host-local value, so process 0 can save them
    with keras' own writers. A collective. Keras has no public way to detach a variable from its distribution
    layout: this clears `_layout`, and tests/reliability/test_multihost.py fails if that stops working."""
    if process_count() == 1 or all(_local(v.value) for v in variables):
        return
    import jax

    hosts = to_host([v.value for v in variables])
    with jax.default_device(jax.local_devices(backend="cpu")[0]):  # not one accelerator: the whole model may not fit
        for variable, value in zip(variables, hosts):
            if not _local(variable.value):
                variable._layout = None
                variable.assign(value)


def local_rows(sharding: Any, shape: tuple[int, ...]) -> slice:
    """The rows of a global batch that this process's devices hold under `sharding` (a contiguous block)."""
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(shape).values():
        rows = index[0] if index else slice(None)
        starts.append(rows.start or 0)
        stops.append(shape[0] if rows.stop is None else rows.stop)
    return slice(min(starts), max(stops))
