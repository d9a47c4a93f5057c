"""Gemma LoRA fine-tuning on GKE: preprocess, then one fine-tune and one benchmark per candidate (mapped, each a
Kueue-queued Job), select the champion, convert it, and write a run report. With GEMMA_PIPELINE_BACKEND=local the
same Jobs run as local processes (no cloud)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta

# Named here, though only the stage operator and `@task` use them, so that Airflow's DAG processor pre-imports
# them once ([dag_processor] parsing_pre_import_modules) instead of every parse paying for the providers.
from airflow.providers.google.cloud.operators.kubernetes_engine import GKEStartJobOperator  # noqa: F401
from airflow.providers.standard.decorators.python import python_task  # noqa: F401
from airflow.sdk import DAG, Param, chain, task, task_group
from gemma_pipeline import candidates, dataflow, jobspec, profiles, serving
from gemma_pipeline.operators import StageJobOperator
from gemma_pipeline.report import RunReportOperator
from gemma_pipeline.serve import ServeOperator

# Deployment settings: set these as Composer environment variables.
PROJECT_ID = os.environ.get("GEMMA_PIPELINE_PROJECT", "my-project")
LOCATION = os.environ.get("GEMMA_PIPELINE_LOCATION", "us-central1")
CLUSTER = os.environ.get("GEMMA_PIPELINE_CLUSTER", "ml-batch")
NAMESPACE = os.environ.get("GEMMA_PIPELINE_NAMESPACE", "team-a")
SERVICE_ACCOUNT = os.environ.get("GEMMA_PIPELINE_KSA", "gemma-pipeline")  # bound to a GCP SA via Workload Identity
REGISTRY = os.environ.get("GEMMA_PIPELINE_REGISTRY", "us-central1-docker.pkg.dev/my-project/gemma-lora")
IMAGE_TAG = os.environ.get("GEMMA_PIPELINE_IMAGE_TAG", "0.1.0")  # a release tag or a commit SHA, never latest
IMAGES = jobspec.images(REGISTRY, IMAGE_TAG)  # what docker/cloudbuild.yaml pushes
RETRY_DELAY_S = int(os.environ.get("GEMMA_PIPELINE_RETRY_DELAY_S", "120"))  # the chaos test shortens it
# Preprocessing on Dataflow (preprocess_engine=dataflow): the Flex Template docker/cloudbuild.yaml writes.
DATAFLOW_REGION = os.environ.get("GEMMA_PIPELINE_DATAFLOW_REGION", LOCATION)
DATAFLOW_TEMPLATE = os.environ.get("GEMMA_PIPELINE_DATAFLOW_TEMPLATE",
                                   f"gs://{PROJECT_ID}-dataflow/templates/preprocess-beam-{IMAGE_TAG}.json")
DATAFLOW_TEMP = os.environ.get("GEMMA_PIPELINE_DATAFLOW_TEMP", f"gs://{PROJECT_ID}-dataflow/tmp")
DATAFLOW_SERVICE_ACCOUNT = os.environ.get("GEMMA_PIPELINE_DATAFLOW_SA", f"gemma-dataflow@{PROJECT_ID}.iam.gserviceaccount.com")
DATAFLOW_MACHINE_TYPE = os.environ.get("GEMMA_PIPELINE_DATAFLOW_MACHINE_TYPE", "n2-standard-4")
DATAFLOW_MAX_WORKERS = int(os.environ.get("GEMMA_PIPELINE_DATAFLOW_MAX_WORKERS", "32"))

RUN_KEY = "{{ run_key(params.run_name, run_id) }}"
PREFIX = "gs://{{ params.bucket }}/runs/" + RUN_KEY
PREFIXES = {stage: f"{PREFIX}/{stage}" for stage in jobspec.STAGES}
# Stage options: declared once in each stage's config (jobs/<stage>/config.py); the Params derive from there.
STAGE_PARAMS = jobspec.param_options()
PARAM_TEMPLATES = jobspec.param_templates()

params = {
    "bucket": Param("my-gemma-bucket", type="string", pattern=r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$",
                    description="Cloud Storage bucket for every stage's artifacts"),
    "run_name": Param(None, type=["null", "string"], pattern=r"^([a-z0-9][a-z0-9-]{0,61}[a-z0-9])?$",
                      description="artifacts go to gs://BUCKET/runs/RUN_NAME/ (empty: the Airflow run id); "
                                  "reusing a name resumes that run, skipping the stages already finished"),
    **{name: Param(opt.param_default, **opt.json_schema()) for name, opt in STAGE_PARAMS.items()},
    **{f"{stage}_profile": Param(default, enum=profiles.names_for(stage), description=f"accelerator profile of the {stage} Job")
       for stage, default in jobspec.DEFAULT_PROFILES.items()},
    "candidates": Param([{}], **candidates.schema()),
    "serve": Param("none", enum=list(serving.MODES),
                   description="hand the champion to serving: none, vertex (Model Registry + vLLM), or gke (vLLM Deployment)"),
    "preprocess_engine": Param("gke", enum=list(dataflow.ENGINES),
                               description="gke: preprocess in one Job (instruction datasets); dataflow: the same stage "
                                           "on Dataflow (Apache Beam) for corpora past one machine"),
    "convert_all": Param(False, type="boolean", description="convert every finished candidate, not only the champion"),
    "queue": Param(f"{NAMESPACE}-queue", type="string", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
                   description="Kueue LocalQueue in the namespace"),
    "priority_class": Param("development", enum=["production", "development"],
                            description="Kueue WorkloadPriorityClass: production work may preempt development work"),
    "queue_timeout_minutes": Param(240, type="integer", minimum=1, maximum=10080,
                                   description="fail a stage whose Job Kueue has not admitted within this time"),
}

default_args = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(seconds=RETRY_DELAY_S),
    "retry_exponential_backoff": True,
    "project_id": PROJECT_ID,
    "location": LOCATION,
    "cluster_name": CLUSTER,
    "namespace": NAMESPACE,
    "service_account_name": SERVICE_ACCOUNT,
    "wait_until_job_complete": True,
    "deferrable": True,
    "parallelism": 1,
    "completions": 1,
    "suspend": True,
    "backoff_limit": 3,
    "ttl_seconds_after_finished": 7 * 24 * 3600,
    "get_logs": True,
    "queue_timeout_s": "{{ params.queue_timeout_minutes * 60 }}",
}


def stage_kwargs(stage: str) -> dict:
    return {
        "task_id": stage,
        "stage": stage,
        "name": f"gemma-{stage}",
        "image": IMAGES[stage],
        "gpu_image": IMAGES.get(f"{stage}-gpu", ""),
        "cmds": jobspec.COMMANDS[stage],
        "labels": {**jobspec.job_labels(stage, "{{ params.queue }}", "{{ params.priority_class }}"),
                   "gemma-lora-pipeline/run": RUN_KEY},
    }


def preprocess_on_dataflow() -> dataflow.PreprocessDataflowOperator:
    return dataflow.PreprocessDataflowOperator(
        task_id="preprocess_dataflow",
        body=dataflow.launch_body(
            job_name="gemma-preprocess-" + RUN_KEY,
            template=DATAFLOW_TEMPLATE,
            parameters=dataflow.template_parameters(PARAM_TEMPLATES, PREFIXES),
            environment={"tempLocation": DATAFLOW_TEMP, "serviceAccountEmail": DATAFLOW_SERVICE_ACCOUNT,
                         "machineType": DATAFLOW_MACHINE_TYPE, "maxWorkers": DATAFLOW_MAX_WORKERS,
                         "sdkContainerImage": IMAGES[jobspec.BEAM_IMAGE],
                         "additionalUserLabels": {"gemma-lora-pipeline-run": RUN_KEY}}),
        location=DATAFLOW_REGION,
        project_id=PROJECT_ID,
    )


def stage_task(stage: str) -> StageJobOperator:
    return StageJobOperator(
        **stage_kwargs(stage),
        arguments=jobspec.stage_args(stage, PARAM_TEMPLATES, PREFIXES),
        profile_name="{{ params." + stage + "_profile }}",
        progress_uri=f"{PREFIXES[stage]}/_progress.json",
    )


with DAG(
    dag_id="gemma_lora_finetune",
    description=__doc__,
    doc_md=__doc__ + "\n\nStages write under `gs://BUCKET/runs/<run name or run id>/` (`preprocess/`, "
    "`candidates/<key>/<stage>/`, `champion.json`); a retry, or a new run with the same `run_name`, lands in the same "
    "place and a finished stage is skipped. A Job waits in Kueue up to `queue_timeout_minutes`; if it never "
    "starts, run `python -m gemma_pipeline.preflight` for the stage's profile and queue.",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    max_active_runs=4,
    tags=["gemma", "lora", "gke", "kueue"],
    params=params,
    default_args=default_args,
    user_defined_macros={"run_key": jobspec.run_key},
    render_template_as_native_obj=False,
) as dag:
    @task(task_id="plan")
    def plan(params: dict | None = None, run_id: str | None = None, **context) -> list[dict]:
        return candidates.plan_task(dict(params or {}), jobspec.run_key((params or {}).get("run_name"), run_id or ""),
                                    {**context, "params": params, "run_id": run_id})

    @task_group(group_id="candidate")
    def candidate(finetune: dict, benchmark: dict, index: int, key: str, overrides: dict, prefixes: dict,
                  convert: dict) -> None:
        # One preprocess task of the two runs (the other is skipped by the engine branch).
        chain(StageJobOperator(**stage_kwargs("finetune"), plan=finetune, trigger_rule="none_failed_min_one_success"),
              StageJobOperator(**stage_kwargs("benchmark"), plan=benchmark))

    @task.branch(task_id="preprocess_engine")
    def preprocess_engine(params: dict | None = None) -> str:
        return dataflow.engine_task_id(dict(params or {}))

    @task(task_id="select", trigger_rule="all_done")
    def select(entries: list[dict], params: dict | None = None) -> list[dict]:
        return candidates.record_champion(entries, dict(params or {}))

    planned = plan()
    chosen = select(planned)
    chain(planned, preprocess_engine(), [stage_task("preprocess"), preprocess_on_dataflow()], candidate.expand_kwargs(planned), chosen,
          StageJobOperator.partial(**stage_kwargs("convert")).expand(plan=chosen),
          ServeOperator(task_id="serve", run_prefix=PREFIX, mode="{{ params.serve }}", project_id=PROJECT_ID,
                        location=LOCATION, cluster_name=CLUSTER),
          RunReportOperator(task_id="report", run_prefix=PREFIX, trigger_rule="all_done"))
