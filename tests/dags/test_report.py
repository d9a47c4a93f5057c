"""The run report: cost arithmetic, the price table, and the pages it writes."""

from __future__ import annotations

import json

import pytest
from gemma_pipeline.operators.stage import job_seconds
from gemma_pipeline.plan import markup, report

from jobs.contract.layout import RunLayout
from tests.support.generations import generation_row, metric

MANIFESTS = {
    "preprocess": {"wall_time_s": 10.0, "peak_rss_bytes": 2**30, "metrics": {}},
    "finetune": {"wall_time_s": 3500.0, "peak_rss_bytes": 8 * 2**30,
                 "metrics": {"steps": 200, "tokens_per_s": 1234.5, "eval_loss_before": 5.8, "eval_loss_after": 5.2}},
    "benchmark": {"wall_time_s": 60.0, "peak_rss_bytes": 4 * 2**30, "metrics": {}},
    "convert": None,
}
DOCUMENTS = {
    "benchmark": {"mode": "response", "relative_improvement": 0.46, "models": {
        "base": {"splits": {"eval": {"perplexity": 353.7, "ci95_low": 224.6, "ci95_high": 564.3}}},
        "tuned": {"splits": {"eval": {"perplexity": 190.6, "ci95_low": 134.4, "ci95_high": 276.9}}}}},
    "parity": None,
}
USAGES = {"preprocess": {"backend": "gke", "profile": "cpu", "seconds": 30.0},
          "finetune": {"backend": "gke", "profile": "tpu-v5e-4", "seconds": 3600.0},
          "benchmark": {"backend": "gke", "profile": "tpu-v5e-1", "seconds": None},
          "convert": None}


@pytest.fixture
def prices(monkeypatch):
    monkeypatch.setenv(report.PRICES_ENV, json.dumps({"tpu-v5e-4": 5.0, "cpu": 0.2}))
    return report.price_table()


CHAMPION = {"champion": "default", "index": 0, "why": "lowest eval perplexity", "candidates": [
    {"key": "default", "overrides": {}, "status": "finished", "champion": True, "perplexity": 190.6, "ci95": [180.0, 200.0],
     "relative_improvement": 0.46, "prefixes": RunLayout("gs://b/runs/r").stages(),
     "seconds": {"finetune": 3600.0, "benchmark": 360.0}, "profiles": {"finetune": "tpu-v5e-4", "benchmark": "cpu"}},
    {"key": "lora-rank-8-abc", "overrides": {"lora_rank": 8}, "status": "missing", "champion": False,
     "prefixes": RunLayout("gs://b/runs/r").stages("lora-rank-8-abc")}]}


def test_cost_is_price_times_hours_held(prices):
    built = report.build("gs://b/runs/r", {"lora_rank": 4}, MANIFESTS, DOCUMENTS, USAGES, prices, CHAMPION)
    rows = {r["stage"]: r for r in built["stages"]}
    assert rows["finetune"]["accelerator_hours"] == 4.0  # 4 chips for one hour
    assert rows["finetune"]["cost_usd"] == 5.0
    assert rows["preprocess"]["accelerator_hours"] == 0.0 and rows["preprocess"]["cost_usd"] == pytest.approx(0.2 * 30 / 3600, abs=1e-4)
    # No Job timing: the stage's own wall time from its manifest stands in.
    assert rows["benchmark"]["seconds"] == 60.0 and rows["benchmark"]["cost_usd"] == pytest.approx(1.2 * 60 / 3600, abs=1e-4)
    assert rows["convert"]["done"] is False and rows["convert"]["cost_usd"] is None
    assert built["complete"] is False
    assert built["total_cost_usd"] == pytest.approx(5.0 + 0.2 * 30 / 3600 + 1.2 * 60 / 3600, abs=1e-3)
    assert built["summary"]["base_perplexity"] == 353.7 and built["summary"]["tuned_perplexity"] == 190.6
    assert "convert" not in built["artifacts"]
    assert "gs://b/runs/r/candidates/default/finetune/adapter.lora.h5" in built["artifacts"]["finetune"]
    assert "gs://b/runs/r/preprocess/stats.json" in built["artifacts"]["preprocess"]


def test_the_report_shows_the_candidates_and_marks_the_champion(prices):
    built = report.build("gs://b/runs/r", {}, MANIFESTS, DOCUMENTS, USAGES, prices, CHAMPION)
    text = report.markdown(built, {})
    assert "## Candidates" in text
    assert "| **default** (champion) | `{}` | finished | 190.600 | 180.000–200.000 | 46.0% | 3960 | 5.0200 |" in text
    assert "| lora-rank-8-abc | `{\"lora_rank\": 8}` | missing | n/a |" in text


def test_a_stage_reused_by_a_rerun_keeps_the_figures_of_the_run_that_made_it(prices):
    manifests = {k: dict(v or {}, finished_at="2026-11-20T10:00:00Z") if v else None for k, v in MANIFESTS.items()}
    usages = {s: {"backend": "local", "profile": "cpu", "seconds": 2.0} for s in MANIFESTS}
    built = report.build("gs://b/runs/r", {}, manifests, DOCUMENTS, usages, prices, CHAMPION, run_started="2026-11-24T00:00:00Z")
    rows = {r["stage"]: r for r in built["stages"]}
    assert rows["benchmark"]["skipped"] is True and rows["benchmark"]["seconds"] == 60.0  # not the skip's 2 s
    assert "| benchmark | reused (skipped) |" in report.stage_table(built)


@pytest.mark.parametrize("raw,message", [
    ('{"tpu-v9": 1}', "unknown profile 'tpu-v9'"),
    ('{"cpu": -1}', "price of 'cpu' is -1; expected a number >= 0"),
    ('{"cpu": "cheap"}', "price of 'cpu' is 'cheap'"),
    ('{"cpu": 1', "not JSON"),
])
def test_price_table_rejects_bad_overrides(monkeypatch, raw, message):
    monkeypatch.setenv(report.PRICES_ENV, raw)
    with pytest.raises(ValueError, match=f"GEMMA_PIPELINE_PRICES: .*{message}"):
        report.price_table()


def test_price_table_from_a_file(monkeypatch, tmp_path):
    path = tmp_path / "prices.json"
    path.write_text('{"gpu-l4-1": 0.7}')
    monkeypatch.setenv(report.PRICES_ENV, str(path))
    table = report.price_table()
    assert table["gpu-l4-1"] == 0.7 and table["cpu"] > 0


def test_pages_carry_results_costs_charts_and_params(prices):
    built = report.build("gs://b/runs/r", {"lora_rank": 4}, MANIFESTS, DOCUMENTS, USAGES, prices)
    md = report.markdown(built, {"loss curve": "finetune/loss_curve.png"})
    assert "| perplexity before (response mode, eval split) | 353.700 |" in md
    assert "| perplexity after | 190.600 |" in md and "| relative improvement | 46.0% |" in md
    assert "| finetune | done | tpu-v5e-4 | 3600.0 | 8.00 | 4.0000 | 5.00 | 5.0000 |" in md
    assert "| convert | not finished |" in md and "INCOMPLETE" in md
    assert "![loss curve](finetune/loss_curve.png)" in md and '"lora_rank": 4' in md
    page = markup.to_html(report.markdown(built, {"loss curve": "data:image/png;base64,iVBORw0KGgo="}))
    assert '<img src="data:image/png;base64,iVBORw0KGgo="' in page and "<table>" in page and "<td>tpu-v5e-4</td>" in page


@pytest.mark.parametrize("job,seconds", [
    ({"status": {"startTime": "2026-11-22T10:00:00Z", "completionTime": "2026-11-22T11:30:00Z"}}, 5400.0),
    ({"status": {"start_time": "2026-11-22T10:00:00+00:00", "conditions": [
        {"type": "Failed", "status": "True", "last_transition_time": "2026-11-22T10:01:00+00:00"}]}}, 60.0),
    ({"status": {"startTime": "2026-11-22T10:00:00Z"}}, None),
    ({}, None),
])
def test_job_seconds_from_the_jobs_status(job, seconds):
    assert job_seconds(job) == seconds


def test_a_local_run_shows_wall_time_and_no_price(prices):
    from gemma_pipeline.plan import report

    row = report.stage_row("finetune", {"wall_time_s": 90.0}, {"backend": "local", "profile": "tpu-v5e-1",
                                                                "seconds": 100.0}, prices)
    assert row["seconds"] == 100.0
    assert row["cost_usd"] is None and row["hourly_usd"] is None and row["accelerator_hours"] is None


# A champion.json with generation metrics (benchmark report v2): two finished candidates and one whose benchmark
# did not finish, the champion chosen by ROUGE-L.
_LAYOUT = RunLayout("gs://b/runs/r")


def _candidate(key, champion, **extra):
    return {"key": key, "overrides": {}, "status": "finished", "champion": champion, "perplexity": 190.0,
            "ci95": [180.0, 200.0], "relative_improvement": 0.4, "prefixes": _LAYOUT.stages(key), **extra}


GENERATION_CHAMPION = {
    "champion": "rank-8", "index": 1, "why": "highest ROUGE-L", "champion_metric": {"name": "rouge_l", "higher_is_better": True},
    # As the paired bootstrap writes it (jobs.contract.bootstrap.paired), verdict included.
    "pairwise": {"rank-4": {"value": 0.05, "ci95_low": 0.01, "ci95_high": 0.09, "excludes_zero": True}},
    "generation": {"max_new_tokens": 64, "examples": 40, "sampling": "greedy"},
    "candidates": [
        _candidate("rank-4", False, metrics={"rouge_l": metric(0.35, 0.30, 0.40), "stop_rate": metric(0.9, 0.8, 0.97)},
                   base_metrics={"rouge_l": metric(0.2, 0.15, 0.25)},
                   vs_base={"rouge_l": metric(0.15, 0.1, 0.2), "stop_rate": metric(0.02, -0.05, 0.09)}),
        _candidate("rank-8", True, metrics={"perplexity": metric(190.0, 180.0, 200.0), "rouge_l": metric(0.4, 0.35, 0.45),
                                            "stop_rate": metric(0.95, 0.9, 0.99), "stdlib_mc:acc": metric(0.6)},
                   base_metrics={"perplexity": metric(350.0, 300.0, 400.0), "rouge_l": metric(0.2, 0.15, 0.25),
                                 "stop_rate": metric(0.5, 0.4, 0.6), "stdlib_mc:acc": metric(0.5)},
                   vs_base={"rouge_l": metric(0.2, 0.14, 0.26), "stop_rate": metric(0.45, 0.3, 0.6)}),
        {"key": "rank-16", "overrides": {"lora_rank": 16}, "status": "missing", "champion": False,
         "prefixes": _LAYOUT.stages("rank-16")},
    ],
}


# The champion's per-example change in ROUGE-L: +0.5, -0.2, +0.1, -0.6, +0.3, 0, +0.5 (a tie with 0), -0.1.
CHAMPION_ROWS = [generation_row(i, t, b, base_stopped=i != 0) for i, (t, b) in enumerate(
    [(0.9, 0.4), (0.3, 0.5), (0.6, 0.5), (0.1, 0.7), (0.8, 0.5), (0.5, 0.5), (0.7, 0.2), (0.4, 0.5)])]
# The runner-up's file lists the same examples in another order: answers are matched by index, not by line.
RUNNER_UP_ROWS = [generation_row(i, 0.5, 0.5, answer=f"rank-4 says {i}", base_stopped=i != 0) for i in reversed(range(8))]
GENERATIONS = {"rank-8": CHAMPION_ROWS, "rank-4": RUNNER_UP_ROWS}


def _generation_report(prices, champion=GENERATION_CHAMPION, generations=GENERATIONS):
    return report.build("gs://b/runs/r", {}, MANIFESTS, DOCUMENTS, USAGES, prices, champion, generations=generations)


def test_the_metrics_table_shows_every_metric_with_its_interval_and_marks_the_championmetric(prices):
    md = report.markdown(_generation_report(prices), {})
    assert ("| model | perplexity | ROUGE-L ★ (champion metric, higher is better) | stop rate | stdlib\\_mc:acc |"
            in md)
    assert "| base model (no fine-tune) | 350.000 (300.000–400.000) | 0.200 (0.150–0.250) | 50.0% (40.0%–60.0%) | 0.500 |" in md
    assert "| **rank-8** (champion) | 190.000 (180.000–200.000) | 0.400 (0.350–0.450) | 95.0% (90.0%–99.0%) | 0.600 |" in md
    assert "| rank-4 | n/a | 0.350 (0.300–0.400) | 90.0% (80.0%–97.0%) | n/a |" in md
    assert "| rank-16 | n/a | n/a | n/a | n/a |" in md
    assert "Stop rate: the share of answers that ended with the model's end-of-turn within max_new_tokens (64)" in md
    # Differences from base: † where the interval excludes 0, not where it straddles it.
    assert "| **rank-8** (champion) | +0.200 (+0.140–+0.260) † | +45.0% (+30.0%–+60.0%) † |" in md
    assert "| rank-4 | +0.150 (+0.100–+0.200) † | +2.0% (-5.0%–+9.0%) |" in md
    assert "| rank-4 | +0.050 (+0.010–+0.090) † |" in md  # the champion against the runner-up
    assert "Answers generated for 40 eval examples, greedy, at most 64 new tokens each." in md
    page = markup.to_html(md)
    assert "<th>ROUGE-L ★ (champion metric, higher is better)</th>" in page


def test_the_perplexity_difference_says_it_is_base_minus_tuned(prices):
    """The benchmark writes perplexity's difference as base − tuned (a drop is +): the column must say so."""
    rows = [dict(r) for r in GENERATION_CHAMPION["candidates"]]
    rows[1]["vs_base"] = {**rows[1]["vs_base"], "perplexity": metric(160.0, 120.0, 200.0)}
    md = report.markdown(_generation_report(prices, {**GENERATION_CHAMPION, "candidates": rows}), {})
    section = md.split("### Against the base model")[1].split("###")[0]
    assert "perplexity: base minus tuned, so a lower perplexity shows as +" in section
    assert "| tuned − base | perplexity (base − tuned) | ROUGE-L ★ (champion metric, higher is better) | stop rate |" in section
    assert "| **rank-8** (champion) | +160.000 (+120.000–+200.000) † |" in section


def test_answers_of_every_candidate_stand_side_by_side_on_the_same_prompts(prices):
    built = _generation_report(prices)
    md = report.markdown(built, {})
    section = md.split("## Answers side by side")[1].split("\n## ")[0]
    assert "| prompt | reference | base model | rank-4 | **rank-8** (champion) |" in section
    assert "| prompt 0 | reference 0 | base 0 (cut off) | rank-4 says 0 | tuned 0 |" in section
    assert "| prompt 4 | reference 4 | base 4 | rank-4 says 4 | tuned 4 |" in section
    assert "prompt 5" not in section  # the first five examples only
    assert [e["index"] for e in built["side_by_side"]["examples"]] == [0, 1, 2, 3, 4]
    # A candidate whose benchmark did not finish has no column; report.json carries the same table.
    assert "rank-16" not in section
    assert [a["answer"] for a in built["side_by_side"]["examples"][2]["answers"]] == ["rank-4 says 2", "tuned 2"]


def test_the_examples_that_improved_and_regressed_most_come_largest_first(prices):
    built = _generation_report(prices)
    changed = built["most_changed"]
    assert changed["metric"] == "rouge_l" and changed["examples"] == 8
    assert [c["index"] for c in changed["improved"]] == [0, 6, 4]  # +0.5, +0.5 (tie: lower index first), +0.3
    assert [c["index"] for c in changed["regressed"]] == [3, 1, 7]  # -0.6, -0.2, -0.1
    md = report.markdown(built, {})
    assert "among the first 8 of 40 eval examples" in md
    improved = md.split("### Improved most")[1].split("###")[0]
    assert "| prompt | reference | base answer | champion answer | base ROUGE-L | champion ROUGE-L |" in improved
    assert improved.index("| prompt 0 | reference 0 | base 0 | tuned 0 | 0.400 | 0.900 |") < improved.index("| prompt 6 |") \
        < improved.index("| prompt 4 |")


def test_a_champion_metric_without_per_example_scores_ranks_examples_by_rouge_l(prices):
    champion = {**GENERATION_CHAMPION, "champion_metric": {"name": "perplexity", "higher_is_better": False}}
    assert _generation_report(prices, champion)["most_changed"]["metric"] == "rouge_l"
    champion = {**GENERATION_CHAMPION, "champion_metric": {"name": "chrf", "higher_is_better": True}}
    built = _generation_report(prices, champion)
    assert built["most_changed"]["metric"] == "chrf" and built["most_changed"]["improved"][0]["difference"] == 5.0
    assert built["most_changed"]["regressed"] == [] and "### Regressed most\n\nNone." in report.markdown(built, {})


def test_skipped_generation_is_one_line_with_its_reason(prices):
    rows = [{k: v for k, v in r.items() if k not in ("metrics", "vs_base", "base_metrics")} for r in GENERATION_CHAMPION["candidates"]]
    champion = {**GENERATION_CHAMPION, "candidates": rows, "generation": {"skipped": "raw-text data has no prompts"}}
    md = report.markdown(_generation_report(prices, champion, {}), {})
    assert "## Metrics\n\nGeneration on the eval split was skipped: raw-text data has no prompts.\n" in md
    assert "## Answers side by side" not in md and "## Where the champion changed most" not in md


def test_a_report_of_an_old_champion_json_still_renders(prices):
    built = report.build("gs://b/runs/r", {}, MANIFESTS, {**DOCUMENTS, "answers": [
        {"prompt": "p", "reference": "r", "before": "b", "after": "a"}]}, USAGES, prices, CHAMPION)
    assert built["metrics"] is None and built["side_by_side"] is None and built["most_changed"] is None
    md = report.markdown(built, {})
    assert "## Candidates" in md and "## Metrics" not in md and "## Answers side by side" not in md
    assert f"## {report.EXPORT_CHECK_TITLE}\n" in md and "| p | r | b | a |" in md
    assert "<table>" in markup.to_html(md)


def test_generation_rows_stop_at_the_limit_and_pass_over_a_cut_last_line():
    lines = [json.dumps({"index": i, "answer": "a\u2028b"}, ensure_ascii=False) for i in range(5)]
    data = ("\n".join(lines) + "\n").encode()
    assert [r["index"] for r in report.generation_rows(data, limit=3)] == [0, 1, 2]
    cut = data[: len(data) - 10]  # a ranged read ends mid-line
    assert [r["index"] for r in report.generation_rows(cut)] == [0, 1, 2, 3]
    assert report.generation_rows(data)[0]["answer"] == "a\u2028b"  # U+2028 inside an answer is not a line break


class _Blob:
    def __init__(self, objects, name, reads):
        self.objects, self.name, self.reads = objects, name, reads

    def download_as_bytes(self, start=None, end=None):
        from google.api_core.exceptions import NotFound

        self.reads.append((self.name, start, end))
        if self.name not in self.objects:
            raise NotFound(self.name)
        return self.objects[self.name][start: end + 1]


class _Store:
    """Cloud Storage as the report operator's ranged reads see it."""

    def __init__(self, objects):
        self.objects, self.reads = objects, []
        self.client = self

    def bucket(self, _name):
        return self

    def blob(self, name):
        return _Blob(self.objects, name, self.reads)


def test_the_operator_reads_the_head_of_each_finished_candidates_generations():
    from gemma_pipeline.operators import report as operator

    from jobs.contract import artifacts

    name = lambda key: f"runs/r/candidates/{key}/benchmark/{artifacts.GENERATIONS}"  # noqa: E731
    big = "".join(json.dumps(generation_row(i, 0.5, 0.5)) + "\n" for i in range(50)).encode()
    store = _Store({name("rank-8"): big})
    found = operator.candidate_generations(store, GENERATION_CHAMPION, max_bytes=1000)
    assert list(found) == ["rank-8"]  # rank-4 wrote none; rank-16 did not finish and is not read
    assert 0 < len(found["rank-8"]) < 50 and found["rank-8"][0]["index"] == 0
    assert sorted(store.reads) == [(name("rank-4"), 0, 999), (name("rank-8"), 0, 999)]
    skipped = {**GENERATION_CHAMPION, "generation": {"skipped": "raw text"}}
    assert operator.candidate_generations(_Store({}), skipped) == {} and operator.candidate_generations(store, None) == {}


def test_the_summary_shows_task_metrics_before_and_after_with_intervals():
    bench = {"models": {m: {"splits": {"eval": {"perplexity": p}}, "generation": {"metrics": {
        "stop_rate": {"value": v, "ci95_low": v - 0.1, "ci95_high": v + 0.1}}}} for m, p, v in (("base", 300.0, 0.2), ("tuned", 50.0, 0.8))},
        "relative_improvement": 0.8, "mode": "response"}
    summary = report.summarize({"finetune": None}, {"benchmark": bench})
    table = report.summary_table({"summary": summary})
    assert "| stop rate before → after (95% interval) | 0.200 [0.100–0.300] → 0.800 [0.700–0.900] |" in table, table
    assert "ROUGE" not in table  # only what the benchmark computed


def _split(compute, cache=None):
    seconds = {"imports": 10.0, "model_load": 5.0, "compilation": 20.0, "compute": compute, "staging": 1.0,
               "publish": 2.0, "other": 2.0}
    return {"seconds": seconds, "cache": cache}


def test_where_the_time_went_per_stage_and_candidate(prices):
    manifests = {**MANIFESTS, "preprocess": {**MANIFESTS["preprocess"], "metrics": {"time_split": _split(10.0)["seconds"]}},
                 "convert": {"wall_time_s": 40.0, "peak_rss_bytes": 2**30, "metrics": {"time_split": _split(30.0)["seconds"]}}}
    champion = {**CHAMPION, "candidates": [
        {**CHAMPION["candidates"][0], "time_split": {"finetune": _split(60.0, {"hits": 2, "misses": 5}),
                                                    "benchmark": _split(160.0, {"hits": 7, "misses": 0})}},
        {**CHAMPION["candidates"][1], "time_split": {"finetune": _split(40.0, {"hits": 5, "misses": 0})}}]}
    built = report.build("gs://b/runs/r", {}, manifests, DOCUMENTS, USAGES, prices, champion)
    labels = [label for label, _ in report.time_rows(built)]
    assert labels == ["preprocess", "finetune [default]", "finetune [lora-rank-8-abc]", "benchmark [default]", "convert"]
    table = report.time_table(built)
    assert "| benchmark \\[default\\] | 10.0 | 5.0 | 20.0 | 160.0 | 1.0 | 2.0 | 2.0 | 80% | 7 / 0 |" in table
    assert "| preprocess |" in table and "| – |" in table  # no JAX there: no cache figures
    assert "## Where the time went" in report.markdown(built, {})
    # A run whose manifests predate the split renders without the section.
    assert report.time_table(report.build("gs://b/runs/r", {}, MANIFESTS, DOCUMENTS, USAGES, prices, CHAMPION)) is None
