"""serve=vertex: the requests checked against `google.cloud.aiplatform_v1` types, and the operator path run through
the provider's own operators and hooks with only the Vertex AI clients faked, so what the hooks build from our
arguments (resource names included) is what is checked; a retried serve uploads and deploys nothing twice."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from gemma_pipeline.operators.serve import ServeOperator
from gemma_pipeline.plan import serving
from google.cloud.aiplatform_v1 import EndpointServiceClient, ModelServiceClient

from jobs.contract.layout import RunLayout
from tests.support.serving import BOTH, EXPORT, RECORD, RUN

LOCATION = "projects/p/locations/us-central1"
NAME = re.compile(r"projects/p/locations/us-central1/models/([A-Za-z0-9_-]+)(?:@(\d+))?")


class Operation:
    def __init__(self, response):
        self.response = response

    def result(self, timeout=None, polling=None, retry=None):
        return self.response


class VertexAI:
    """The Model Registry and one endpoint as the clients see them. Each request is parsed into the client's own
    request type; a resource name that is not one of this project's is an error, as the API would answer."""

    def __init__(self, models: dict[str, list] | None = None, fail_after_uploads: int | None = None):
        from google.cloud.aiplatform_v1.types import Endpoint

        self.models = models or {}  # model ID -> its versions (Model), the first the default until told
        self.endpoint = Endpoint(name=f"{LOCATION}/endpoints/456")
        self.requests: list[tuple[str, object]] = []
        self.fail_after_uploads = fail_after_uploads

    def model(self, name: str) -> tuple[str, str | None]:
        match = NAME.fullmatch(name)
        assert match and match[1] in self.models, f"no such model: {name!r}"
        return match[1], match[2]

    # ModelServiceClient
    model_path = staticmethod(ModelServiceClient.model_path)  # the hooks build every name with these
    common_location_path = staticmethod(ModelServiceClient.common_location_path)

    def upload_model(self, request, **kwargs):
        from google.cloud.aiplatform_v1.types import Model, UploadModelRequest, UploadModelResponse

        request = UploadModelRequest(request)
        assert request.parent == LOCATION
        self.requests.append(("upload", request))
        if request.parent_model:
            model_id, version = self.model(request.parent_model)
            assert version is None, "a parent model is named without a version"
        else:
            model_id = str(100 + len(self.models))
            self.models[model_id] = []
        versions = self.models[model_id]
        version = Model(request.model, name=f"{LOCATION}/models/{model_id}", version_id=str(len(versions) + 1),
                        version_aliases=[] if versions else ["default"])
        versions.append(version)
        if self.fail_after_uploads is not None and len(self.upload_requests()) >= self.fail_after_uploads:
            raise SystemExit("the worker was killed after the upload went through")
        return Operation(UploadModelResponse(model=f"{LOCATION}/models/{model_id}", model_version_id=version.version_id))

    def list_models(self, request, **kwargs):
        from google.cloud.aiplatform_v1.types import ListModelsRequest

        request = ListModelsRequest(request)
        assert request.parent == LOCATION
        wanted = dict(re.findall(r'labels\.(\w+)="([^"]*)"', request.filter))
        assert wanted and " AND ".join(f'labels.{k}="{v}"' for k, v in wanted.items()) == request.filter
        defaults = [next(v for v in versions if "default" in v.version_aliases) for versions in self.models.values()]
        return [m for m in defaults if all(m.labels.get(k) == v for k, v in wanted.items())]

    def list_model_versions(self, request, **kwargs):
        from google.cloud.aiplatform_v1.types import ListModelVersionsRequest

        request = ListModelVersionsRequest(request)
        return list(self.models[self.model(request.name)[0]])

    def merge_version_aliases(self, request, **kwargs):
        from google.cloud.aiplatform_v1.types import MergeVersionAliasesRequest

        request = MergeVersionAliasesRequest(request)
        self.requests.append(("default", request))
        model_id, version = self.model(request.name)
        assert version and list(request.version_aliases) == ["default"]
        for v in self.models[model_id]:
            if "default" in v.version_aliases:
                v.version_aliases.remove("default")
            if v.version_id == version:
                v.version_aliases.append("default")
        return next(v for v in self.models[model_id] if v.version_id == version)

    def update_model(self, request, **kwargs):
        from google.cloud.aiplatform_v1.types import UpdateModelRequest

        request = UpdateModelRequest(request)
        self.requests.append(("update", request))
        assert list(request.update_mask.paths) == ["labels"]
        model_id, version = self.model(request.model.name)
        assert version, "a version's labels are updated by its versioned name"
        updated = next(v for v in self.models[model_id] if v.version_id == version)
        updated.labels.clear()
        updated.labels.update(request.model.labels)
        return updated

    # EndpointServiceClient
    endpoint_path = staticmethod(EndpointServiceClient.endpoint_path)

    def get_endpoint(self, request, **kwargs):
        from google.cloud.aiplatform_v1.types import GetEndpointRequest

        assert GetEndpointRequest(request).name == self.endpoint.name
        return self.endpoint

    def deploy_model(self, request, **kwargs):
        from google.api_core.exceptions import AlreadyExists
        from google.cloud.aiplatform_v1.types import DeployedModel, DeployModelRequest, DeployModelResponse

        request = DeployModelRequest(request)
        assert request.endpoint == self.endpoint.name
        self.requests.append(("deploy", request))
        model_id, version = self.model(request.deployed_model.model)
        assert version, "a deployment names the version it serves"
        deployed_id = request.deployed_model.id or str(9 + len(self.endpoint.deployed_models))
        if any(d.id == deployed_id for d in self.endpoint.deployed_models):
            raise AlreadyExists(f"DeployedModel {deployed_id} exists")
        deployed = DeployedModel(request.deployed_model, id=deployed_id, model=f"{LOCATION}/models/{model_id}",
                                 model_version_id=version)
        self.endpoint.deployed_models.append(deployed)
        split = {deployed_id if key == "0" else key: share for key, share in request.traffic_split.items()}
        self.endpoint.traffic_split.clear()
        self.endpoint.traffic_split.update(split)
        return Operation(DeployModelResponse(deployed_model=deployed))

    def update_endpoint(self, request, **kwargs):
        from google.cloud.aiplatform_v1.types import UpdateEndpointRequest

        request = UpdateEndpointRequest(request)
        self.requests.append(("traffic", request))
        assert request.endpoint.name == self.endpoint.name and list(request.update_mask.paths) == ["traffic_split"]
        assert set(request.endpoint.traffic_split) <= {d.id for d in self.endpoint.deployed_models}
        assert sum(request.endpoint.traffic_split.values()) == 100
        self.endpoint.traffic_split.clear()
        self.endpoint.traffic_split.update(request.endpoint.traffic_split)
        return self.endpoint

    def serving(self) -> str:
        """The model version that has all of the endpoint's traffic."""
        (deployed_id,) = [key for key, share in self.endpoint.traffic_split.items() if share == 100]
        deployed = next(d for d in self.endpoint.deployed_models if d.id == deployed_id)
        return f"{deployed.model}@{deployed.model_version_id}"

    def upload_requests(self) -> list:
        return [r for kind, r in self.requests if kind == "upload"]

    def default_version(self, model_id: str):
        return next(v for v in self.models[model_id] if "default" in v.version_aliases)


@pytest.fixture
def vertex(monkeypatch):
    """Runs serve=vertex against a `VertexAI`; the model named by GEMMA_PIPELINE_VERTEX_MODEL (123) holds one
    version from before this run."""
    from airflow.providers.google.cloud.hooks.vertex_ai import endpoint_service, model_service
    from airflow.providers.google.cloud.operators.vertex_ai import endpoint_service as endpoint_ops
    from airflow.providers.google.cloud.operators.vertex_ai import model_service as model_ops
    from google.cloud.aiplatform_v1.types import Model

    state = {"api": VertexAI({"123": [Model(name=f"{LOCATION}/models/123", version_id="1", version_aliases=["default"],
                                            labels={"pipeline": "gemma-lora", "run": "r0", "candidate": "default"})]})}
    monkeypatch.setattr(model_service.ModelServiceHook, "get_model_service_client", lambda self, region=None: state["api"])
    monkeypatch.setattr(endpoint_service.EndpointServiceHook, "get_endpoint_service_client",
                        lambda self, region=None: state["api"])
    for link in (model_ops.VertexAIModelLink, endpoint_ops.VertexAIEndpointLink):
        monkeypatch.setattr(link, "persist", staticmethod(lambda **kwargs: None))
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", "google-cloud-platform://")  # no credentials are read
    monkeypatch.setenv(serving.VERTEX_VLLM_IMAGE_ENV, "us-docker.pkg.dev/p/r/vllm:1.0")
    monkeypatch.setenv(serving.VERTEX_MODEL_ENV, f"{LOCATION}/models/123")
    monkeypatch.setenv(serving.VERTEX_ENDPOINT_ENV, "456")
    ti = SimpleNamespace(xcom_push=lambda key, value: None)
    op = ServeOperator(task_id="serve", run_prefix=RUN, mode="vertex", project_id="p", location="us-central1", cluster_name="c")

    def serve(record, api=None):
        state["api"] = api or state["api"]
        return op.to_vertex({"ti": ti, "task_instance": ti}, record)
    serve.state = state
    return serve


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


def test_the_vertex_path_uploads_a_new_version_makes_it_the_default_and_deploys_it(vertex):
    result = vertex(RECORD)
    api = vertex.state["api"]
    (kind, upload), (kind2, default), (kind3, deploy) = api.requests
    assert kind == "upload" and upload.parent_model == f"{LOCATION}/models/123"  # the name the hook builds, once
    assert upload.model.artifact_uri == EXPORT and upload.model.labels["candidate"] == "lora-rank-8-abc"
    assert kind2 == "default" and default.name == f"{LOCATION}/models/123@2"
    assert kind3 == "deploy" and dict(deploy.traffic_split) == {"0": 100}
    assert deploy.deployed_model.model == f"{LOCATION}/models/123@2"
    assert result["endpoint"] == "456" and result["model_version_id"] == "2"
    assert api.default_version("123").version_id == "2"


def test_every_converted_candidate_is_a_version_of_one_model_and_the_approved_one_is_the_default(vertex):
    result = vertex(BOTH)
    api = vertex.state["api"]
    uploads = api.upload_requests()
    assert [u.model.labels["candidate"] for u in uploads] == ["default", "lora-rank-8-abc"]  # the approved last
    assert [u.model.labels["approved"] for u in uploads] == ["false", "true"]
    assert {u.parent_model for u in uploads} == {f"{LOCATION}/models/123"}
    assert api.default_version("123").labels["candidate"] == "lora-rank-8-abc"
    assert result["versions"]["default"]["model_version_id"] == "2" and result["model_version_id"] == "3"


def test_a_retried_serve_reuses_what_its_cut_off_try_uploaded_and_deploys_once(vertex):
    api = VertexAI(vertex.state["api"].models, fail_after_uploads=1)
    with pytest.raises(SystemExit):  # killed after the first candidate's upload went through
        vertex(BOTH, api)
    api.fail_after_uploads = None
    first = vertex(BOTH)  # the task's retry
    assert [u.model.labels["candidate"] for u in api.upload_requests()] == ["default", "lora-rank-8-abc"]
    again = vertex(BOTH)  # a cleared task, after everything went through
    assert len(api.upload_requests()) == 2 and [k for k, _ in api.requests].count("deploy") == 1
    assert first["versions"] == again["versions"] and len(api.models["123"]) == 3  # r0's version and this run's two
    assert len(api.endpoint.deployed_models) == 1


def test_a_decision_changed_after_serving_moves_the_default_labels_and_traffic_without_uploading(vertex):
    vertex(BOTH)
    api = vertex.state["api"]
    api.models["123"][1].labels["owner"] = "ml-platform"  # a label someone added in the console
    result = vertex({**BOTH, "champion": "default"})  # approve cleared and answered again: the other candidate
    assert len(api.upload_requests()) == 2 and result["model_version_id"] == "2"
    assert api.default_version("123").labels["candidate"] == "default" and api.serving() == f"{LOCATION}/models/123@2"
    labels = {v.labels["candidate"]: dict(v.labels) for v in api.models["123"][1:]}
    assert labels["default"]["approved"] == "true" and labels["default"]["owner"] == "ml-platform"
    assert labels["lora-rank-8-abc"]["approved"] == "false"
    vertex(BOTH)  # and back: both are deployed already; the first gets its traffic back, nothing is deployed again
    assert api.serving() == f"{LOCATION}/models/123@3" and api.default_version("123").version_id == "3"
    assert [k for k, _ in api.requests].count("deploy") == 2 and len(api.endpoint.deployed_models) == 2
    before = len(api.requests)
    vertex(BOTH)
    assert [k for k, _ in api.requests[before:]] == ["default"]  # nothing else to change the second time


def test_the_previously_approved_version_stops_saying_so_when_only_the_new_one_is_converted(vertex):
    vertex(RECORD)  # one candidate converted: the automatic champion
    api = vertex.state["api"]
    vertex({**RECORD, "champion": "default", "converted": ["default"]})  # a person chose the other one afterwards
    approved = {v.labels["candidate"]: v.labels["approved"] for v in api.models["123"][1:]}
    assert approved == {"lora-rank-8-abc": "false", "default": "true"}


def test_another_deployments_versions_of_the_same_run_name_are_not_taken(vertex):
    from google.cloud.aiplatform_v1.types import Model

    api = vertex.state["api"]
    elsewhere = RunLayout("gs://other-bucket/runs/r1").stages("lora-rank-8-abc")["convert"]  # the same run name
    api.models["123"].append(Model(name=f"{LOCATION}/models/123", version_id="2", artifact_uri=elsewhere,
                                   labels=serving.vertex_labels("r1", "lora-rank-8-abc", True)))
    result = vertex(RECORD)
    assert len(api.upload_requests()) == 1 and result["model_version_id"] == "3"
    assert api.models["123"][1].labels["approved"] == "true"  # not ours to relabel


def test_the_deployed_id_is_the_versions_so_a_repeated_deploy_is_refused_not_doubled(vertex):
    from google.api_core.exceptions import AlreadyExists
    from google.cloud.aiplatform_v1.types import Endpoint

    vertex(RECORD)
    api = vertex.state["api"]
    (deploy,) = [r for k, r in api.requests if k == "deploy"]
    assert deploy.deployed_model.id == serving.deployed_model_id(f"{LOCATION}/models/123", "2")
    assert re.fullmatch(r"[1-9]\d{9}", deploy.deployed_model.id)
    api.get_endpoint = lambda request, **kwargs: Endpoint(name=api.endpoint.name)  # the first deploy not listed yet
    with pytest.raises(AlreadyExists):  # the task fails; its next retry finds the deployment and leaves it
        vertex(RECORD)
    assert len(api.endpoint.deployed_models) == 1


def test_without_a_named_model_the_first_upload_creates_one_that_a_retry_finds_by_its_labels(vertex, monkeypatch):
    monkeypatch.delenv(serving.VERTEX_MODEL_ENV)
    api = VertexAI(vertex.state["api"].models, fail_after_uploads=1)
    with pytest.raises(SystemExit):
        vertex(BOTH, api)
    api.fail_after_uploads = None
    result = vertex(BOTH)
    (created,) = set(api.models) - {"123"}
    first, second = api.upload_requests()
    assert not first.parent_model and second.parent_model == f"{LOCATION}/models/{created}"
    assert result["model"] == f"{LOCATION}/models/{created}" and len(api.models[created]) == 2
    assert api.default_version(created).labels["candidate"] == "lora-rank-8-abc"


@pytest.mark.parametrize("value,expected", [("123", "123"), (f"{LOCATION}/models/123", "123"), (" 123 ", "123"),
                                            ("projects/123456789012/locations/us-central1/models/77", "77")])
def test_the_model_setting_takes_an_id_or_this_projects_resource_name(value, expected):
    assert serving.model_id(value, "p", "us-central1") == expected


@pytest.mark.parametrize("value", ["projects/other/locations/us-central1/models/123",
                                   "projects/p/locations/europe-west4/models/123", f"{LOCATION}/models/123@2", "models/"])
def test_a_model_setting_elsewhere_or_with_a_version_is_refused_by_name(vertex, monkeypatch, value):
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv(serving.VERTEX_MODEL_ENV, value)
    with pytest.raises(AirflowFailException, match=f"{serving.VERTEX_MODEL_ENV}: got .*expected a model ID"):
        vertex(RECORD)
    assert vertex.state["api"].requests == []


def test_vertex_without_a_serving_image_says_what_to_set(monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.delenv(serving.VERTEX_VLLM_IMAGE_ENV, raising=False)
    op = ServeOperator(task_id="serve", run_prefix=RUN, mode="vertex", project_id="p", location="l", cluster_name="c")
    with pytest.raises(AirflowFailException, match=serving.VERTEX_VLLM_IMAGE_ENV):
        op.to_vertex({}, RECORD)
