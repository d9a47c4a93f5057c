"""The DAG's tasks as they run: a task holding the plan the `plan` task gives it, its fields rendered with a run's
context, and the Job it would hand the provider (no cluster, no scheduler)."""

from __future__ import annotations

import copy
from datetime import datetime
from types import SimpleNamespace

from gemma_pipeline.plan import candidates

from jobs.contract import layout

RUN_ID = "manual__2026-11-22T10:00:00+00:00"


def render_fields(task, dag, overrides=None):
    """Render a copy: rendering replaces the templates on the task, and the DAG is shared by the tests."""
    task = copy.deepcopy(task)
    params = params_of(dag, overrides)
    ti = SimpleNamespace(dag_id=dag.dag_id, task_id=task.task_id, run_id=RUN_ID, try_number=1, map_index=-1)
    context = {"params": params, "run_id": RUN_ID, "ti": ti, "task_instance": ti, "dag": dag, "task": task,
               "logical_date": datetime(2026, 11, 22)}
    task.render_template_fields(context, jinja_env=dag.get_template_env())
    return task, context


TASK_OF = {"preprocess": "preprocess", "finetune": "candidate.finetune", "benchmark": "candidate.benchmark",
           "convert": "convert"}


def params_of(dag, overrides=None):
    return {**{k: v.value if hasattr(v, "value") else v for k, v in dag.params.items()}, **(overrides or {})}


def planned(dag, overrides=None) -> dict:
    params = params_of(dag, overrides)
    return candidates.plan(params, layout.run_key(params.get("run_name"), RUN_ID))


def stage_task(dag, stage, overrides=None, candidate=0):
    """The task that runs `stage`, holding the plan it (its mapped instance `candidate`) gets at run time."""
    task = dag.get_task(TASK_OF.get(stage, stage))
    plan = planned(dag, overrides)
    if stage in ("preprocess", "preprocess_dataflow"):
        task = copy.deepcopy(task)
        task.plan = plan["preprocess" if stage == "preprocess" else "dataflow"]
        return task
    plan = plan["candidates"][candidate][stage]
    if stage == "convert":
        return task.unmap({"plan": plan})
    task = copy.deepcopy(task)
    task.plan = plan
    return task


def render(task, dag, overrides=None):
    task, context = render_fields(task, dag, overrides)
    # No cluster: the only thing the provider asks the Kubernetes hook while building is where it runs.
    task.__dict__["hook"] = SimpleNamespace(is_in_cluster=False)
    return task.build_job_request_obj(context)

