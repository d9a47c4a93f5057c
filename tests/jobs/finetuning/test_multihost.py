"""Who a fine-tune process is, from the environment a JobSet pod, a TPU slice or the local backend gives it;
bad values exit 2 naming the variable. (The processes themselves: tests/reliability/test_multihost.py.)"""

from __future__ import annotations

import pytest

from jobs.contract.errors import BadInputError
from jobs.finetuning import multihost


def test_a_plain_pod_is_one_process():
    assert multihost.detect({}) == multihost.Cluster()
    assert multihost.detect({"GEMMA_PIPELINE_NUM_PROCESSES": "1"}) == multihost.Cluster()
    assert multihost.detect({"TPU_WORKER_HOSTNAMES": "only-host"}) == multihost.Cluster()  # a single-host slice


def test_a_jobset_pod_takes_its_index_from_the_indexed_job():
    env = {"GEMMA_PIPELINE_NUM_PROCESSES": "2", "JOB_COMPLETION_INDEX": "1",
           "GEMMA_PIPELINE_COORDINATOR": "ft-hosts-0-0.ft"}  # the JobSet's coordinator annotation: no port
    assert multihost.detect(env) == multihost.Cluster(2, 1, f"ft-hosts-0-0.ft:{multihost.COORDINATOR_PORT}")
    explicit = {**env, "GEMMA_PIPELINE_PROCESS_ID": "0", "GEMMA_PIPELINE_COORDINATOR": "127.0.0.1:9999"}
    assert multihost.detect(explicit) == multihost.Cluster(2, 0, "127.0.0.1:9999")


def test_a_multihost_tpu_slice_is_detected_by_jax_itself():
    cluster = multihost.detect({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "TPU_WORKER_ID": "2"})
    assert cluster == multihost.Cluster(num_processes=4, process_id=2, tpu=True) and cluster.coordinator is None


@pytest.mark.parametrize(("env", "field"), [
    ({"GEMMA_PIPELINE_NUM_PROCESSES": "two"}, "GEMMA_PIPELINE_NUM_PROCESSES"),
    ({"GEMMA_PIPELINE_NUM_PROCESSES": "0"}, "GEMMA_PIPELINE_NUM_PROCESSES"),
    ({"GEMMA_PIPELINE_NUM_PROCESSES": "2", "GEMMA_PIPELINE_COORDINATOR": "h:1"}, "GEMMA_PIPELINE_PROCESS_ID"),
    ({"GEMMA_PIPELINE_NUM_PROCESSES": "2", "JOB_COMPLETION_INDEX": "2", "GEMMA_PIPELINE_COORDINATOR": "h"}, "JOB_COMPLETION_INDEX"),
    ({"GEMMA_PIPELINE_NUM_PROCESSES": "2", "JOB_COMPLETION_INDEX": "0"}, "GEMMA_PIPELINE_COORDINATOR"),
])
def test_bad_environments_name_the_variable(env, field):
    with pytest.raises(BadInputError) as err:
        multihost.detect(env)
    assert err.value.field == f"environment {field}"


def test_the_rows_a_process_feeds():
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = np.array(jax.devices()[:1])
    sharding = NamedSharding(Mesh(devices, ("batch",)), PartitionSpec("batch"))
    assert multihost.local_rows(sharding, (4, 8)) == slice(0, 4)  # one process holds the whole batch
