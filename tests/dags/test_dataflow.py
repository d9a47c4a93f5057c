"""The Dataflow branch of preprocessing (param preprocess_engine): the Flex Template launch the provider's operator
sends, checked at the hook's boundary against the Dataflow API's own request type; the branch; and the same task on
the local backend, where it runs the Beam pipeline in process.

The provider's Dataflow hook module imports the Beam provider, which this environment cannot hold (apache-beam pins
protobuf<7, which breaks transformers; Composer ships it). The tests stand in an empty module for that import only:
the flex-template path never calls it, and everything from the operator down to the hook's launch call is the
provider's own code."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from gemma_pipeline.operators import dataflow

from jobs.contract import documents, stages
from tests.conftest import ROOT
from tests.support.dag import render, render_fields, stage_task

SETTINGS = {"preprocess_engine": "dataflow", "bucket": "bkt", "run_name": "corpus-1", "max_tokens": 256,
            "data_mode": "text", "template": ""}


class TI(SimpleNamespace):
    def xcom_push(self, key, value):
        self.pushed[key] = value


def without_beam_provider(monkeypatch) -> None:
    import importlib.util
    import sys
    import types

    try:
        if importlib.util.find_spec("airflow.providers.apache.beam") is not None:
            return  # the real one (as on Composer)
    except ModuleNotFoundError:  # not even the airflow.providers.apache namespace
        pass

    class Names:  # BeamRunnerType.DataflowRunner == "DataflowRunner", as the real enum's values are
        def __getattr__(self, name: str) -> str:
            return name

    for package in ("airflow.providers.apache", "airflow.providers.apache.beam", "airflow.providers.apache.beam.hooks"):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = []
            monkeypatch.setitem(sys.modules, package, module)
    stub = types.ModuleType("airflow.providers.apache.beam.hooks.beam")
    stub.BeamHook = type("UnusedBeamHook", (), {"__init__": lambda self, *args, **kwargs: None})
    stub.BeamRunnerType = Names()
    stub.beam_options_to_args = lambda options: []
    monkeypatch.setitem(sys.modules, stub.__name__, stub)


def fake_bucket(monkeypatch, objects: dict[str, bytes]) -> list[str]:
    """The Airflow side's one Cloud Storage client (`RunStore`) at its boundary: the objects of bucket `bkt`;
    returns the names deleted."""
    from gemma_pipeline.storage.store import RunStore

    deleted: list[str] = []

    def name_in_bkt(uri: str) -> str | None:
        bucket, _, name = uri.removeprefix("gs://").partition("/")
        return name if bucket == "bkt" and name in objects else None

    monkeypatch.setattr(RunStore, "__init__", lambda self, backend, gcp_conn_id="google_cloud_default": None)
    monkeypatch.setattr(RunStore, "read", lambda self, uri: objects[name] if (name := name_in_bkt(uri)) else None)
    monkeypatch.setattr(RunStore, "delete", lambda self, uri, if_generation_match=None:
                        deleted.append(name) if (name := name_in_bkt(uri)) else None)
    return deleted


def launched(dag, monkeypatch, overrides, objects: dict[str, bytes] | None = None):  # noqa: F811
    without_beam_provider(monkeypatch)
    deleted = fake_bucket(monkeypatch, objects or {})
    from airflow.providers.google.cloud.hooks.dataflow import DataflowHook

    calls = []

    def launch(self, body, location, project_id):  # the hook's boundary: what would go to flexTemplates.launch
        calls.append({"body": json.loads(json.dumps(body)), "location": location, "project_id": project_id})
        return {"id": "2026-11-30_02_00_00-123", "projectId": project_id, "location": location}

    monkeypatch.setattr(DataflowHook, "launch_job_with_flex_template", launch)
    monkeypatch.setenv("GEMMA_PIPELINE_BACKEND", "gke")
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", "google-cloud-platform://")  # no credentials are used
    task, context = render_fields(stage_task(dag, "preprocess_dataflow", overrides), dag, overrides)
    ti = TI(**vars(context["ti"]), pushed={})
    context.update(ti=ti, task_instance=ti)
    from airflow.providers.common.compat.sdk import TaskDeferred

    with pytest.raises(TaskDeferred) as deferred:
        task.execute(context)
    assert deleted == list(objects or {})  # a refusal left by an earlier attempt is cleared before the launch
    return calls, deferred.value, task


def test_the_launch_request_is_the_dataflow_apis_own_shape(dag, monkeypatch):  # noqa: F811
    from google.cloud import dataflow_v1beta3

    calls, deferred, task = launched(dag, monkeypatch, SETTINGS)
    (call,) = calls
    # Parsed by the API's own message type: an unknown or misspelt field is refused, types are checked.
    request = dataflow_v1beta3.LaunchFlexTemplateRequest.from_json(
        json.dumps({"projectId": call["project_id"], "location": call["location"], **call["body"]}))
    launch = request.launch_parameter
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,1022}[a-z0-9])?", launch.job_name) and "corpus-1" in launch.job_name
    assert launch.container_spec_gcs_path.endswith(".json") and launch.container_spec_gcs_path.startswith("gs://")
    environment = launch.environment
    assert environment.temp_location.startswith("gs://") and environment.service_account_email.endswith(".gserviceaccount.com")
    assert environment.machine_type and environment.max_workers >= 1
    assert environment.sdk_container_image.endswith(f"/{stages.BEAM_IMAGE}:{re.split(':', environment.sdk_container_image)[-1]}")
    assert environment.additional_user_labels == {"gemma-lora-pipeline-run": "corpus-1"}
    # Every parameter is one the template declares; none is empty (an empty option is the stage's default).
    declared = {p["name"] for p in json.loads((ROOT / "docker" / "preprocess-beam.metadata.json").read_text())["parameters"]}
    assert set(launch.parameters) <= declared and all(launch.parameters.values())
    assert launch.parameters["output"] == "gs://bkt/runs/corpus-1/preprocess" and launch.parameters["max_tokens"] == "256"
    assert launch.parameters["mode"] == "text" and "template" not in launch.parameters
    assert launch.parameters["sdk_location"] == "container"
    # Deferred to the provider's trigger on the launched job.
    assert type(deferred.trigger).__name__ == "TemplateJobStartTrigger" and deferred.trigger.job_id == "2026-11-30_02_00_00-123"


def test_the_template_parameters_are_the_gke_jobs_arguments(dag, monkeypatch):  # noqa: F811
    """The Beam CLI, given the parameters as Dataflow passes them, builds the config the GKE Job's arguments build."""
    from jobs.common.cli import config_from_args, parser_for
    from jobs.contract.configs.preprocess import DESCRIPTION, PreprocessConfig
    from jobs.preprocessing.beam.template import dashed

    calls, _, _ = launched(dag, monkeypatch, SETTINGS)
    parameters = calls[0]["body"]["launchParameter"]["parameters"]
    beam_args = dashed([f"--{k}={v}" for k, v in parameters.items() if k not in dataflow.FIXED_PARAMETERS])
    job = render(stage_task(dag, "preprocess", SETTINGS), dag, SETTINGS)
    gke_args = job.spec.template.spec.containers[0].args
    parser = parser_for(PreprocessConfig, DESCRIPTION)
    assert config_from_args(PreprocessConfig, parser.parse_args(beam_args)) == config_from_args(PreprocessConfig, parser.parse_args(gke_args))


def test_the_branch_picks_one_preprocess_task():
    from airflow.sdk.exceptions import AirflowFailException

    assert dataflow.engine_task_id({"preprocess_engine": "dataflow"}) == "preprocess_dataflow"
    assert dataflow.engine_task_id({"preprocess_engine": "gke"}) == "preprocess" == dataflow.engine_task_id({})
    with pytest.raises(AirflowFailException, match="preprocess_engine: got 'spark'"):
        dataflow.engine_task_id({"preprocess_engine": "spark"})


def test_on_the_local_backend_the_task_runs_the_pipeline_in_process(dag, tmp_path, monkeypatch, tiny_gemma3):  # noqa: F811
    if not dataflow.beam_python().exists():
        pytest.skip("no .venv-beam (python3 -m venv .venv-beam && .venv-beam/bin/pip install -e '.[beam]')")
    monkeypatch.setenv("GEMMA_PIPELINE_BACKEND", "local")
    monkeypatch.setenv("GEMMA_PIPELINE_LOCAL_ROOT", str(tmp_path / "root"))
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    settings = {**SETTINGS, "base_model": str(tiny_gemma3), "data_mode": "instruction", "dataset": "demo:stdlib-docs"}
    task, context = render_fields(stage_task(dag, "preprocess_dataflow", settings), dag, settings)
    task.execute(context)
    out = tmp_path / "root" / "gcs" / "bkt" / "runs" / "corpus-1" / "preprocess"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["engine"] == "beam" and any(name.startswith("train-") for name in manifest["outputs"])
    bad = {**settings, "max_tokens": 8}  # nothing fits: exit 2, no retry
    task, context = render_fields(stage_task(dag, "preprocess_dataflow", {**bad, "run_name": "corpus-2"}), dag, {**bad, "run_name": "corpus-2"})
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="code 2: non-retriable"):
        task.execute(context)


def test_without_the_beam_provider_the_task_says_what_to_install(dag, monkeypatch):  # noqa: F811
    import sys

    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv("GEMMA_PIPELINE_BACKEND", "gke")
    monkeypatch.setitem(sys.modules, "airflow.providers.google.cloud.operators.dataflow", None)  # unimportable
    task, context = render_fields(stage_task(dag, "preprocess_dataflow", SETTINGS), dag, SETTINGS)
    with pytest.raises(AirflowFailException, match="apache-airflow-providers-apache-beam"):
        task.execute(context)


@pytest.mark.parametrize("refused", [True, False], ids=["bad-input", "other-failure"])
def test_a_failed_job_fails_at_once_only_when_the_stage_refused_its_input(dag, monkeypatch, refused):  # noqa: F811
    """Dataflow's job state carries no exit code; the Beam engine leaves `_error.json` for a bad input."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    _, _, task = launched(dag, monkeypatch, SETTINGS, {"runs/corpus-1/preprocess/_error.json": b"{}"})
    objects = {"runs/corpus-1/preprocess/_error.json": documents.ERROR.dump({"error": "--input: got 'x'", "exit_code": 2})}
    fake_bucket(monkeypatch, objects if refused else {})
    expected = AirflowFailException if refused else AirflowException
    with pytest.raises(expected) as failure:
        task.execute_complete({"ti": None}, {"status": "error", "message": "Job failed", "job_id": "j"})
    assert isinstance(failure.value, AirflowFailException) == refused
    assert ("--input: got 'x'" in str(failure.value)) == refused


def test_a_misspelt_conf_key_is_refused_before_anything_launches(dag, monkeypatch):  # noqa: F811
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv("GEMMA_PIPELINE_BACKEND", "gke")
    monkeypatch.setattr(dataflow.PreprocessDataflowOperator, "launcher",
                        lambda self: pytest.fail("launched despite a bad conf"))
    task, context = render_fields(stage_task(dag, "preprocess_dataflow", SETTINGS), dag, SETTINGS)
    context["dag_run"] = SimpleNamespace(conf={**SETTINGS, "max_tokns": 64})
    with pytest.raises(AirflowFailException, match=r"'max_tokns' \(did you mean 'max_tokens'\?\); expected only:"):
        task.execute(context)


def test_a_template_parameter_that_is_not_a_stage_option_is_refused(dag, monkeypatch):  # noqa: F811
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv("GEMMA_PIPELINE_BACKEND", "gke")
    monkeypatch.setattr(dataflow.PreprocessDataflowOperator, "launcher",
                        lambda self: pytest.fail("launched with an unknown parameter"))
    task, context = render_fields(stage_task(dag, "preprocess_dataflow", SETTINGS), dag, SETTINGS)
    assert task.plan["parameters"]  # the real plan passes the check (the launch tests above run it)
    task.plan = {**task.plan, "parameters": {**task.plan["parameters"], "num_workers": "9"}}
    with pytest.raises(AirflowFailException, match=r"Dataflow template parameters: got 'num_workers'; expected only "
                                                   r"the preprocessing stage's options: .*max_tokens"):
        task.execute(context)
