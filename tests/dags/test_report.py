"""The run report: cost arithmetic, the price table, and the pages it writes."""

from __future__ import annotations

import json

import pytest
from gemma_pipeline.operators.stage import job_seconds
from gemma_pipeline.plan import markup, report

from jobs.contract.layout import RunLayout

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
