"""The Kubernetes Job of each stage, built from plain dicts so the DAG, `k8s/jobs/` and tests share it.

A Job is created suspended with the Kueue queue label; Kueue admits it by unsuspending it. Exit codes 2, 3
and 4 (bad input, quality gate, export mismatch) fail the Job at once; pod disruptions (preemption, node
drain) do not count against `backoffLimit`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from gemma_pipeline.plan.profiles import Profile
from jobs.contract import env as contract_env
from jobs.contract import spec, stages
from jobs.contract.errors import NON_RETRIABLE_EXIT_CODES
from jobs.contract.layout import SHARED, RunLayout, run_key

STAGES = stages.NAMES
ENGINES = ("gke", "dataflow")  # the preprocessing's two engines (param preprocess_engine)
CONTAINER = "stage"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The root filesystem is read-only: every cache and scratch path points into the /tmp emptyDir. Unbuffered
# output so the pod log (and the local backend's task log) shows progress as it happens.
STAGE_ENV = {
    "PYTHONUNBUFFERED": "1",
    "HOME": "/tmp",
    "XDG_CACHE_HOME": "/tmp/.cache",
    "KERAS_HOME": "/tmp/.keras",
    "MPLCONFIGDIR": "/tmp/.matplotlib",
    "GEMMA_PIPELINE_CACHE": "/tmp/gemma-lora-pipeline",
    "STAGE_WORKDIR": "/tmp",
}
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
STAGE_LABEL = "gemma-lora-pipeline/stage"
RUN_LABEL = "gemma-lora-pipeline/run"
CANDIDATE_LABEL = "gemma-lora-pipeline/candidate"
# The stage records its image in its manifest: pinned by digest, that is the code identity a skip compares.
IMAGE_ENV = contract_env.IMAGE_ENV
# Tokens for gated models (hf://, Kaggle presets) come only from this Kubernetes Secret, never from params or
# literals; optional, so a missing Secret or key leaves the variable unset instead of blocking the pod.
TOKEN_SECRET_NAME = "gemma-pipeline-tokens"
SECRET_ENV = {"HF_TOKEN": "hf-token", "KAGGLE_USERNAME": "kaggle-username", "KAGGLE_KEY": "kaggle-key"}


def deployment_env() -> dict[str, str]:
    """Stage settings that come from the deployment (Composer's environment variables), not from a run's params:
    where the shared XLA compilation cache lives (a gs:// prefix; unset: each stage compiles for itself)."""
    cache = os.environ.get(contract_env.COMPILATION_CACHE_ENV, "")
    if cache and not cache.startswith("gs://"):
        raise ValueError(f"{contract_env.COMPILATION_CACHE_ENV}: got {cache!r}; expected a gs:// prefix the stages' "
                         "identities can read and write")
    return {contract_env.COMPILATION_CACHE_ENV: cache} if cache else {}


def env_list(extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
    literal = [{"name": k, "value": v} for k, v in sorted({**STAGE_ENV, **deployment_env(), **(extra or {})}.items())]
    secret = [{"name": name, "valueFrom": {"secretKeyRef": {"name": TOKEN_SECRET_NAME, "key": key, "optional": True}}}
              for name, key in SECRET_ENV.items()]
    return literal + secret


@dataclass(frozen=True)
class JobSettings:
    namespace: str
    queue: str
    service_account: str
    image: str
    profile: Profile
    ttl_seconds_after_finished: int = 7 * 24 * 3600
    backoff_limit: int = 3
    priority_class: str = ""
    active_deadline_seconds: int = 0  # 0: the profile's deadline


def images(registry: str, tag: str, digests: str = "") -> dict[str, str]:
    """Every image docker/cloudbuild.yaml pushes, by name; `digests` (JSON: image name to `sha256:...`, as Cloud
    Build reports them) pins any of them by digest too, which each stage then records as its code identity."""
    if not tag or tag == "latest":
        raise ValueError(f"image tag: got {tag!r}; expected a release tag or a commit SHA (never latest)")
    pinned = parse_digests(digests)
    return {name: f"{registry}/{name}:{tag}" + (f"@{pinned[name]}" if name in pinned else "") for name in stages.IMAGE_NAMES}


def parse_digests(text: str) -> dict[str, str]:
    import re

    from gemma_pipeline.plan import json_object

    where = "GEMMA_PIPELINE_IMAGE_DIGESTS"
    if not text.strip():
        return {}
    value = json_object(text, where, "an object of image name to sha256:<64 hex digits>")
    for name, digest in value.items():
        if name not in stages.IMAGE_NAMES:
            raise ValueError(f"{where}: unknown image {name!r}; expected one of {', '.join(stages.IMAGE_NAMES)}")
        if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ValueError(f"{where}: digest of {name!r} is {digest!r}; expected sha256:<64 lowercase hex digits>")
    return value


def pod_failure_policy() -> dict[str, Any]:
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": list(NON_RETRIABLE_EXIT_CODES)}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


CONTAINER_SECURITY = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"}}
VOLUME_MOUNTS = [{"name": "scratch", "mountPath": "/tmp"}]


def job_labels(stage: str, queue: str, priority_class: str = "") -> dict[str, str]:
    labels = {QUEUE_LABEL: queue, "app.kubernetes.io/part-of": "gemma-lora-pipeline", STAGE_LABEL: stage}
    if priority_class:
        labels[PRIORITY_LABEL] = priority_class
    return labels


def resources(profile: Profile) -> dict[str, dict[str, str]]:
    return {"requests": dict(profile.requests), **({"limits": dict(profile.limits)} if profile.limits else {})}


def stage_image(profile: Profile, image: str, gpu_image: str = "") -> str:
    """A GPU profile runs the stage's GPU image (JAX's CUDA build) where it has one; the default carries jax[tpu]."""
    return gpu_image if profile.accelerator_resource == "nvidia.com/gpu" and gpu_image else image


def job_manifest(stage: str, settings: JobSettings, args: list[str], name: str, env: dict[str, str] | None = None,
                 labels: dict[str, str] | None = None, pod_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The one builder of a stage's Job: the DAG's task submits it (with its run's `labels` and the provider's
    `pod_labels` it finds the pods by) and `k8s/jobs` renders it."""
    command = stages.get(stage).command
    profile = settings.profile
    if stage == "finetune" and "--distribution" not in args:
        args = [*args, *profile.distribution_args]  # the profile picks data or model parallel
    job_labels_ = {**job_labels(stage, settings.queue, settings.priority_class), **(labels or {})}
    container = {
        "name": CONTAINER,
        "image": settings.image,
        "command": command,
        "args": list(args),
        "env": env_list({IMAGE_ENV: settings.image, **(env or {})}),
        "resources": resources(profile),
        "securityContext": dict(CONTAINER_SECURITY),
        "volumeMounts": [dict(v) for v in VOLUME_MOUNTS],
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": settings.service_account,
        # No stage talks to the Kubernetes API: its identity is only for Google APIs (Workload Identity's metadata
        # server), so no API token is mounted for a compromised dependency to use.
        "automountServiceAccountToken": False,
        "nodeSelector": dict(profile.node_selector),
        "securityContext": dict(POD_SECURITY),
        "containers": [container],
        "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": profile.scratch}}],
    }
    if profile.tolerations:
        pod["tolerations"] = [dict(t) for t in profile.tolerations]
    spec: dict[str, Any] = {
        "suspend": True,
        "parallelism": 1,
        "completions": 1,
        "backoffLimit": settings.backoff_limit,
        "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
        "activeDeadlineSeconds": settings.active_deadline_seconds or profile.deadline_s,
        "podFailurePolicy": pod_failure_policy(),
        "template": {"metadata": {"labels": {**job_labels_, **(pod_labels or {})}}, "spec": pod},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": job_labels_},
        "spec": spec,
    }


JOBSET_API = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "hosts"
COORDINATOR_ANNOTATION = "jobset.sigs.k8s.io/coordinator"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # set by the JobSet controller on every pod it creates
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # an Indexed Job's pod: its host (process) number
TOPOLOGY_ANNOTATION = "kueue.x-k8s.io/podset-required-topology"
DWS_RUN_ANNOTATION = "provreq.kueue.x-k8s.io/maxRunDurationSeconds"
# What the fine-tune reads to join its processes; the process id comes from the Indexed Job's
# JOB_COMPLETION_INDEX, which Kubernetes sets in every pod.
NUM_PROCESSES_ENV, COORDINATOR_ENV = contract_env.NUM_PROCESSES_ENV, contract_env.COORDINATOR_ENV
COORDINATOR_FIELD = f"metadata.annotations['{COORDINATOR_ANNOTATION}']"


def multihost_env(profile: Profile) -> list[dict[str, Any]]:
    """The processes' rendezvous. A multi-host TPU slice needs none: GKE injects TPU_WORKER_HOSTNAMES and
    TPU_WORKER_ID, from which JAX finds the coordinator itself."""
    if profile.tpu:
        return []
    return [{"name": NUM_PROCESSES_ENV, "value": str(profile.hosts)},
            {"name": COORDINATOR_ENV, "valueFrom": {"fieldRef": {"fieldPath": COORDINATOR_FIELD}}}]


def multihost_pod_failure_policy() -> dict[str, Any]:
    """As for Jobs, exit 2/3/4 fail at once; a disrupted host fails its Job too, so the JobSet restarts the
    whole group (a lone replacement pod could not rejoin the others' collective)."""
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": list(NON_RETRIABLE_EXIT_CODES)}},
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def jobset_failure_policy(max_restarts: int) -> dict[str, Any]:
    """Read from the failed Job's reason and message (Kubernetes' podFailurePolicy wording): a non-retriable
    exit, or the profile's deadline, fails the JobSet; a disruption restarts the group without counting against `max_restarts`; any other
    failure (a crash, exit 143 after a checkpoint) restarts the group and counts."""
    return {"maxRestarts": max_restarts, "restartStrategy": "Recreate", "rules": [
        {"name": "NonRetriableExit", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"],
         "onJobFailureMessagePatterns": [f"failed with exit code ({'|'.join(map(str, NON_RETRIABLE_EXIT_CODES))}) matching FailJob rule"]},
        {"name": "Disruption", "action": "RestartJobSetAndIgnoreMaxRestarts", "onJobFailureReasons": ["PodFailurePolicy"],
         "onJobFailureMessagePatterns": ["has condition DisruptionTarget matching FailJob rule"]},
        # A restart would reset the child Job's deadline: the group holds the slice at most one deadline.
        {"name": "Deadline", "action": "FailJobSet", "onJobFailureReasons": ["DeadlineExceeded"]},
    ]}


def jobset_manifest(job: dict[str, Any], profile: Profile, max_run_seconds: int = 86400) -> dict[str, Any]:
    """A multi-host stage: the single-host Job (`job_manifest`, or the one the DAG's operator built) as the
    template of one Indexed Job with a pod per host, in a JobSet that Kueue admits as one gang."""
    import copy

    job = copy.deepcopy(job)
    spec, template = job["spec"], job["spec"]["template"]
    template["spec"]["containers"][0]["env"] += multihost_env(profile)
    if profile.topology_level:
        template.setdefault("metadata", {}).setdefault("annotations", {})[TOPOLOGY_ANNOTATION] = profile.topology_level
    ttl = spec.pop("ttlSecondsAfterFinished", None)
    spec.pop("suspend", None)  # Kueue suspends the JobSet; the child Job follows it
    max_restarts = spec.get("backoffLimit", 3)
    spec.update(parallelism=profile.hosts, completions=profile.hosts, completionMode="Indexed", backoffLimit=0,
                podFailurePolicy=multihost_pod_failure_policy())
    metadata = {k: v for k, v in job["metadata"].items() if k in ("name", "namespace", "labels", "annotations")}
    if profile.dws:
        metadata.setdefault("annotations", {})[DWS_RUN_ANNOTATION] = str(max_run_seconds)
    jobset_spec: dict[str, Any] = {
        "suspend": True,
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
        "coordinator": {"replicatedJob": REPLICATED_JOB, "jobIndex": 0, "podIndex": 0},
        "failurePolicy": jobset_failure_policy(max_restarts),
        "successPolicy": {"operator": "All"},
        "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1,
                            "template": {"metadata": {"labels": dict(template.get("metadata", {}).get("labels", {}))},
                                         "spec": spec}}],
    }
    if ttl is not None:
        jobset_spec["ttlSecondsAfterFinished"] = ttl
    return {"apiVersion": JOBSET_API, "kind": "JobSet", "metadata": metadata, "spec": jobset_spec}


def stage_options(stage: str) -> list[spec.Option]:
    return spec.options(stages.get(stage).config)


def param_options() -> dict[str, spec.Option]:
    """Each DAG Param the stages take, declared by the first stage option that names it (in stage order); other
    stages' options with the same Param must agree with it (tests/dags/test_options.py)."""
    found: dict[str, spec.Option] = {}
    for stage in STAGES:
        for opt in stage_options(stage):
            if opt.param and opt.param not in found:
                found[opt.param] = opt
    return found


def param_defaults() -> dict[str, Any]:
    """The trigger form's defaults for the stage Params (the DAG's Params and k8s/jobs both start here)."""
    return {name: opt.param_default for name, opt in param_options().items()}


def run_layout(params: Any, run_id: str) -> RunLayout:
    """The run's layout from a task's Params and run id: what the `plan` task planned, found again by any task."""
    return RunLayout.of(params["bucket"], run_key(params.get("run_name"), run_id))


def template_parameters(args: list[str]) -> dict[str, str]:
    """A stage's arguments as Dataflow Flex Template parameters: `--max-tokens 128` becomes {"max_tokens": "128"}.
    Empty values are left out (the option's default; Dataflow refuses empty parameters)."""
    return {flag[2:].replace("-", "_"): value for flag, value in zip(args[::2], args[1::2]) if value != ""}


def stage_args(stage: str, values: dict[str, Any], prefix: dict[str, str]) -> list[str]:
    """The stage CLI's arguments, the one renderer of them: every option bound to a DAG Param, and every upstream
    prefix. `values` maps Param names to values; missing ones take the defaults. The fine-tune's distribution
    flags come from its profile (`job_manifest`)."""
    stages.get(stage)
    merged = {**param_defaults(), **values}
    args: list[str] = []
    for opt in stage_options(stage):
        if opt.upstream:
            value: Any = (f"{prefix[SHARED]}/{stage}" if opt.upstream == SHARED
                          else prefix[stage if opt.upstream == "self" else opt.upstream])
        elif opt.param:
            value = merged[opt.param]
        else:
            continue
        if value is None:
            value = ""  # a nullable option left empty: the CLI's "none"
        elif isinstance(value, bool):
            value = "true" if value else "false"
        args += [opt.flag, str(value)]
    return args


def with_option(stage: str, args: list[str], name: str, value: Any) -> list[str]:
    """`args` with one more of the stage's options set (a task's decision after the plan, e.g. convert's
    export_base for the candidate whose base is served)."""
    opt = next((o for o in stage_options(stage) if o.name == name), None)
    if opt is None:
        raise ValueError(f"{stage}: no option {name!r}; expected one of {', '.join(o.name for o in stage_options(stage))}")
    rendered = ("true" if value else "false") if isinstance(value, bool) else str(value)
    out = list(args)
    if opt.flag in out:
        out[out.index(opt.flag) + 1] = rendered
        return out
    return [*out, opt.flag, rendered]
