"""Serving hand-off for the champion: `serve` = `none`, `vertex` or `gke`.

- `vertex`: register the champion's export in Vertex AI Model Registry with the provider's `UploadModelOperator`
  (a new version of an existing model when `GEMMA_PIPELINE_VERTEX_MODEL` names one), with a vLLM serving
  container, and deploy it to the endpoint `GEMMA_PIPELINE_VERTEX_ENDPOINT` names, if any.
- `vertex` with several converted candidates (`convert_all`): each is a version of one Model Registry model
  (labelled with its run and candidate key), and the approved one is made the default version.
- `gke`: a vLLM Deployment + Service (`k8s/serving/`, generated from `gke_objects`), labelled for Kueue's own
  `serving` queue (a ClusterQueue outside the training cohort: training can neither borrow its quota nor preempt
  it), reading the model from the bucket through the GKE Cloud Storage FUSE CSI driver. The task creates or
  patches it and waits until it is available. With one converted candidate it serves the merged export as
  `gemma-champion`; with several (`convert_all`), one base with every candidate's PEFT adapter (`--enable-lora`),
  each under its candidate key and the approved one also as `gemma-champion` (`served`).

Every request is built by a pure function here and checked against the client library's own types.
`python -m gemma_pipeline.tools.generate write serving` renders the kustomize base for `kubectl` users.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable
from typing import Any

from gemma_pipeline.plan import GENERATED_HEADER, access
from jobs.contract import artifacts

MODES = ("none", "vertex", "gke")
# vLLM's OpenAI-compatible server for GKE; Vertex needs a container that speaks its prediction protocol and
# reads gs:// (Model Garden's vLLM build), mirrored into your Artifact Registry: no default, set it.
# v0.34.0: Gemma 4 (from 0.19) with LoRA (after PR #39291); the flags below are checked against its own parser
# (tests/dags/test_vllm_cli.py). GEMMA_PIPELINE_VLLM_IMAGE may pin a digest instead (image@sha256:...).
VLLM_VERSION = "0.34.0"
GKE_VLLM_IMAGE = os.environ.get("GEMMA_PIPELINE_VLLM_IMAGE", f"vllm/vllm-openai:v{VLLM_VERSION}")
VERTEX_VLLM_IMAGE_ENV = "GEMMA_PIPELINE_VERTEX_VLLM_IMAGE"
VERTEX_MODEL_ENV = "GEMMA_PIPELINE_VERTEX_MODEL"  # a model ID or projects/P/locations/L/models/ID: upload as its versions
VERTEX_ENDPOINT_ENV = "GEMMA_PIPELINE_VERTEX_ENDPOINT"  # an endpoint id: deploy the uploaded version there
SERVING = {"namespace": os.environ.get("GEMMA_PIPELINE_SERVING_NAMESPACE", "serving"), "queue": "serving-queue",
           "priority_class": "serving", "name": "gemma-champion", "port": 8000}
FUSE_ROOT = "/models"
# What a client names in a request's "model": the approved model (whichever candidate it is), and the base.
APPROVED_NAME = "gemma-champion"
BASE_NAME = "gemma-base"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices (vllm/config/lora.py)


def pinned(image: str) -> str:
    name, _, tag = image.rpartition(":")
    if "@sha256:" not in image and (not name or "/" in tag or tag in ("", "latest")):
        raise ValueError(f"serving image: got {image!r}; expected one pinned by tag or digest (never latest)")
    return image


def vertex_model(display_name: str, artifact_uri: str, image: str, labels: dict[str, str]) -> dict[str, Any]:
    """The `Model` UploadModelOperator sends: the export as the artifact, served by vLLM on Vertex's routes."""
    from google.cloud.aiplatform_v1.types import Model

    model = {
        "display_name": display_name[:128],
        "description": "Gemma LoRA fine-tune (a candidate of its run: see its labels), Hugging Face format, served by vLLM",
        "artifact_uri": artifact_uri,
        "container_spec": {
            "image_uri": pinned(image),
            # Model Garden's build keeps this Vertex-protocol server (/generate, /ping); upstream vLLM dropped the
            # module (0.34 has none), so an upstream image cannot serve here: GKE runs upstream's `vllm serve`.
            "command": ["python", "-m", "vllm.entrypoints.api_server"],
            "args": ["--host=0.0.0.0", "--port=8080", "--model=$(AIP_STORAGE_URI)", "--max-model-len=4096",
                     "--gpu-memory-utilization=0.9"],
            "ports": [{"container_port": 8080}],
            "predict_route": "/generate",
            "health_route": "/ping",
        },
        "labels": labels,
    }
    Model(model)  # the client's own type: an unknown or misspelled field raises here, not at the API
    return model


PIPELINE_LABEL = {"pipeline": "gemma-lora"}  # on every version this DAG uploads


def label(value: str) -> str:
    """A Vertex label value: lowercase letters, digits, - and _, at most 63."""
    return re.sub(r"[^a-z0-9_-]+", "-", value.lower())[:63]


def vertex_labels(run: str, candidate: str, approved: bool) -> dict[str, str]:
    """What a candidate's version says of itself: its run and candidate, and whether it is the approved one."""
    return {**PIPELINE_LABEL, "run": label(run), "candidate": label(candidate), "approved": str(approved).lower()}


def run_filter(run: str) -> str:
    """The ListModels filter (AIP-160) for the model a run created when no GEMMA_PIPELINE_VERTEX_MODEL named one."""
    return " AND ".join(f'labels.{key}="{value}"' for key, value in {**PIPELINE_LABEL, "run": label(run)}.items())


def model_id(value: str, project: str, location: str) -> str:
    """The model ID the provider's hooks take (they build `projects/P/locations/L/models/ID` themselves), from an ID
    or a full resource name in this region and project (by ID, or by number, as the console prints it)."""
    match = re.fullmatch(r"(?:projects/([^/]+)/locations/([^/]+)/models/)?([A-Za-z0-9_-]+)", value.strip())
    if not match or (match[1] and (match[2] != location or match[1] != project and not match[1].isdigit())):
        raise ValueError(f"{VERTEX_MODEL_ENV}: got {value!r}; expected a model ID or projects/{project}/locations/"
                         f"{location}/models/ID (the serve task's project and region)")
    return match[3]


def registered(versions: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """The versions this DAG uploaded among a model's (`Model` messages, as ListModelVersions returns them), by the
    export they serve: a retried `serve` reuses them. The export's URI names the bucket, run and candidate, so a
    deployment sharing the model and the run name never takes another's."""
    found = {}
    for version in versions:
        labels = dict(version.labels)
        if PIPELINE_LABEL.items() <= labels.items() and version.artifact_uri:
            found[version.artifact_uri] = {"model": version.name.partition("@")[0],
                                           "model_version_id": version.version_id, "labels": labels}
    return found


def relabelled(found: dict[str, Any], approved: bool) -> dict[str, Any] | None:
    """The UpdateModel request that makes an uploaded version's `approved` label say what the decision is now (it
    changed: a cleared `approve` answered again); None when it does. The labels read back hold the model's and the
    version's merged: all are written back, as the version's, which keeps any added in the console."""
    from google.cloud.aiplatform_v1.types import UpdateModelRequest

    merged = {**found["labels"], "approved": str(approved).lower()}
    if merged == found["labels"]:
        return None
    request = {"model": {"name": model_version(found["model"], found["model_version_id"]), "labels": merged},
               "update_mask": {"paths": ["labels"]}}
    UpdateModelRequest(request)
    return request


def deployed_model_id(model: str, version_id: str | None) -> str:
    """The DeployedModel id of a model version on an endpoint (10 digits, as the API allows), the same on every try:
    a deploy repeated while the first is still running is refused as a duplicate instead of adding a copy."""
    digest = int(hashlib.sha256(model_version(model, version_id).encode()).hexdigest(), 16)
    return str(1_000_000_000 + digest % 9_000_000_000)


def deployed_on(endpoint: Any, model: str, version_id: str | None) -> str | None:
    """The id under which an endpoint (an `Endpoint` message) already serves this model version, if it does."""
    for deployed in endpoint.deployed_models:
        name, _, at = deployed.model.partition("@")
        if name == model and (at or deployed.model_version_id or None) == version_id:
            return deployed.id
    return None


def vertex_deployed_model(display_name: str, machine_type: str = "g2-standard-12", accelerator: str = "NVIDIA_L4",
                          count: int = 1, deployed_id: str = "") -> dict[str, Any]:
    from google.cloud.aiplatform_v1.types import DeployedModel

    deployed = {"display_name": display_name[:128], **({"id": deployed_id} if deployed_id else {}), "dedicated_resources": {
        "machine_spec": {"machine_type": machine_type, "accelerator_type": accelerator, "accelerator_count": count},
        "min_replica_count": 1, "max_replica_count": 1}}
    DeployedModel(deployed)
    return deployed


def model_version(model: str, version_id: str | None, full: bool = True) -> str:
    """A Model Registry version: its resource name (`projects/P/locations/L/models/ID@VERSION`, what a deployment
    names), or with `full=False` the `ID@VERSION` the provider's model hook builds that name from."""
    name = model if full else model.rsplit("/", 1)[-1]
    return f"{name}@{version_id}" if version_id else name


def max_lora_rank(ranks: list[int]) -> int:
    """The smallest rank vLLM offers (`LORA_RANKS`) that holds every adapter's."""
    top = max(ranks, default=0)
    for choice in LORA_RANKS:
        if choice >= top:
            return choice
    raise ValueError(f"LoRA rank: got {top}; expected at most {LORA_RANKS[-1]}, the largest vLLM serves")


def vllm_args(model_dir: str, adapters: dict[str, str] | None = None, ranks: list[int] | None = None) -> list[str]:
    """`vllm serve`'s arguments: the merged model as `gemma-champion`; or, with `adapters` (name -> path in the
    pod), the base as `gemma-base` with each adapter a LoRA module of its own, all resident at once."""
    args = ["--host=0.0.0.0", f"--port={SERVING['port']}", f"--model={model_dir}",
            f"--served-model-name={BASE_NAME if adapters else APPROVED_NAME}", "--max-model-len=4096"]
    if adapters:
        modules = [json.dumps({"name": name, "path": path, "base_model_name": BASE_NAME}) for name, path in adapters.items()]
        args += ["--enable-lora", "--lora-modules", *modules, f"--max-loras={len(adapters)}",
                 f"--max-cpu-loras={len(adapters)}", f"--max-lora-rank={max_lora_rank(list(ranks or []))}"]
    return args


def served(record: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    """What serve=gke mounts and runs for a champion record. `ranks`: the LoRA rank of each converted candidate
    with a PEFT adapter, by key. One such candidate: the approved merged export. Several: the base exported by
    the approved candidate's convert (`base/`), with every adapter mounted on its own and the approved one also
    under the stable name."""
    rows = {r["key"]: r for r in record["candidates"]}
    approved = record["champion"]
    convert = rows[approved]["prefixes"]["convert"]
    if len(ranks) < 2:
        return {"mounts": {FUSE_ROOT: convert}, "args": vllm_args(FUSE_ROOT), "models": [APPROVED_NAME]}
    if approved not in ranks:
        raise ValueError(f"serving: the approved candidate {approved} has no PEFT adapter; expected peft_adapter on")
    mounts = {f"{FUSE_ROOT}/base": f"{convert}/{artifacts.BASE_EXPORT}"}
    adapters = {}
    for key in sorted(ranks, key=lambda k: k != approved):
        mounts[f"{FUSE_ROOT}/adapters/{key}"] = f"{rows[key]['prefixes']['convert']}/{artifacts.PEFT_ADAPTER}"
        adapters[key] = f"{FUSE_ROOT}/adapters/{key}"
    adapters = {APPROVED_NAME: adapters[approved], **adapters}
    return {"mounts": mounts, "args": vllm_args(f"{FUSE_ROOT}/base", adapters, list(ranks.values())),
            "models": [BASE_NAME, *adapters]}


# The API key: vLLM reads VLLM_API_KEY (as `--api-key` would set it, without putting the key on the command line)
# and refuses /v1 requests without `Authorization: Bearer <key>`. The Secret is required: no key, no pod.
API_KEY_ENV = "VLLM_API_KEY"
API_KEY_SECRET = {"name": "gemma-serving-api-key", "key": "api-key"}
# Who may call the server: pods labelled CLIENT_LABEL=true in the namespaces GEMMA_PIPELINE_SERVING_CLIENTS names.
CLIENT_LABEL = "gemma-lora-pipeline/serving-client"
CLIENT_NAMESPACES = tuple(n for n in os.environ.get("GEMMA_PIPELINE_SERVING_CLIENTS", SERVING["namespace"]).split(",") if n)
# The root filesystem is read-only: every path vLLM, torch, Triton and Hugging Face write points into /tmp.
SERVING_ENV = {"HOME": "/tmp", "HF_HOME": "/tmp/hf", "XDG_CACHE_HOME": "/tmp/.cache", "XDG_CONFIG_HOME": "/tmp/.config",
               "VLLM_CACHE_ROOT": "/tmp/.cache/vllm", "VLLM_CONFIG_ROOT": "/tmp/.config/vllm",
               "TRITON_CACHE_DIR": "/tmp/.triton", "TORCHINDUCTOR_CACHE_DIR": "/tmp/torchinductor",
               "HF_HUB_OFFLINE": "1"}
SERVING_RESOURCES = {"requests": {"cpu": "4", "memory": "24Gi", "ephemeral-storage": "10Gi", "nvidia.com/gpu": "1"},
                     "limits": {"memory": "24Gi", "ephemeral-storage": "30Gi", "nvidia.com/gpu": "1"}}


def gke_objects(mounts: dict[str, str], args: list[str], image: str = GKE_VLLM_IMAGE, namespace: str = SERVING["namespace"],
                service_account: str = access.EXAMPLE.ksa(access.SERVING), clients: tuple[str, ...] = CLIENT_NAMESPACES) -> list[dict[str, Any]]:
    """The NetworkPolicy that admits only the named clients, the vLLM Deployment and its Service. The pod mounts
    only the prefixes in `mounts` (path in the pod -> gs:// prefix, one bucket), each read-only, not the bucket."""
    buckets = {uri.removeprefix("gs://").partition("/")[0] for uri in mounts.values()}
    if len(buckets) != 1:
        raise ValueError(f"serving mounts: got buckets {sorted(buckets)}; expected the run's one bucket")
    volumes = [{"name": f"models-{i}", "csi": {"driver": "gcsfuse.csi.storage.gke.io", "readOnly": True, "volumeAttributes": {
        "bucketName": uri.removeprefix("gs://").partition("/")[0],
        "mountOptions": f"implicit-dirs,only-dir={uri.removeprefix('gs://').partition('/')[2]}"}}}
        for i, uri in enumerate(mounts.values())]
    model_mounts = [{"name": f"models-{i}", "mountPath": path, "readOnly": True} for i, path in enumerate(mounts)]
    name, labels = SERVING["name"], {"app.kubernetes.io/name": SERVING["name"], "app.kubernetes.io/part-of": "gemma-lora-pipeline"}
    env = [{"name": k, "value": v} for k, v in SERVING_ENV.items()]
    env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {**API_KEY_SECRET, "optional": False}}})
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": {
            **labels, "kueue.x-k8s.io/queue-name": SERVING["queue"], "kueue.x-k8s.io/priority-class": SERVING["priority_class"]}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {"labels": labels, "annotations": {"gke-gcsfuse/volumes": "true"}},
                "spec": {
                    "serviceAccountName": service_account,
                    "automountServiceAccountToken": False,  # it reads the bucket through FUSE, never the Kubernetes API
                    "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "vllm", "image": pinned(image), "args": args, "env": env,
                        "ports": [{"name": "http", "containerPort": SERVING["port"]}],
                        "resources": SERVING_RESOURCES,
                        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "failureThreshold": 60},
                        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [*model_mounts, {"name": "scratch", "mountPath": "/tmp"},
                                         {"name": "shm", "mountPath": "/dev/shm"}],
                    }],
                    "volumes": [
                        *volumes,
                        {"name": "scratch", "emptyDir": {"sizeLimit": "20Gi"}},
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
                    ],
                },
            },
        },
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace, "labels": labels},
               "spec": {"selector": {"app.kubernetes.io/name": name},
                        "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": name, "namespace": namespace, "labels": labels},
              "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": name}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                           {"key": "kubernetes.io/metadata.name", "operator": "In", "values": list(clients)}]},
                           "podSelector": {"matchLabels": {CLIENT_LABEL: "true"}}}],
                           "ports": [{"protocol": "TCP", "port": SERVING["port"]}]}]}}
    return [policy, deployment, service]  # the policy first: the server is never reachable without it


def check_api_key(core: Any, namespace: str) -> None:
    """The Deployment needs its key; without the Secret its pod would wait forever in CreateContainerConfigError."""
    from kubernetes.client.rest import ApiException

    name, key = API_KEY_SECRET["name"], API_KEY_SECRET["key"]
    expected = (f"expected a Secret {namespace}/{name} with key {key!r}: kubectl -n {namespace} create secret generic "
                f"{name} --from-literal={key}=\"$(openssl rand -hex 32)\" (docs/security.md)")
    try:
        secret = core.read_namespaced_secret(name, namespace)
    except ApiException as err:
        if err.status != 404:
            raise
        raise ValueError(f"serving API key: no Secret {namespace}/{name}; {expected}") from None
    if key not in (secret.data or {}):
        raise ValueError(f"serving API key: Secret {namespace}/{name} has keys {sorted(secret.data or {})}; {expected}")


def wait_available(apps: Any, name: str, namespace: str, timeout_s: float, poll_s: float = 10.0,
                   clock: Any = time.monotonic, sleep: Any = time.sleep, log: Any = print) -> dict[str, Any]:
    """Poll the Deployment until its newest generation has every replica available."""
    deadline = clock() + timeout_s
    while True:
        status = apps.read_namespaced_deployment_status(name, namespace).to_dict()
        spec, st, meta = status.get("spec") or {}, status.get("status") or {}, status.get("metadata") or {}
        if (st.get("observed_generation") or 0) >= (meta.get("generation") or 0) \
                and (st.get("available_replicas") or 0) >= (spec.get("replicas") or 1):
            return st
        if clock() >= deadline:
            raise TimeoutError(f"Deployment {namespace}/{name} not available after {timeout_s:.0f} s: {st.get('conditions')}")
        log(f"waiting for Deployment {namespace}/{name}: {st.get('available_replicas') or 0} of {spec.get('replicas') or 1} available")
        sleep(poll_s)


def apply(apps: Any, core: Any, networking: Any, objects: list[dict[str, Any]]) -> None:
    """Create each object, or replace its spec when it exists (a new champion rolls the Deployment)."""
    from kubernetes.client.rest import ApiException

    calls = {"Deployment": (apps.create_namespaced_deployment, apps.patch_namespaced_deployment),
             "Service": (core.create_namespaced_service, core.patch_namespaced_service),
             "NetworkPolicy": (networking.create_namespaced_network_policy, networking.patch_namespaced_network_policy)}
    for obj in objects:
        name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
        create, patch = calls[obj["kind"]]
        try:
            create(namespace, obj)
        except ApiException as err:
            if err.status != 409:
                raise
            patch(name, namespace, obj)


def render() -> dict[str, str]:
    import yaml


    header = GENERATED_HEADER
    export = "gs://my-gemma-bucket/runs/manual-001/candidates/default/convert"
    example = gke_objects({FUSE_ROOT: export}, vllm_args(FUSE_ROOT), service_account=access.EXAMPLE.ksa(access.SERVING))
    files = {f"base/{o['kind'].lower()}.yaml": header + yaml.safe_dump(o, sort_keys=False, width=120) for o in example}
    files["base/kustomization.yaml"] = header + yaml.safe_dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": sorted(
            f"{o['kind'].lower()}.yaml" for o in example)}, sort_keys=False)
    # The service account apart: applied once per deployment, without starting a GPU pod (docs/security.md).
    (account,) = access.service_accounts(access.EXAMPLE, SERVING["namespace"], (access.SERVING,))
    files["identities/serviceaccount.yaml"] = header + yaml.safe_dump(account, sort_keys=False, width=120)
    files["identities/kustomization.yaml"] = header + yaml.safe_dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["serviceaccount.yaml"]},
        sort_keys=False)
    return files
