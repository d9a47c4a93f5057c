"""Task metrics: batched generation, the scorers, paired bootstrap intervals, and the stage's report with the base
model's evaluation shared by every candidate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs.benchmark import generation, metrics
from jobs.benchmark.core import run
from jobs.contract import artifacts, bootstrap
from jobs.contract.configs.benchmark import BenchmarkConfig, improvement
from jobs.contract.errors import BadInputError

STOP = 9


class _ScriptedModel:
    """keras-hub's generate step as a script: row r's answer is r+100, r+101, ... with STOP after `r + 1` tokens
    (rows 0-1 stop in time, the longer ones run out of tokens), written only past each row's prompt."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def make_generate_function(self):
        def fn(inputs, stop_token_ids):
            ids, mask = np.array(inputs["token_ids"]), inputs["padding_mask"]
            self.calls.append(ids.shape)
            for r in range(ids.shape[0]):
                start, row = int(mask[r].sum()), int(ids[r, 1])  # prompts are [BOS, row id, ...]
                answer = [row + 100 + k for k in range(row + 1)] + [STOP] + [0] * ids.shape[1]
                ids[r, start:] = answer[: ids.shape[1] - start]
            return {"token_ids": ids}
        return fn


def test_generate_restores_order_cuts_at_stop_and_at_max_new_tokens():
    prompts = [[1, row, *([7] * (5 - row))] for row in range(5)]  # different lengths, so sorting reorders them
    model = _ScriptedModel()
    out = generation.generate(model, prompts, max_new_tokens=3, stop_ids=(STOP,), batch_size=2, pad_id=0)
    assert out.tokens == [[100], [101, 102], [102, 103, 104], [103, 104, 105], [104, 105, 106]]
    assert out.stopped == [True, True, False, False, False]
    assert out.steps == 1 + 1 + 2 + 1 + 3 + 3 + 3
    assert {shape[0] for shape in model.calls} == {2}  # a fixed batch shape: the last batch is padded
    evened = generation.generate(_ScriptedModel(), prompts, 3, (STOP,), batch_size=4, pad_id=0)
    assert evened.shapes == {(3, 16)} and evened.tokens == out.tokens  # 5 prompts at 4: two batches of 3
    assert all(shape[1] % generation.LENGTH_STEP == 0 for shape in model.calls)


def test_prompt_ids_keep_the_end_of_a_long_prompt():
    class Tok:
        start_token_id = 2

        def __call__(self, texts):
            return [list(range(10, 10 + len(t))) for t in texts]

    assert generation.prompt_ids(Tok(), ["abc", "abcdefgh"], limit=5) == [[2, 10, 11, 12], [2, 14, 15, 16, 17]]


def test_scorers():
    scores = metrics.score(["Returns the value.", "nothing alike", ""],
                           ["Returns the value.<end_of_turn>", "Returns the value.", "Returns the value."])
    assert scores["exact_match"].tolist() == [1.0, 0.0, 0.0]
    assert scores["rouge_l"][0] == pytest.approx(1.0) and scores["rouge_l"][1] == 0.0 and scores["rouge_l"][2] == 0.0
    assert scores["chrf"][0] == pytest.approx(100.0) and 0 <= scores["chrf"][1] < 20


def test_paired_bootstrap_tells_a_real_difference_from_noise():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 200)
    same = bootstrap.paired(base + rng.normal(0, 0.01, 200), base, 1000, 0)
    better = bootstrap.paired(base + 0.05, base, 1000, 0)
    assert not same["excludes_zero"] and same["ci95_low"] < 0 < same["ci95_high"]
    assert better["excludes_zero"] and better["value"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="same examples"):
        bootstrap.paired(base[:10], base, 100, 0)


@pytest.mark.parametrize(("base", "tuned", "higher", "expected"), [(200.0, 150.0, False, 0.25), (0.2, 0.3, True, 0.5),
                                                                   (0.0, 0.1, True, float("inf")), (0.0, 0.0, True, 0.0)])
def test_improvement_in_the_metrics_good_direction(base, tuned, higher, expected):
    assert improvement(base, tuned, higher) == pytest.approx(expected)


def test_stage_reports_task_metrics_and_shares_the_base(tiny_run, tiny_gemma3, tmp_path, caplog):
    common = dict(data=str(tiny_run["preprocess"]), finetune=str(tiny_run["finetune"]), base_model=str(tiny_gemma3),
                  max_length=48, max_new_tokens=6, bootstrap=200, shared=str(tmp_path / "shared"))
    run(BenchmarkConfig(output=str(tmp_path / "a"), **common), tmp_path / "wa")
    first = json.loads((tmp_path / "a" / artifacts.BENCHMARK_REPORT).read_text())
    eval_rows = len((tiny_run["preprocess"] / "eval.jsonl").read_text().splitlines())
    assert first["generation"]["examples"] == eval_rows and first["champion_metric"] == {"name": "rouge_l", "higher_is_better": True}
    for model in ("base", "tuned"):
        figures = first["models"][model]["generation"]["metrics"]
        assert set(figures) == set(metrics.GENERATION)
        assert 0 <= figures["stop_rate"]["value"] <= 1 and figures["answer_tokens"]["value"] <= 6
        assert figures["rouge_l"]["ci95_low"] <= figures["rouge_l"]["value"] <= figures["rouge_l"]["ci95_high"]
    assert set(first["differences"]) == {*metrics.GENERATION, "perplexity"}
    lines = [json.loads(x) for x in (tmp_path / "a" / artifacts.GENERATIONS).read_text().splitlines()]
    assert len(lines) == eval_rows and {"answer", "base_answer", "scores", "base_scores", "stopped"} <= set(lines[0])
    assert not lines[0]["reference"].endswith("<end_of_turn>")
    assert first["base_evaluation"]["reused"] is False and len(list((tmp_path / "shared").iterdir())) == 1

    caplog.set_level("INFO")
    run(BenchmarkConfig(output=str(tmp_path / "b"), **common), tmp_path / "wb")  # another candidate of the same run
    second = json.loads((tmp_path / "b" / artifacts.BENCHMARK_REPORT).read_text())
    assert second["base_evaluation"]["reused"] is True and "reusing its evaluation" in caplog.text
    assert second["models"]["base"] == first["models"]["base"]
    run(BenchmarkConfig(output=str(tmp_path / "c"), **{**common, "max_new_tokens": 5}), tmp_path / "wc")
    assert json.loads((tmp_path / "c" / artifacts.BENCHMARK_REPORT).read_text())["base_evaluation"]["reused"] is False


def test_raw_text_skips_generation_and_refuses_a_generation_metric(tiny_run, tiny_gemma3, tmp_path):
    common = dict(data=str(tiny_run["preprocess"]), base_model=str(tiny_gemma3), max_length=48, mode="text", bootstrap=0)
    run(BenchmarkConfig(output=str(tmp_path / "a"), **common), tmp_path / "w")
    report = json.loads((tmp_path / "a" / artifacts.BENCHMARK_REPORT).read_text())
    assert "no reference answers" in report["generation"]["skipped"]
    assert report["champion_metric"]["name"] == "perplexity" and not (tmp_path / "a" / artifacts.GENERATIONS).exists()
    with pytest.raises(BadInputError, match="--champion-metric: got 'rouge_l'.*no reference answers"):
        run(BenchmarkConfig(output=str(tmp_path / "b"), champion_metric="rouge_l", **common), tmp_path / "w2")


def test_lm_eval_tasks_run_on_both_models_and_can_choose(tiny_run, tiny_gemma3, tmp_path):
    from tests.dags.test_eval_tasks import MC

    common = dict(data=str(tiny_run["preprocess"]), finetune=str(tiny_run["finetune"]), base_model=str(tiny_gemma3),
                  max_length=48, max_new_tokens=0, bootstrap=0, eval_tasks=MC)
    run(BenchmarkConfig(output=str(tmp_path / "a"), champion_metric="stdlib_mc:acc_norm", **common), tmp_path / "w")
    report = json.loads((tmp_path / "a" / artifacts.BENCHMARK_REPORT).read_text())
    for model in ("base", "tuned"):
        figure = report["models"][model]["tasks"]["stdlib_mc"]["acc_norm"]
        assert 0 <= figure["value"] <= 1 and figure["higher_is_better"] is True
    assert report["champion_metric"] == {"name": "stdlib_mc:acc_norm", "higher_is_better": True}
    assert "stdlib_mc:acc_norm" in report["differences"] and report["improvement"]["metric"] == "stdlib_mc:acc_norm"
    with pytest.raises(BadInputError, match="one of the task metrics produced: stdlib_mc:acc, stdlib_mc:acc_norm"):
        run(BenchmarkConfig(output=str(tmp_path / "b"), champion_metric="stdlib_mc:f1", **common), tmp_path / "w2")


def test_sampled_answers_are_seeded(tiny_gemma3, tmp_path):
    from jobs.common import models

    model = models.load_causal_lm(str(tiny_gemma3), tmp_path)
    prompts = generation.prompt_ids(model.preprocessor.tokenizer, ["What does function 3 do?", "Say it."], 16)

    def draw(seed: int) -> list[list[int]]:
        generation.configure(model, temperature=1.0, top_p=0.9, seed=seed)
        return generation.generate(model, prompts, 8, (), 2, 0).tokens

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)  # a random tiny model's flat distribution: another seed draws other tokens
