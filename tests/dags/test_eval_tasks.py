"""The plan's checks of `eval_tasks` and `champion_metric` (gemma_pipeline.plan.eval_tasks): task files read here,
lm-eval's own tasks from the generated index. The harness's side of the metric names is held to these in
tests/jobs/benchmark/test_harness.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from gemma_pipeline.plan import eval_tasks
from gemma_pipeline.tools import generate

DATA = Path(__file__).resolve().parents[1] / "data" / "lm_eval"
MC, GEN = str(DATA / "stdlib_mc.yaml"), str(DATA / "stdlib_gen.yaml")


def read_local(uri: str) -> bytes:
    return Path(uri).read_bytes()


def test_parse_splits_on_commas_and_refuses_a_task_twice():
    assert eval_tasks.parse("") == () and eval_tasks.parse(None) == ()
    assert eval_tasks.parse(" hellaswag, gs://b/t/my.yaml ,gsm8k,") == ("hellaswag", "gs://b/t/my.yaml", "gsm8k")
    with pytest.raises(ValueError, match="eval_tasks.*each task once"):
        eval_tasks.parse("hellaswag,hellaswag")


def test_task_files_report_their_metric_list_under_each_filter():
    assert eval_tasks.metrics_of((MC, GEN), read_local) == {"stdlib_mc": ("acc", "acc_norm"),
                                                           "stdlib_gen": ("exact_match/strip",)}


def test_lm_eval_task_names_come_from_the_index():
    found = eval_tasks.metrics_of(("hellaswag", "gsm8k"), read_local)
    assert found == {"hellaswag": ("acc", "acc_norm"),
                     "gsm8k": ("exact_match/strict-match", "exact_match/flexible-extract")}


def test_a_group_reports_its_aggregate_and_every_member_and_a_tag_its_tasks():
    mmlu = eval_tasks.metrics_of(("mmlu",), read_local)
    assert mmlu["mmlu"] == ("acc",) and mmlu["mmlu_stem"] == ("acc",) and mmlu["mmlu_anatomy"] == ("acc",)
    assert sum(name.startswith("mmlu_") for name in mmlu) == 57 + 4  # the subjects and the four category groups
    arc = eval_tasks.metrics_of(("ai2_arc",), read_local)
    assert arc["arc_easy"] == ("acc", "acc_norm") and arc["arc_challenge"] == ("acc", "acc_norm")


def test_a_python_class_task_is_known_but_its_metrics_are_not():
    assert eval_tasks.metrics_of(("squadv2",), read_local) == {"squadv2": ()}
    eval_tasks.check_metric("squadv2:f1", {"squadv2": ()})  # checked when the benchmark runs it


def test_an_unknown_task_name_is_refused_naming_it_with_close_matches():
    with pytest.raises(ValueError) as err:
        eval_tasks.metrics_of(("hellaswg",), read_local)
    message = str(err.value)
    assert "'hellaswg'" in message and "task, group or tag name" in message and "did you mean hellaswag" in message


def test_a_task_file_that_does_not_parse_is_refused_naming_it(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("task: x\nmetric_list: [unclosed\n")
    with pytest.raises(ValueError, match=f"{bad}.*not valid YAML"):
        eval_tasks.metrics_of((str(bad),), read_local)
    missing = str(tmp_path / "absent.yaml")
    with pytest.raises(ValueError, match=f"{missing}.*cannot be read"):
        eval_tasks.metrics_of((missing,), read_local)


@pytest.mark.parametrize(("text", "expected"), [
    ("output_type: multiple_choice\n", "defines no single task"),
    ("group: g\ntask: [hellaswag]\n", "defines no single task"),
    ("task: t\n", "output_type None; expected one of loglikelihood, loglikelihood_rolling, multiple_choice"),
    ("task: t\noutput_type: generate\n", "output_type 'generate'"),
    ("task: t\noutput_type: generate_until\nmetric_list: [exact_match]\n", "lists of mappings"),
    ("- task: t\n", "holds a list"),
])
def test_a_task_file_without_one_task_of_a_known_output_type_is_refused(tmp_path, text, expected):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=str(path)) as err:
        eval_tasks.metrics_of((str(path),), read_local)
    assert expected in str(err.value)


def test_includes_resolve_beside_the_file_and_function_metrics_are_named_after_the_function():
    files = {
        "gs://b/tasks/base.yaml": b"output_type: generate_until\nfilter_list: [{name: first, filter: []}]\n",
        "gs://b/tasks/sub/my.yaml": (b"include: ../base.yaml\ntask: mine\n"
                                     b"metric_list: [{metric: !function utils.my_score}, {metric: exact_match}]\n"),
    }
    assert eval_tasks.metrics_of(("gs://b/tasks/sub/my.yaml",), files.__getitem__) == {
        "mine": ("my_score/first", "exact_match/first")}
    defaults = {"gs://b/d.yaml": b"task: d\noutput_type: loglikelihood_rolling\n"}
    assert eval_tasks.metrics_of(("gs://b/d.yaml",), defaults.__getitem__) == {
        "d": ("word_perplexity", "byte_perplexity", "bits_per_byte")}


def test_an_include_cycle_is_refused():
    files = {"gs://b/a.yaml": b"include: b.yaml\ntask: a\n", "gs://b/b.yaml": b"include: a.yaml\n"}
    with pytest.raises(ValueError, match="more than 8 deep"):
        eval_tasks.metrics_of(("gs://b/a.yaml",), files.__getitem__)


def test_check_metric_requires_a_reported_task_and_metric():
    reported = {"stdlib_mc": ("acc", "acc_norm"), "gsm8k": ("exact_match/strict-match",)}
    eval_tasks.check_metric("stdlib_mc:acc_norm", reported)
    eval_tasks.check_metric("gsm8k:exact_match/strict-match", reported)
    eval_tasks.check_metric("rouge_l", reported)  # plain metric names are not this check's
    with pytest.raises(ValueError) as err:
        eval_tasks.check_metric("hellaswag:acc", reported)
    assert "'hellaswag:acc'" in str(err.value) and "gsm8k, stdlib_mc" in str(err.value)
    with pytest.raises(ValueError) as err:
        eval_tasks.check_metric("gsm8k:exact_match", reported)
    assert "'gsm8k:exact_match'" in str(err.value) and "exact_match/strict-match" in str(err.value)
    with pytest.raises(ValueError, match="eval_tasks is empty"):
        eval_tasks.check_metric("stdlib_mc:acc", {})


def test_the_checked_in_index_is_current_and_small():
    assert generate.stale("lm_eval_tasks") == []
    assert eval_tasks.INDEX.stat().st_size < 1_500_000


def test_a_stale_index_is_named(tmp_path):
    where = generate.TARGETS["lm_eval_tasks"][0]
    (tmp_path / where).parent.mkdir(parents=True)
    (tmp_path / where).write_text(eval_tasks.INDEX.read_text().replace('"hellaswag": 0,\n', ""))
    assert generate.stale("lm_eval_tasks", tmp_path) == [str(where)]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"eval_tasks": "hellaswg"}, r"hellaswg.*hellaswag"),
    ({"eval_tasks": "BAD_YAML"}, r"not valid YAML"),
    ({"eval_tasks": MC, "champion_metric": "stdlib_mc:exact_match"}, r"champion_metric: got 'stdlib_mc:exact_match'; expected a metric stdlib_mc reports: acc, acc_norm"),
    ({"eval_tasks": MC, "champion_metric": "hellaswag:acc"}, r"champion_metric: got 'hellaswag:acc'.*\(stdlib_mc\)"),
    ({"champion_metric": "gsm8k:acc"}, r"champion_metric: got 'gsm8k:acc'; expected a task of --eval-tasks, which is empty"),
    ({"champion_metric": "bleu"}, r"champion_metric: got 'bleu'; expected one of auto, perplexity"),
    ({"champion_metric": "rouge_l", "max_new_tokens": 0}, r"champion_metric: got 'rouge_l'.*max_new_tokens is 0"),
])
def test_the_plan_refuses_bad_evaluation_params_before_any_job(overrides, message, tmp_path):
    from airflow.sdk.exceptions import AirflowFailException
    from gemma_pipeline.operators import tasks

    from tests.dags.test_candidates import PARAMS

    if overrides.get("eval_tasks") == "BAD_YAML":
        (tmp_path / "bad.yaml").write_text("task: [unclosed\n")
        overrides = {**overrides, "eval_tasks": str(tmp_path / "bad.yaml")}
    with pytest.raises(AirflowFailException, match=message):
        tasks.plan_task({**PARAMS, **overrides}, "r1")


def test_the_plan_accepts_a_task_metric_and_passes_the_tasks_to_the_benchmark():
    from gemma_pipeline.plan import candidates

    from tests.dags.test_candidates import PARAMS

    planned = candidates.plan({**PARAMS, "eval_tasks": f"{MC},hellaswag", "champion_metric": "stdlib_mc:acc_norm"}, "r1")
    args = planned["candidates"][0]["benchmark"]["arguments"]
    assert args[args.index("--eval-tasks") + 1] == f"{MC},hellaswag"
    assert args[args.index("--champion-metric") + 1] == "stdlib_mc:acc_norm"
