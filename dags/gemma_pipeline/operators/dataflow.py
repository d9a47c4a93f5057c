"""Preprocessing on Dataflow (DAG param `preprocess_engine=dataflow`): the Beam engine's Flex Template launched with
the Google provider's `DataflowStartFlexTemplateOperator`, deferrable. The template's parameters are the
preprocessing stage's own options, rendered by the `plan` task with the GKE Job's arguments; region, temp
location, worker service account and machine type are deployment settings (dags/gemma_lora_finetune.py).

The provider's Dataflow module imports the Beam provider, which needs apache-beam, whose protobuf<7 breaks
transformers 5 at run time (its generated SentencePiece protobuf code needs protobuf 7). Composer environments
ship the Beam provider; the local environment cannot. So the task is our operator, which hands the launch to the
provider's, imported when the task runs on the gke backend. On the local backend the same parameters run the
same pipeline with Beam's in-process runner, in the Beam environment `.venv-beam`.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from gemma_pipeline import local
from gemma_pipeline.operators.tasks import check_conf
from gemma_pipeline.plan import jobspec
from gemma_pipeline.storage.store import RunStore
from jobs.contract import artifacts, documents
from jobs.contract.errors import NON_RETRIABLE_EXIT_CODES, non_retriable_legend
from jobs.contract.stages import BEAM_MODULE

BEAM_PYTHON_ENV = "GEMMA_PIPELINE_BEAM_PYTHON"
ENGINES = jobspec.ENGINES
# Dataflow's own options the template passes to the launcher; the rest of the environment is the launch's.
FIXED_PARAMETERS = {"sdk_location": "container"}  # workers use the image's Beam, not a staged SDK


def launch_body(job_name: str, template: str, parameters: dict[str, str], environment: dict[str, Any]) -> dict[str, Any]:
    """The body of `projects.locations.flexTemplates.launch` (LaunchFlexTemplateRequest, less project and location):
    the stage's options (`plan`'s template parameters) and Dataflow's own fixed ones."""
    job_name = re.sub(r"[^a-z0-9-]+", "-", job_name.lower())[:100].strip("-")
    return {"launchParameter": {"jobName": job_name, "containerSpecGcsPath": template,
                                "parameters": {**parameters, **FIXED_PARAMETERS}, "environment": environment}}


def beam_python() -> Path:
    configured = os.environ.get(BEAM_PYTHON_ENV)
    return Path(configured) if configured else Path(__file__).resolve().parents[3] / ".venv-beam" / "bin" / "python"


class PreprocessDataflowOperator(BaseOperator):
    """Starts the Flex Template with the provider's `DataflowStartFlexTemplateOperator` (deferrable: the wait is the
    provider's trigger); on the local backend the pipeline runs in process. `plan`: the `plan` task's Dataflow
    launch (job name and template parameters); `template` and `environment`: the deployment's."""

    template_fields = ("plan", "location", "project_id")

    def __init__(self, *, plan: Any, template: str, environment: dict[str, Any], location: str, project_id: str,
                 gcp_conn_id: str = "google_cloud_default", poll_sleep: int = 30, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan, self.template, self.environment = plan, template, environment
        self.location, self.project_id = location, project_id
        self.gcp_conn_id, self.poll_sleep = gcp_conn_id, poll_sleep
        self._launcher: Any = None

    @property
    def body(self) -> dict[str, Any]:
        environment = {**self.environment, "additionalUserLabels": {
            **self.environment.get("additionalUserLabels", {}), "gemma-lora-pipeline-run": self.plan["run_key"]}}
        return launch_body(self.plan["job_name"], self.template, self.plan["parameters"], environment)

    def launcher(self) -> Any:
        try:
            from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator
        except Exception as err:  # the provider raises its own "optional feature" error without the Beam provider
            raise AirflowFailException(
                "preprocess_engine=dataflow needs apache-airflow-providers-apache-beam in the Airflow environment "
                f"(Cloud Composer ships it): {err}") from err
        self._launcher = DataflowStartFlexTemplateOperator(
            task_id=self.task_id, body=self.body, location=self.location, project_id=self.project_id,
            gcp_conn_id=self.gcp_conn_id, deferrable=True, poll_sleep=self.poll_sleep,
            append_job_name=False)  # one job name per run: a retry's job is visibly the same run's
        return self._launcher

    def execute(self, context: Any) -> Any:
        # As the GKE path refuses them in `plan`: checked again here, since a cleared task relaunches on its own.
        if context.get("dag") is not None:
            check_conf(context)
        check_parameters(self.plan["parameters"])
        if local.backend() == "local":
            return self.execute_local(context, self.body["launchParameter"]["parameters"])
        launcher = self.launcher()
        self._gcs().delete_error()  # what is there after this launch fails is this launch's
        return launcher.execute(context)  # defers to the provider's TemplateJobStartTrigger

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        try:
            return self.launcher().execute_complete(context, event)
        except AirflowException:
            refused = self._gcs().read_error()
            if refused is not None:  # the stage's exit 2: a retry cannot help
                raise AirflowFailException(f"preprocessing refused its input (non-retriable): {refused}") from None
            raise

    def _gcs(self) -> ErrorFile:
        return ErrorFile(self.plan["parameters"]["output"], self.gcp_conn_id)

    def on_kill(self) -> None:
        if self._launcher is not None:
            self._launcher.on_kill()

    def execute_local(self, context: Any, parameters: dict[str, str]) -> None:
        python = beam_python()
        if not python.exists():
            raise AirflowFailException(f"preprocess_engine=dataflow on the local backend runs Beam's in-process runner "
                                       f"in {python}, which does not exist: python3 -m venv .venv-beam && "
                                       f".venv-beam/bin/pip install -e '.[beam]' (or set {BEAM_PYTHON_ENV})")
        arguments = [f"--{name}={value}" for name, value in parameters.items() if name not in FIXED_PARAMETERS]
        root = local.local_root()
        ti = context["ti"]
        with local.Emulator(root) as emulator:
            for bucket in sorted(set(re.findall(r"gs://([^/\s]+)", " ".join(arguments)))):
                emulator.ensure_bucket(bucket)
            with local.scratch_dir(root, "preprocess-dataflow", f"try-{ti.try_number}") as scratch:
                command, env = local.process_spec({"command": [str(python), "-m", BEAM_MODULE],
                                                   "args": arguments}, scratch)
                command[0] = str(python)  # process_spec maps `python` to Airflow's; this is the Beam environment
                env["STAGE_WORKDIR"] = str(scratch)
                self.log.info("local backend: running the Beam pipeline in process (%s)", python)
                started = time.monotonic()
                code = local.run_process(command, env, scratch, lambda line: self.log.info("%s", line))
        if code in NON_RETRIABLE_EXIT_CODES:
            raise AirflowFailException(f"preprocessing (Beam, in process) exited with code {code}: non-retriable "
                                       f"({non_retriable_legend()})")
        if code != 0:
            raise AirflowException(f"preprocessing (Beam, in process) exited with code {code}: retriable")
        self.log.info("preprocessing (Beam, in process) finished in %.1f s", time.monotonic() - started)


class ErrorFile:
    """The error document (`artifacts.ERROR`) at the output prefix: the Beam engine writes a bad input's message there
    (Dataflow's job state carries no exit code), so a refusal fails the task at once instead of being retried."""

    NAME = artifacts.ERROR

    def __init__(self, output: str, gcp_conn_id: str) -> None:
        self.uri = f"{output.rstrip('/')}/{self.NAME}"
        self.store = RunStore("gke", gcp_conn_id)

    def delete_error(self) -> None:
        self.store.delete(self.uri)

    def read_error(self) -> str | None:
        data = self.store.read(self.uri)
        return None if data is None else documents.ERROR.load(data, self.uri)["error"]


def check_parameters(parameters: dict[str, str]) -> None:
    """Only the preprocessing stage's own options go to the template (Dataflow would launch the launcher and fail
    there, after minutes; a misspelt one would otherwise be dropped)."""
    known = {opt.flag[2:].replace("-", "_") for opt in jobspec.stage_options("preprocess")}
    unknown = sorted(set(parameters) - known - set(FIXED_PARAMETERS))
    if unknown:
        raise AirflowFailException(f"Dataflow template parameters: got {', '.join(map(repr, unknown))}; expected only "
                                   f"the preprocessing stage's options: {', '.join(sorted(known))}")


def engine_task_id(params: dict[str, Any]) -> str:
    engine = params.get("preprocess_engine", "gke")
    if engine not in ENGINES:
        raise AirflowFailException(f"preprocess_engine: got {engine!r}; expected one of {', '.join(ENGINES)}")
    return "preprocess_dataflow" if engine == "dataflow" else "preprocess"

