"""One spec per knob: each stage option is declared once, in its stage config; the DAG Params, the Job's
arguments and the CLI are derived from it. These tests fail when any of them disagree."""

from __future__ import annotations

import subprocess
import sys

import pytest
from gemma_pipeline.plan import jobspec

from jobs.common import cli
from jobs.contract import spec, stages
from jobs.contract.layout import SHARED, RunLayout
from tests.conftest import ROOT
from tests.support import nonempty
from tests.support.dag import render, stage_task


def _probe(opt: spec.Option):
    """A valid value that differs from the default, so a dropped or misrouted option shows."""
    if opt.choices:
        return next(c for c in reversed(opt.choices) if c != opt.param_default)
    if opt.kind == "bool":
        return not opt.param_default
    if opt.kind == "int":
        value = int(opt.param_default or 0) + 3
        return min(value, int(opt.maximum)) if opt.maximum is not None else value
    if opt.kind == "float":
        high = opt.maximum if opt.maximum is not None else opt.exclusive_maximum
        return round((float(opt.param_default or 0) + (high if high is not None else 1.0)) / 4, 6) or 0.01
    # Strings the plan checks: a template with its fields, a real lm-eval task, a metric the benchmark computes, a
    # model of a supported family.
    valid = {"template": "{instruction}: {response}", "eval_tasks": "hellaswag", "champion_metric": "chrf",
             "base_model": "gemma3_1b"}
    return valid.get(opt.name, f"probe-{opt.name}")


PROBES = {name: _probe(opt) for name, opt in jobspec.param_options().items()}


def test_options_sharing_a_param_agree():
    by_param: dict[str, list[tuple[str, spec.Option]]] = {}
    for stage in jobspec.STAGES:
        for opt in jobspec.stage_options(stage):
            if opt.param:
                by_param.setdefault(opt.param, []).append((stage, opt))
    assert len(by_param) == len(jobspec.param_options())
    for name, uses in nonempty(by_param, "params").items():
        first = uses[0][1]
        for stage, opt in uses[1:]:
            where = f"param {name}: {uses[0][0]}.{first.name} vs {stage}.{opt.name}"
            assert (opt.kind, opt.choices, opt.param_default, opt.nullable) == (
                first.kind, first.choices, first.param_default, first.nullable), where
            # What the Param lets through, every stage taking it must accept.
            for bound in ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum"):
                assert getattr(opt, bound) == getattr(first, bound), f"{where}: {bound}"


def test_dag_params_are_the_stage_options(dag):  # noqa: F811
    for name, opt in nonempty(jobspec.param_options(), "stage params").items():
        param = dag.params.get_param(name)
        assert param.value == opt.param_default, name
        schema = {k: v for k, v in param.schema.items() if k != "section"}
        assert {**schema, "description": param.description} == opt.json_schema(), name
        assert param.schema["section"], name  # every Param sits in a section of the trigger form


def test_every_optional_param_is_nullable_or_has_a_default(dag):  # noqa: F811
    """The trigger form marks a field required unless null is allowed; an empty-string default is not enough."""
    from airflow.sdk import Param

    for name, param in nonempty(dag.params, "DAG params").items():
        param = dag.params.get_param(name)
        if param.value in ("", None):
            assert "null" in param.schema.get("type", []), f"{name}: empty default but null not allowed"
            Param(None, **param.schema).resolve()  # the form's empty field validates


@pytest.mark.parametrize("stage", jobspec.STAGES)
def test_job_arguments_parse_back_to_the_params(dag, stage):  # noqa: F811
    """The Job the DAG task submits carries every param its stage takes, and the stage CLI reads each back."""
    # A profile with 4 chips per host, which the probed model_parallel (4) must divide.
    settings = {**PROBES, "bucket": "bkt", "run_name": "probe", "finetune_profile": "tpu-v5e-4"}
    job = render(stage_task(dag, stage, settings), dag, settings)
    args = job.spec.template.spec.containers[0].args
    parsed = cli.parser_for(stages.get(stage).config, "").parse_args(args)
    prefixes = RunLayout("gs://bkt/runs/probe").stages()
    for opt in jobspec.stage_options(stage):
        if opt.param == "require_improvement" and stage == "benchmark":
            assert parsed.require_improvement == 0  # the gate judges the champion, in the select task
        elif opt.param:
            assert getattr(parsed, opt.name) == PROBES[opt.param], f"{stage} {opt.flag}"
        elif opt.upstream == SHARED:
            assert getattr(parsed, opt.name) == RunLayout("gs://bkt/runs/probe").shared(stage), f"{stage} {opt.flag}"
        elif opt.upstream:
            source = stage if opt.upstream == "self" else opt.upstream
            assert getattr(parsed, opt.name) == prefixes[source], f"{stage} {opt.flag}"


@pytest.mark.parametrize("stage", jobspec.STAGES)
def test_null_params_render_as_the_clis_none(dag, stage):  # noqa: F811
    settings = {"context_field": None, "template": None}
    job = render(stage_task(dag, stage, settings), dag, settings)
    parsed = cli.parser_for(stages.get(stage).config, "").parse_args(job.spec.template.spec.containers[0].args)
    for name in ("context_field", "template"):
        if hasattr(parsed, name):
            assert getattr(parsed, name) == ""


@pytest.mark.parametrize("stage", jobspec.STAGES)
def test_help_works_and_lists_every_option(stage):
    module = stages.get(stage).module
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {module}")
    squeezed = "".join(result.stdout.split())  # argparse wraps lines (and breaks at hyphens)
    for opt in jobspec.stage_options(stage):
        assert opt.flag in result.stdout
        assert "".join(opt.help.split()) in squeezed, f"{opt.flag}: help text missing"
