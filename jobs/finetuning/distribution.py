"""Device layout for training through `keras.distribution`: data parallel, or model parallel with the model
family's layout map (`jobs.families`)."""

from __future__ import annotations

import logging

from jobs import families
from jobs.contract.errors import BadInputError
from jobs.families import Family
from jobs.finetuning import multihost

log = logging.getLogger(__name__)


def setup(kind: str, model_parallel: int, batch_size: int, family: Family | None = None):
    """Install a global keras distribution before the model is built; returns it (or None). Model parallel needs
    the model's `family` (its layout map)."""
    import jax
    import keras

    # Process-major order, so each row of the mesh (one model-parallel group) lies within one host: the model
    # axis then needs no cross-host traffic and only gradients cross hosts (data parallel between them).
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    n = len(devices)
    if jax.process_count() > 1:
        if kind == "none":
            raise BadInputError("--distribution", kind, f"auto, data or model when the stage runs as "
                                f"{jax.process_count()} processes")
        if kind == "model" and jax.local_device_count() % model_parallel:
            raise BadInputError("--model-parallel", model_parallel, f"a divisor of the {jax.local_device_count()} "
                                "devices of one host (model parallel stays within a host; hosts are data parallel)")
    if kind == "auto" and model_parallel > 1:
        kind = "model"
    if kind == "none" or (kind == "auto" and n == 1):
        keras.distribution.set_distribution(None)
        return None
    if kind in ("auto", "data"):
        if batch_size % n:
            raise BadInputError("--batch-size", batch_size, f"a multiple of the {n} data-parallel devices")
        distribution = keras.distribution.DataParallel(devices=devices)
    else:
        if n % model_parallel:
            raise BadInputError("--model-parallel", model_parallel, f"a divisor of the {n} devices")
        data = n // model_parallel
        if batch_size % data:
            raise BadInputError("--batch-size", batch_size, f"a multiple of the {data} data-parallel replicas")
        if family is None or not family.model_parallel:
            raise BadInputError("--distribution", "model", "a model whose family has a layout map: "
                                + ", ".join(f.title for f in families.all_families() if f.model_parallel),
                                f"got {family.title if family else 'an unknown family'}")
        mesh = keras.distribution.DeviceMesh((data, model_parallel), ["batch", "model"], devices)
        distribution = keras.distribution.ModelParallel(layout_map=family.layout_map(mesh), batch_dim_name="batch")
    keras.distribution.set_distribution(distribution)
    log.info("distribution %s over %d %s devices", type(distribution).__name__, n, devices[0].platform)
    return distribution


def check_model_parallel(backbone, model_parallel: int) -> None:
    if model_parallel == 1:
        return
    family = families.of_model(backbone)
    if not family.model_parallel:
        raise BadInputError("--distribution", "model", "a model whose family has a layout map: "
                            + ", ".join(f.title for f in families.all_families() if f.model_parallel), f"got {family.title}")
    for name, size in family.model_parallel_sizes(backbone).items():
        if size % model_parallel:
            raise BadInputError("--model-parallel", model_parallel, f"a divisor of the model's {name} ({size})")


def shard_batch(distribution, array):
    """Place a global host batch on the devices as the distribution's data layout says. With several processes,
    each feeds only its own rows (every process builds the same global batch, so the padded width and the LM
    head's capacity agree)."""
    import jax

    if distribution is None:
        return jax.numpy.asarray(array)
    sharding = distribution.get_data_layout(array.shape).backend_layout
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    return jax.make_array_from_process_local_data(sharding, array[multihost.local_rows(sharding, array.shape)], array.shape)
