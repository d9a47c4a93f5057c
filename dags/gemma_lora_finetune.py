"""Gemma LoRA fine-tuning on GKE: preprocess, then one fine-tune and one benchmark per candidate (mapped, each a
Kueue-queued Job), select the champion, have a person approve it (approval=required), convert and serve what was
approved, and write a run report. With GEMMA_PIPELINE_BACKEND=local the
same Jobs run as local processes (no cloud)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta

# Named here, though only the stage operator and `@task` use them, so that Airflow's DAG processor pre-imports
# them once ([dag_processor] parsing_pre_import_modules) instead of every parse paying for the providers.
from airflow.providers.google.cloud.operators.kubernetes_engine import GKEStartJobOperator  # noqa: F401
from airflow.providers.standard.decorators.python import python_task  # noqa: F401
from airflow.sdk import DAG, Param, chain, task, task_group
from gemma_pipeline.operators import dataflow, tasks
from gemma_pipeline.operators.approval import PromoteOperator
from gemma_pipeline.operators.report import RunReportOperator
from gemma_pipeline.operators.serve import ServeOperator
from gemma_pipeline.operators.stage import StageJobOperator
from gemma_pipeline.plan import access, approval, form, jobspec

from jobs.contract import stages
from jobs.contract.layout import run_key

# Deployment settings: set these as Composer environment variables.
PROJECT_ID = os.environ.get("GEMMA_PIPELINE_PROJECT", "my-project")
LOCATION = os.environ.get("GEMMA_PIPELINE_LOCATION", "us-central1")
CLUSTER = os.environ.get("GEMMA_PIPELINE_CLUSTER", "ml-batch")
NAMESPACE = os.environ.get("GEMMA_PIPELINE_NAMESPACE", "team-a")
# One Kubernetes service account per role (<prefix>-preprocess, ...), each bound through Workload Identity to its own
# Google service account; the Airflow worker (Composer's service account) alone writes the run's own files and, with
# GEMMA_PIPELINE_FOLDER_IAM=on, gives each stage write access to its own prefix only (docs/security.md).
IDENTITIES = access.Identities(
    project=PROJECT_ID, prefix=os.environ.get("GEMMA_PIPELINE_IDENTITY_PREFIX", "gemma"),
    worker=os.environ.get("GEMMA_PIPELINE_WORKER_SA", f"composer-worker@{PROJECT_ID}.iam.gserviceaccount.com"))
FOLDER_IAM = access.folder_iam(os.environ.get("GEMMA_PIPELINE_FOLDER_IAM", "on"))
REGISTRY = os.environ.get("GEMMA_PIPELINE_REGISTRY", "us-central1-docker.pkg.dev/my-project/gemma-lora")
IMAGE_TAG = os.environ.get("GEMMA_PIPELINE_IMAGE_TAG", "0.1.0")  # a release tag or a commit SHA, never latest
# What docker/cloudbuild.yaml pushes; GEMMA_PIPELINE_IMAGE_DIGESTS ({"preprocess": "sha256:...", ...}) pins by digest.
IMAGES = jobspec.images(REGISTRY, IMAGE_TAG, os.environ.get("GEMMA_PIPELINE_IMAGE_DIGESTS", ""))
RETRY_DELAY_S = int(os.environ.get("GEMMA_PIPELINE_RETRY_DELAY_S", "120"))  # the chaos test shortens it
# Preprocessing on Dataflow (preprocess_engine=dataflow): the Flex Template docker/cloudbuild.yaml writes.
DATAFLOW_REGION = os.environ.get("GEMMA_PIPELINE_DATAFLOW_REGION", LOCATION)
DATAFLOW_TEMPLATE = os.environ.get("GEMMA_PIPELINE_DATAFLOW_TEMPLATE",
                                   f"gs://{PROJECT_ID}-dataflow/templates/preprocess-beam-{IMAGE_TAG}.json")
DATAFLOW_TEMP = os.environ.get("GEMMA_PIPELINE_DATAFLOW_TEMP", f"gs://{PROJECT_ID}-dataflow/tmp")
DATAFLOW_SERVICE_ACCOUNT = IDENTITIES.gsa(access.DATAFLOW)
DATAFLOW_MACHINE_TYPE = os.environ.get("GEMMA_PIPELINE_DATAFLOW_MACHINE_TYPE", "n2-standard-4")
DATAFLOW_MAX_WORKERS = int(os.environ.get("GEMMA_PIPELINE_DATAFLOW_MAX_WORKERS", "32"))
# Promotion with approval=required: who may answer (GEMMA_PIPELINE_APPROVERS, user ids; empty: anyone allowed to
# act on this DAG) and how long the request waits before it is rejected (GEMMA_PIPELINE_APPROVAL_TIMEOUT_HOURS).
APPROVERS = approval.approvers()
APPROVAL_TIMEOUT = approval.response_timeout()

# Every Param with its schema and trigger-form section (run-level first, then by stage): gemma_pipeline.plan.form,
# derived from the stages' configs (jobs/contract/configs/) and the profiles; docs/configuration.md is generated from it.
PARAMS = {name: Param(default, **schema) for name, (default, schema) in form.specs(NAMESPACE).items()}

default_args = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(seconds=RETRY_DELAY_S),
    "retry_exponential_backoff": True,
    "project_id": PROJECT_ID,
    "location": LOCATION,
    "cluster_name": CLUSTER,
    "namespace": NAMESPACE,
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
    """What a stage's task knows before the run; its Job's arguments, profile and labels come from the plan."""
    return {"task_id": stage, "stage": stage, "name": f"gemma-{stage}", "image": IMAGES[stage],
            "gpu_image": IMAGES.get(f"{stage}-gpu", ""), "service_account_name": IDENTITIES.ksa(stage)}


with DAG(
    dag_id="gemma_lora_finetune",
    description=__doc__,
    doc_md=__doc__ + "\n\nStages write under `gs://BUCKET/runs/<run name or run id>/` (`preprocess/`, "
    "`candidates/<key>/<stage>/`, `champion.json`); a retry, or a new run with the same `run_name`, lands in the same "
    "place and a finished stage is skipped. A Job waits in Kueue up to `queue_timeout_minutes`; if it never "
    "starts, run `python -m gemma_pipeline.tools.preflight` for the stage's profile and queue.",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    max_active_runs=4,
    tags=["gemma", "lora", "gke", "kueue"],
    params=PARAMS,
    default_args=default_args,
) as dag:
    @task(task_id="plan")
    def plan(params: dict | None = None, run_id: str | None = None, **context) -> list[dict]:
        return tasks.plan_task(dict(params or {}), run_key((params or {}).get("run_name"), run_id or ""),
                               {**context, "params": params, "run_id": run_id}, identities=IDENTITIES if FOLDER_IAM else None)

    @task_group(group_id="candidate")
    def candidate(finetune: dict, benchmark: dict, index: int, key: str, overrides: dict, run_prefix: str, prefixes: dict,
                  convert: dict) -> None:
        # One preprocess task of the two runs (the other is skipped by the engine branch).
        chain(StageJobOperator(**stage_kwargs("finetune"), plan=finetune, trigger_rule="none_failed_min_one_success"),
              StageJobOperator(**stage_kwargs("benchmark"), plan=benchmark))

    @task.branch(task_id="preprocess_engine")
    def preprocess_engine(params: dict | None = None) -> str:
        return dataflow.engine_task_id(dict(params or {}))

    @task(task_id="select", trigger_rule="all_done")  # chooses among the candidates that finished
    def select(params: dict | None = None, ti=None) -> list[dict]:
        return tasks.select_task(ti.xcom_pull(task_ids="plan"), dict(params or {}))

    planned = plan()
    preprocess = StageJobOperator(**stage_kwargs("preprocess"), plan=planned["preprocess"])
    preprocess_dataflow = dataflow.PreprocessDataflowOperator(
        task_id="preprocess_dataflow", plan=planned["dataflow"], template=DATAFLOW_TEMPLATE, location=DATAFLOW_REGION,
        project_id=PROJECT_ID, environment={
            "tempLocation": DATAFLOW_TEMP, "serviceAccountEmail": DATAFLOW_SERVICE_ACCOUNT, "machineType": DATAFLOW_MACHINE_TYPE,
            "maxWorkers": DATAFLOW_MAX_WORKERS, "sdkContainerImage": IMAGES[stages.BEAM_IMAGE]})
    promoted = PromoteOperator(task_id="approve", approvers=APPROVERS, response_timeout=APPROVAL_TIMEOUT)
    chain(planned, preprocess_engine(), [preprocess, preprocess_dataflow], candidate.expand_kwargs(planned),
          select(), promoted, StageJobOperator.partial(**stage_kwargs("convert")).expand(plan=promoted.output),
          ServeOperator(task_id="serve", mode="{{ params.serve }}", project_id=PROJECT_ID, location=LOCATION,
                        cluster_name=CLUSTER, service_account=IDENTITIES.ksa(access.SERVING)),
          RunReportOperator(task_id="report", trigger_rule="all_done", identities=IDENTITIES if FOLDER_IAM else None))
