"""Device layout for training through `keras.distribution`: data parallel, or model parallel for Gemma 3
with a layout map (keras-hub ships one for Gemma only)."""

from __future__ import annotations

import logging

from jobs.contract.errors import BadInputError
from jobs.finetuning import multihost

log = logging.getLogger(__name__)


def gemma3_layout_map(device_mesh, model_dim: str = "model"):
    """Shard the big kernels over the model axis. Query heads and the feed-forward width are split;
    key/value kernels split the hidden dimension because Gemma 3 often has a single key/value head."""
    import keras

    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map["token_embedding/embeddings"] = (model_dim, None)
    layout_map["decoder_block.*attention/query/kernel"] = (model_dim, None, None)
    layout_map["decoder_block.*attention/(key|value)/kernel"] = (None, model_dim, None)
    layout_map["decoder_block.*attention_output/kernel"] = (model_dim, None, None)
    layout_map["decoder_block.*ffw_gating(_2)?/kernel"] = (None, model_dim)
    layout_map["decoder_block.*ffw_linear/kernel"] = (model_dim, None)
    return layout_map


def setup(kind: str, model_parallel: int, batch_size: int):
    """Install a global keras distribution before the model is built; returns it (or None)."""
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
        mesh = keras.distribution.DeviceMesh((data, model_parallel), ["batch", "model"], devices)
        distribution = keras.distribution.ModelParallel(layout_map=gemma3_layout_map(mesh), batch_dim_name="batch")
    keras.distribution.set_distribution(distribution)
    log.info("distribution %s over %d %s devices", type(distribution).__name__, n, devices[0].platform)
    return distribution


def check_model_parallel(backbone, model_parallel: int) -> None:
    if model_parallel == 1:
        return
    if type(backbone).__name__ != "Gemma3Backbone":
        raise BadInputError("--distribution", "model", "a Gemma 3 model (the layout map covers Gemma 3 only)")
    dims = {"query heads": backbone.num_query_heads, "hidden size": backbone.hidden_dim,
            "feed-forward size": backbone.intermediate_dim, "vocabulary": backbone.vocabulary_size}
    for name, size in dims.items():
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
