"""Serving hand-off to GKE: the vLLM objects validated strictly like the Jobs, the arguments for one or several
candidates, and the operator path with the Kubernetes client faked at its boundary (Vertex: test_serving_vertex.py)."""

from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace

import pytest
import yaml
from gemma_pipeline.operators.serve import ServeOperator
from gemma_pipeline.plan import serving

from tests.conftest import ROOT
from tests.support.serving import BOTH, EXPORT, RECORD, RUN


def test_images_must_be_pinned():
    for bad in ("vllm/vllm-openai", "vllm/vllm-openai:latest", "registry:5000/vllm"):
        with pytest.raises(ValueError, match="never latest"):
            serving.pinned(bad)
    assert serving.pinned("vllm/vllm-openai:v0.34.0") and serving.pinned("r/v@sha256:" + "a" * 64)
    assert serving.GKE_VLLM_IMAGE == f"vllm/vllm-openai:v{serving.VLLM_VERSION}"


@pytest.mark.parametrize("mode,backend,reason", [("none", "gke", "serve is none"), ("gke", "local", "needs Google Cloud")])
def test_serve_skips_when_there_is_nothing_to_do(monkeypatch, mode, backend, reason):
    from airflow.sdk.exceptions import AirflowSkipException

    monkeypatch.setenv("GEMMA_PIPELINE_BACKEND", backend)
    op = ServeOperator(task_id="serve", run_prefix=RUN, mode=mode, project_id="p", location="l", cluster_name="c")
    with pytest.raises(AirflowSkipException, match=reason):
        op.execute({})


def test_the_gke_objects_validate_strictly_and_serve_only_the_export_from_the_bucket():
    import kubernetes_validate

    objects = serving.gke_objects({"/models": EXPORT}, serving.vllm_args("/models"))
    assert [o["kind"] for o in objects] == ["NetworkPolicy", "Deployment", "Service"]  # never reachable without it
    for obj in objects:
        kubernetes_validate.validate(obj, "1.31", strict=True)
    deployment = objects[1]
    assert deployment["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "serving-queue"
    assert deployment["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "serving"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--model=/models" in container["args"]
    fuse = deployment["spec"]["template"]["spec"]["volumes"][0]["csi"]
    assert fuse["readOnly"] is True and fuse["volumeAttributes"]["bucketName"] == "bkt"
    assert "only-dir=runs/r1/candidates/lora-rank-8-abc/convert" in fuse["volumeAttributes"]["mountOptions"].split(",")
    assert not container["image"].endswith(":latest")
    with pytest.raises(ValueError, match="expected the run's one bucket"):
        serving.gke_objects({"/a": EXPORT, "/b": "gs://elsewhere/x"}, [])

    if shutil.which("kubectl"):
        built = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "serving" / "base")], check=True,
                               capture_output=True, text=True).stdout
        assert sorted(o["kind"] for o in yaml.safe_load_all(built) if o) == ["Deployment", "NetworkPolicy", "Service"]


def test_one_converted_candidate_is_served_merged_under_the_stable_name():
    plan = serving.served(RECORD, {"lora-rank-8-abc": 8})
    assert plan["mounts"] == {"/models": EXPORT} and plan["models"] == [serving.APPROVED_NAME]
    assert "--served-model-name=gemma-champion" in plan["args"] and "--enable-lora" not in plan["args"]


def test_every_candidates_adapter_is_served_on_one_base_the_approved_one_also_under_the_stable_name():
    import json

    import kubernetes_validate

    plan = serving.served(BOTH, {"default": 4, "lora-rank-8-abc": 8})
    base = f"{EXPORT}/base"
    assert plan["mounts"] == {"/models/base": base, "/models/adapters/lora-rank-8-abc": f"{EXPORT}/adapter",
                              "/models/adapters/default": f"{RUN}/candidates/default/convert/adapter"}
    args = plan["args"]
    assert "--model=/models/base" in args and "--served-model-name=gemma-base" in args and "--enable-lora" in args
    modules = [json.loads(a) for a in args[args.index("--lora-modules") + 1:] if a.startswith("{")]
    assert [(m["name"], m["path"]) for m in modules] == [("gemma-champion", "/models/adapters/lora-rank-8-abc"),
                                                         ("lora-rank-8-abc", "/models/adapters/lora-rank-8-abc"),
                                                         ("default", "/models/adapters/default")]
    assert {m["base_model_name"] for m in modules} == {"gemma-base"}
    assert "--max-loras=3" in args and "--max-cpu-loras=3" in args and "--max-lora-rank=8" in args
    assert plan["models"] == ["gemma-base", "gemma-champion", "lora-rank-8-abc", "default"]
    deployment = serving.gke_objects(plan["mounts"], args)[1]
    kubernetes_validate.validate(deployment, "1.31", strict=True)
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert [v["csi"]["volumeAttributes"]["mountOptions"].rsplit("only-dir=", 1)[1] for v in volumes if "csi" in v] == [
        "runs/r1/candidates/lora-rank-8-abc/convert/base", "runs/r1/candidates/lora-rank-8-abc/convert/adapter",
        "runs/r1/candidates/default/convert/adapter"]  # each read-only, nothing else of the bucket
    with pytest.raises(ValueError, match="the approved candidate lora-rank-8-abc has no PEFT adapter"):
        serving.served(BOTH, {"default": 4, "other": 8})


@pytest.mark.parametrize(("ranks", "expected"), [([1], 1), ([2, 4], 8), ([8], 8), ([12, 16], 16), ([300], 320), ([], 1)])
def test_the_max_lora_rank_is_rounded_up_to_what_vllm_offers(ranks, expected):
    assert serving.max_lora_rank(ranks) == expected


def test_a_rank_past_vllms_largest_is_refused():
    with pytest.raises(ValueError, match="LoRA rank: got 1024; expected at most 512"):
        serving.max_lora_rank([1024])


def test_the_serving_pod_is_locked_down():
    policy, deployment, service = serving.gke_objects({"/models": EXPORT}, ["--model=/models"])
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == "gemma-serving"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["limits"]["memory"] == container["resources"]["requests"]["memory"]
    # Every path the server writes is on a size-limited emptyDir: nothing else is writable.
    writable = {m["mountPath"]: m["name"] for m in container["volumeMounts"] if not m.get("readOnly")}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(writable) == {"/tmp", "/dev/shm"}
    assert all(volumes[name]["emptyDir"]["sizeLimit"] for name in writable.values())
    env = {e["name"]: e for e in container["env"]}
    assert all(env[k]["value"].startswith(("/tmp", "1")) for k in serving.SERVING_ENV)
    # Only labelled pods of the named namespaces reach the port; nothing else is admitted.
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"] and spec["podSelector"] == deployment["spec"]["selector"]
    (rule,) = spec["ingress"]
    (source,) = rule["from"]
    assert source["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["serving"]}]
    assert source["podSelector"] == {"matchLabels": {serving.CLIENT_LABEL: "true"}}
    assert rule["ports"] == [{"protocol": "TCP", "port": serving.SERVING["port"]}]


class _VllmAuthStub:
    """What vLLM's OpenAI server does with its key (vllm/entrypoints/openai/api_server.py, AuthenticationMiddleware):
    the key is `--api-key` or the VLLM_API_KEY env; /v1 routes need `Authorization: Bearer <key>`. Started with the
    environment the Deployment gives its container, Secrets resolved as the kubelet would."""

    def __init__(self, container: dict, secrets: dict[str, dict[str, str]]) -> None:
        import http.server
        import threading

        env = {}
        for e in container["env"]:
            if "valueFrom" in e:
                ref = e["valueFrom"]["secretKeyRef"]
                if ref["key"] not in secrets.get(ref["name"], {}):
                    assert ref.get("optional") is False  # the kubelet refuses to start the pod: no open server
                    raise RuntimeError(f"CreateContainerConfigError: secret {ref['name']} has no key {ref['key']}")
                env[e["name"]] = secrets[ref["name"]][ref["key"]]
            else:
                env[e["name"]] = e["value"]
        keys = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--api-key=")] or [env.get("VLLM_API_KEY")]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                ok = not self.path.startswith("/v1") or (keys[0] and self.headers.get("Authorization") == f"Bearer {keys[0]}")
                self.send_response(200 if ok else 401)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def status(self, path: str, key: str | None = None) -> int:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            return urllib.request.urlopen(request, timeout=5).status
        except urllib.error.HTTPError as err:
            return err.code


def test_the_server_refuses_a_request_without_the_key_from_the_secret():
    """Against a stub of vLLM's authentication (vLLM itself needs a GPU image): the Deployment's env carries the key
    from the Secret under the name vLLM reads, never as a literal or an argument."""
    deployment = serving.gke_objects({"/models": EXPORT}, serving.vllm_args("/models"))[1]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert not any(a.startswith("--api-key") for a in container["args"])
    (ref,) = [e for e in container["env"] if e["name"] == serving.API_KEY_ENV]
    assert ref["valueFrom"]["secretKeyRef"] == {**serving.API_KEY_SECRET, "optional": False}
    stub = _VllmAuthStub(container, {serving.API_KEY_SECRET["name"]: {serving.API_KEY_SECRET["key"]: "k-123"}})
    try:
        assert stub.status("/v1/models") == 401
        assert stub.status("/v1/models", "wrong") == 401
        assert stub.status("/v1/models", "k-123") == 200
        assert stub.status("/health") == 200  # the readiness probe needs no key
    finally:
        stub.server.shutdown()
    with pytest.raises(RuntimeError, match="CreateContainerConfigError"):
        _VllmAuthStub(container, {})


class FakeApps:
    def __init__(self, statuses):
        self.statuses, self.calls = list(statuses), []

    def create_namespaced_deployment(self, namespace, body):
        from kubernetes.client.rest import ApiException

        self.calls.append(("create", body["metadata"]["name"]))
        raise ApiException(status=409, reason="AlreadyExists")

    def patch_namespaced_deployment(self, name, namespace, body):
        self.calls.append(("patch", name))

    def read_namespaced_deployment_status(self, name, namespace):
        return SimpleNamespace(to_dict=lambda: self.statuses.pop(0))


class FakeCore:
    def __init__(self, secret=None):
        self.calls, self.secret = [], secret

    def read_namespaced_secret(self, name, namespace):
        from kubernetes.client.rest import ApiException

        if self.secret is None:
            raise ApiException(status=404, reason="Not Found")
        return self.secret

    def create_namespaced_service(self, namespace, body):
        self.calls.append(("create", body["metadata"]["name"]))

    def patch_namespaced_service(self, name, namespace, body):
        self.calls.append(("patch", name))


def test_serving_without_its_api_key_secret_says_how_to_make_it():
    from kubernetes.client import V1Secret

    serving.check_api_key(FakeCore(V1Secret(data={"api-key": "aw=="})), "serving")
    with pytest.raises(ValueError, match=r"serving API key: no Secret serving/gemma-serving-api-key; expected .*"
                                         r"kubectl -n serving create secret generic gemma-serving-api-key"):
        serving.check_api_key(FakeCore(), "serving")
    with pytest.raises(ValueError, match=r"has keys \['token'\]; expected a Secret serving/gemma-serving-api-key with key 'api-key'"):
        serving.check_api_key(FakeCore(V1Secret(data={"token": "aw=="})), "serving")


class FakeNetworking:
    def __init__(self):
        self.calls = []

    def create_namespaced_network_policy(self, namespace, body):
        self.calls.append(("create", body["metadata"]["name"]))

    def patch_namespaced_network_policy(self, name, namespace, body):
        self.calls.append(("patch", name))


def test_the_fakes_have_the_clients_signatures():
    import inspect

    from kubernetes import client

    for fake, real in ((FakeApps, client.AppsV1Api), (FakeCore, client.CoreV1Api), (FakeNetworking, client.NetworkingV1Api)):
        methods = [m for m in vars(fake) if not m.startswith("_")]
        assert methods
        for name in methods:
            required = [p for p in inspect.signature(getattr(real, name)).parameters.values()
                        if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
            assert [p.name for p in required] == list(inspect.signature(getattr(fake, name)).parameters), name


def test_apply_patches_what_exists_and_waits_until_the_new_generation_is_available():
    rolling = {"metadata": {"generation": 2}, "spec": {"replicas": 1}, "status": {"observed_generation": 1, "available_replicas": 1}}
    ready = {"metadata": {"generation": 2}, "spec": {"replicas": 1}, "status": {"observed_generation": 2, "available_replicas": 1}}
    apps, core = FakeApps([rolling, ready]), FakeCore()
    networking = FakeNetworking()
    serving.apply(apps, core, networking, serving.gke_objects({"/models": EXPORT}, ["--model=/models"]))
    assert apps.calls == [("create", "gemma-champion"), ("patch", "gemma-champion")] and core.calls == [("create", "gemma-champion")]
    assert networking.calls == [("create", "gemma-champion")]
    status = serving.wait_available(apps, "gemma-champion", "serving", 60, sleep=lambda s: None, log=lambda m: None)
    assert status["observed_generation"] == 2
    stuck = FakeApps([rolling] * 5)
    clock = iter(range(0, 100, 30))
    with pytest.raises(TimeoutError, match="not available after 60 s"):
        serving.wait_available(stuck, "gemma-champion", "serving", 60, clock=lambda: next(clock), sleep=lambda s: None, log=lambda m: None)
