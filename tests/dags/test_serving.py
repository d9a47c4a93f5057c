"""Serving hand-off: the Vertex request checked against the client library's own types, the operator path with
the provider's hooks patched at their boundary, and the GKE vLLM objects validated strictly like the Jobs."""

from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace

import pytest
import yaml
from gemma_pipeline.operators.serve import ServeOperator
from gemma_pipeline.plan import serving

from jobs.contract.layout import RunLayout
from tests.conftest import ROOT

RUN = "gs://bkt/runs/r1"
RECORD = {"champion": "lora-rank-8-abc", "candidates": [
    {"key": "default", "champion": False, "prefixes": RunLayout(RUN).stages()},
    {"key": "lora-rank-8-abc", "champion": True, "prefixes": RunLayout(RUN).stages("lora-rank-8-abc")}]}
EXPORT = f"{RUN}/candidates/lora-rank-8-abc/convert"


def test_images_must_be_pinned():
    for bad in ("vllm/vllm-openai", "vllm/vllm-openai:latest", "registry:5000/vllm"):
        with pytest.raises(ValueError, match="never latest"):
            serving.pinned(bad)
    assert serving.pinned("vllm/vllm-openai:v0.11.0") and serving.pinned("r/v@sha256:" + "a" * 64)


def test_the_vertex_model_is_the_champions_export_and_the_client_types_accept_it():
    from google.cloud.aiplatform_v1.types import Model

    model = serving.vertex_model("gemma-lora-r1", EXPORT, "us-docker.pkg.dev/p/r/vllm:1.0", {"run": "r1"})
    assert model["artifact_uri"] == EXPORT and "--model=$(AIP_STORAGE_URI)" in model["container_spec"]["args"]
    assert Model(model).container_spec.ports[0].container_port == 8080
    typo = {**model, "container_spec": {**model["container_spec"], "image": model["container_spec"]["image_uri"]}}
    with pytest.raises(ValueError, match="Unknown field"):  # what a misspelled field meets: an error, here
        Model(typo)
    with pytest.raises(ValueError, match="never latest"):
        serving.vertex_model("x", EXPORT, "vllm:latest", {})


class FakeModelHook:
    calls: list = []

    def __init__(self, **kwargs):
        pass

    def upload_model(self, **kwargs):
        FakeModelHook.calls.append(("upload", kwargs))
        return "operation"

    def wait_for_operation(self, timeout, operation):
        from google.cloud.aiplatform_v1.types import UploadModelResponse

        return UploadModelResponse(model="projects/p/locations/us-central1/models/123", model_version_id="2")

    extract_model_id = staticmethod(lambda response: response["model"].rsplit("/", 1)[-1])


class FakeEndpointHook(FakeModelHook):
    def deploy_model(self, **kwargs):
        FakeModelHook.calls.append(("deploy", kwargs))
        return "operation"

    def wait_for_operation(self, timeout, operation):
        from google.cloud.aiplatform_v1.types import DeployModelResponse

        return DeployModelResponse(deployed_model={"id": "9"})

    extract_deployed_model_id = staticmethod(lambda response: "9")


def test_the_vertex_path_uploads_a_new_version_and_deploys_through_the_providers_operators(monkeypatch):
    from airflow.providers.google.cloud.operators.vertex_ai import endpoint_service, model_service

    monkeypatch.setattr(model_service, "ModelServiceHook", FakeModelHook)
    monkeypatch.setattr(endpoint_service, "EndpointServiceHook", FakeEndpointHook)
    for link in (model_service.VertexAIModelLink, endpoint_service.VertexAIEndpointLink):
        monkeypatch.setattr(link, "persist", staticmethod(lambda **kwargs: None))
    monkeypatch.setenv(serving.VERTEX_VLLM_IMAGE_ENV, "us-docker.pkg.dev/p/r/vllm:1.0")
    monkeypatch.setenv(serving.VERTEX_MODEL_ENV, "projects/p/locations/us-central1/models/123")
    monkeypatch.setenv(serving.VERTEX_ENDPOINT_ENV, "456")
    FakeModelHook.calls = []
    pushed = {}
    ti = SimpleNamespace(xcom_push=lambda key, value: pushed.__setitem__(key, value))
    op = ServeOperator(task_id="serve", run_prefix=RUN, mode="vertex", project_id="p", location="us-central1", cluster_name="c")
    result = op.to_vertex({"ti": ti, "task_instance": ti}, serving.champion_paths(RECORD))
    (kind, upload), (kind2, deploy) = FakeModelHook.calls
    assert kind == "upload" and upload["parent_model"] == "projects/p/locations/us-central1/models/123"
    assert upload["model"]["artifact_uri"] == EXPORT and upload["model"]["labels"]["candidate"] == "lora-rank-8-abc"
    assert kind2 == "deploy" and deploy["endpoint"] == "456" and deploy["traffic_split"] == {"0": 100}
    assert deploy["deployed_model"]["model"] == "projects/p/locations/us-central1/models/123"
    assert result["endpoint"] == "456" and result["model_version_id"] == "2"


def test_vertex_without_a_serving_image_says_what_to_set(monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.delenv(serving.VERTEX_VLLM_IMAGE_ENV, raising=False)
    op = ServeOperator(task_id="serve", run_prefix=RUN, mode="vertex", project_id="p", location="l", cluster_name="c")
    with pytest.raises(AirflowFailException, match=serving.VERTEX_VLLM_IMAGE_ENV):
        op.to_vertex({}, serving.champion_paths(RECORD))


@pytest.mark.parametrize("mode,backend,reason", [("none", "gke", "serve is none"), ("gke", "local", "needs Google Cloud")])
def test_serve_skips_when_there_is_nothing_to_do(monkeypatch, mode, backend, reason):
    from airflow.sdk.exceptions import AirflowSkipException

    monkeypatch.setenv("GEMMA_PIPELINE_BACKEND", backend)
    op = ServeOperator(task_id="serve", run_prefix=RUN, mode=mode, project_id="p", location="l", cluster_name="c")
    with pytest.raises(AirflowSkipException, match=reason):
        op.execute({})


def test_the_gke_objects_validate_strictly_and_serve_the_export_from_the_bucket():
    import kubernetes_validate

    deployment, service = serving.gke_objects("bkt", serving.vllm_args(serving.fuse_path(EXPORT)))
    for obj in (deployment, service):
        kubernetes_validate.validate(obj, "1.31", strict=True)
    assert deployment["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "serving-queue"
    assert deployment["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "serving"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--model=/models/runs/r1/candidates/lora-rank-8-abc/convert" in container["args"]
    assert deployment["spec"]["template"]["spec"]["volumes"][0]["csi"]["volumeAttributes"]["bucketName"] == "bkt"
    assert not container["image"].endswith(":latest")
    adapter = serving.vllm_args("/models/base", "/models/adapter", rank=16)
    assert "--enable-lora" in adapter and "--lora-modules=champion=/models/adapter" in adapter and "--max-lora-rank=16" in adapter

    if shutil.which("kubectl"):
        built = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "serving" / "base")], check=True,
                               capture_output=True, text=True).stdout
        assert [o["kind"] for o in yaml.safe_load_all(built) if o] == ["Service", "Deployment"]


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
    def __init__(self):
        self.calls = []

    def create_namespaced_service(self, namespace, body):
        self.calls.append(("create", body["metadata"]["name"]))

    def patch_namespaced_service(self, name, namespace, body):
        self.calls.append(("patch", name))


def test_apply_patches_what_exists_and_waits_until_the_new_generation_is_available():
    rolling = {"metadata": {"generation": 2}, "spec": {"replicas": 1}, "status": {"observed_generation": 1, "available_replicas": 1}}
    ready = {"metadata": {"generation": 2}, "spec": {"replicas": 1}, "status": {"observed_generation": 2, "available_replicas": 1}}
    apps, core = FakeApps([rolling, ready]), FakeCore()
    serving.apply(apps, core, serving.gke_objects("bkt", ["--model=/models/x"]))
    assert apps.calls == [("create", "gemma-champion"), ("patch", "gemma-champion")] and core.calls == [("create", "gemma-champion")]
    status = serving.wait_available(apps, "gemma-champion", "serving", 60, sleep=lambda s: None, log=lambda m: None)
    assert status["observed_generation"] == 2
    stuck = FakeApps([rolling] * 5)
    clock = iter(range(0, 100, 30))
    with pytest.raises(TimeoutError, match="not available after 60 s"):
        serving.wait_available(stuck, "gemma-champion", "serving", 60, clock=lambda: next(clock), sleep=lambda s: None, log=lambda m: None)
