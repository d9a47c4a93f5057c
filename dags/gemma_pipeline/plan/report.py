"""The run report: one page per run, written to `<run prefix>/report.{md,html,json}` after the last stage.

It reads only what the stages published (their `_manifest.json`, `metrics.json`, `report.json`,
`parity.json` and charts) and the `usage` each task pushed to XCom, so it needs no ML libraries and runs on
the Airflow worker. Cost per stage = the profile's hourly price x the hours the stage held its hardware (on
GKE: the Job's admission to completion; locally: the subprocess's wall time, which only estimates what the
profile's hardware would cost). Prices come from `profiles.py` unless overridden by `GEMMA_PIPELINE_PRICES`
(a JSON object or a path to one) or the Airflow Variable `gemma_pipeline_prices`: `{"tpu-v5e-1": 1.2, ...}`.

Everything a run's data or its user decides (prompts, answers, candidates, params, paths) is untrusted: it reaches
the Markdown as literal text, and `markup.to_html` renders with raw HTML off and only safe
link schemes, so neither `report.md` nor `report.html` can carry markup or script that came from the data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gemma_pipeline.plan import json_object, markup, profiles
from jobs.contract import artifacts, splits, stages
from jobs.contract import documents as docs
from jobs.contract.layout import RunLayout

PRICES_ENV = "GEMMA_PIPELINE_PRICES"
PRICES_VARIABLE = "gemma_pipeline_prices"
CHARTS = {"loss curve": ("finetune", artifacts.LOSS_CURVE), "perplexity": ("benchmark", artifacts.PERPLEXITY_CHART)}


def price_table() -> dict[str, float]:
    raw = os.environ.get(PRICES_ENV)
    source = PRICES_ENV
    if raw is None:
        from airflow.sdk import Variable

        raw, source = Variable.get(PRICES_VARIABLE, default=None), f"Airflow Variable {PRICES_VARIABLE}"
    prices = {name: p.hourly_usd for name, p in profiles.PROFILES.items()}
    if not raw:
        return prices
    text = Path(raw).read_text() if not raw.lstrip().startswith("{") else raw
    overrides = json_object(text, source, "an object of profile name to USD per hour")
    for name, value in overrides.items():
        if name not in prices:
            raise ValueError(f"{source}: unknown profile {name!r}; expected one of {', '.join(sorted(prices))}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{source}: price of {name!r} is {value!r}; expected a number >= 0 (USD per hour)")
        prices[name] = float(value)
    return prices


def _accelerators(profile_name: str) -> int:
    profile = profiles.PROFILES.get(profile_name)
    resource = profile.accelerator_resource if profile else None
    return int(profile.requests[resource]) if profile and resource else 0


def stage_row(stage: str, manifest: dict[str, Any] | None, usage: dict[str, Any] | None, prices: dict[str, float],
              run_started: str = "") -> dict[str, Any]:
    """A stage's line in the report. A stage this run skipped (its manifest predates the run) shows the time,
    memory and cost of the run that made it, marked as reused, not the seconds the skip took."""
    usage = usage or {}
    profile = usage.get("profile", "")
    seconds = usage.get("seconds")
    skipped = bool(manifest and run_started and manifest.get("finished_at", "") < run_started)
    if (seconds is None or skipped) and manifest:
        seconds = manifest.get("wall_time_s")
    hours = seconds / 3600 if seconds is not None else None
    row: dict[str, Any] = {
        "stage": stage, "done": manifest is not None, "skipped": skipped, "backend": usage.get("backend", ""), "profile": profile,
        "seconds": seconds, "stage_wall_s": manifest.get("wall_time_s") if manifest else None,
        "peak_rss_bytes": manifest.get("peak_rss_bytes") if manifest else None,
        "hourly_usd": prices.get(profile), "accelerator_hours": None, "cost_usd": None,
    }
    if row["backend"] == "local":
        row["hourly_usd"] = None  # the profile's hardware never ran: a local run reports its wall time, no price
    elif hours is not None and profile in prices:
        row["accelerator_hours"] = round(hours * _accelerators(profile), 4)
        row["cost_usd"] = round(hours * prices[profile], 4)
    return row


def summarize(manifests: dict[str, dict | None], documents: dict[str, dict | None]) -> dict[str, Any]:
    fine = (manifests.get("finetune") or {}).get("metrics", {})
    bench = documents.get("benchmark") or {}
    split = lambda name: docs.eval_split(bench, name)  # noqa: E731
    parity = documents.get("parity")
    return {
        "base_perplexity": split("base").get("perplexity"), "tuned_perplexity": split("tuned").get("perplexity"),
        "base_ci95": [split("base").get("ci95_low"), split("base").get("ci95_high")],
        "tuned_ci95": [split("tuned").get("ci95_low"), split("tuned").get("ci95_high")],
        "relative_improvement": bench.get("relative_improvement"), "perplexity_mode": bench.get("mode"),
        "steps": fine.get("steps"), "tokens_per_s": fine.get("tokens_per_s"),
        "eval_loss_before": fine.get("eval_loss_before"), "eval_loss_after": fine.get("eval_loss_after"),
        "parity": parity,
    }


def key_artifacts(stage: str, manifest: dict[str, Any]) -> list[str]:
    """What a user opens first; for preprocessing, the splits as written: one file each, or (Beam engine) the first
    of each split's shards."""
    written = list(stages.get(stage).writes)
    if stage != "preprocess":
        return written
    outputs = manifest.get("outputs") or {}
    first_shard = lambda n: (m := splits.SHARD.match(n)) and m["split"] in (artifacts.TRAIN, artifacts.EVAL) and m["index"] == "00000"  # noqa: E731
    return [n for n in sorted(outputs) if n in written or first_shard(n)] or written


def stage_prefixes(run_prefix: str, champion: dict[str, Any] | None) -> dict[str, str | None]:
    """Where the report reads each stage: the shared preprocessing, and the champion's candidate folders."""
    prefixes = (docs.champion_row(champion) or {}).get("prefixes", {})
    layout = RunLayout(run_prefix)
    return {s: prefixes.get(s) if stages.get(s).per_candidate else layout.stage(s) for s in stages.NAMES}


def build(run_prefix: str, params: dict[str, Any], manifests: dict[str, dict | None], documents: dict[str, dict | None],
          usages: dict[str, dict | None], prices: dict[str, float], champion: dict[str, Any] | None = None,
          run_started: str = "") -> dict[str, Any]:
    rows = [stage_row(s, manifests.get(s), usages.get(s), prices, run_started) for s in stages.NAMES]
    where = stage_prefixes(run_prefix, champion)
    costs = [r["cost_usd"] for r in rows if r["cost_usd"] is not None]
    return {
        "run_prefix": run_prefix,
        "complete": all(r["done"] for r in rows),
        "params": params,
        "summary": summarize(manifests, documents),
        "stages": rows,
        "total_cost_usd": round(sum(costs), 4) if costs else None,
        "artifacts": {s: [f"{where[s]}/{name}" for name in key_artifacts(s, manifests[s])] for s in stages.NAMES
                      if manifests.get(s)},
        "champion": champion,
        "answers": documents.get("answers") or [],
        "prices": prices,
    }


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "n/a"
    if spec and isinstance(value, (int, float)):
        return format(value, spec)
    return markup.text(value)  # a string where a number belongs is shown, as text, rather than failing the report


def summary_table(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = ["| metric | value |", "|---|---|",
             f"| perplexity before ({_fmt(s['perplexity_mode'])} mode, eval split) | {_fmt(s['base_perplexity'], '.3f')} |",
             f"| perplexity after | {_fmt(s['tuned_perplexity'], '.3f')} |",
             f"| relative improvement | {_fmt(s['relative_improvement'], '.1%')} |",
             f"| fine-tune steps | {_fmt(s['steps'])} |",
             f"| training tokens/s | {_fmt(s['tokens_per_s'], '.1f')} |"]
    parity = s.get("parity")
    if parity:
        lines.append(f"| export parity | {'passed' if parity.get('passed') else 'FAILED'} "
                     f"(max logit diff {_fmt(parity.get('logits_max_abs_diff'), '.2e')}, tolerance {_fmt(parity.get('tolerance'))}) |")
    return "\n".join(lines)


def stage_table(report: dict[str, Any]) -> str:
    lines = ["| stage | status | profile | wall time (s) | peak memory (GiB) | accelerator-hours | USD/hour | cost (USD) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["stages"]:
        rss = r["peak_rss_bytes"] / 2**30 if r["peak_rss_bytes"] else None
        status = "reused (skipped)" if r.get("skipped") else "done" if r["done"] else "not finished"
        lines.append(f"| {markup.text(r['stage'])} | {status} | {_fmt(r['profile'] or None)} | "
                     f"{_fmt(r['seconds'], '.1f')} | {_fmt(rss, '.2f')} | {_fmt(r['accelerator_hours'], '.4f')} | "
                     f"{_fmt(r['hourly_usd'], '.2f')} | {_fmt(r['cost_usd'], '.4f')} |")
    lines.append(f"| total | | | | | | | {_fmt(report['total_cost_usd'], '.4f')} |")
    return "\n".join(lines)


def candidate_cost(row: dict[str, Any], prices: dict[str, float] | None) -> float | None:
    """Fine-tune plus benchmark: each stage's profile price x its wall time (None without prices, i.e. locally)."""
    if not prices:
        return None
    total = 0.0
    for stage, seconds in (row.get("seconds") or {}).items():
        price = prices.get((row.get("profiles") or {}).get(stage, ""))
        if seconds is None or price is None:
            return None
        total += price * seconds / 3600
    return round(total, 4)


def candidates_table(champion: dict[str, Any], prices: dict[str, float] | None = None) -> str:
    lines = ["| candidate | overrides | status | eval perplexity | 95% interval | vs base | time (s) | cost (USD) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in champion["candidates"]:
        ci = r.get("ci95") or [None, None]
        name = f"**{markup.text(r['key'])}** (champion)" if r.get("champion") else markup.text(r["key"])
        times = [t for t in (r.get("seconds") or {}).values() if t is not None]
        lines.append(f"| {name} | {markup.code(json.dumps(r['overrides'], sort_keys=True), cell=True)} | {markup.text(r['status'])} | "
                     f"{_fmt(r.get('perplexity'), '.3f')} | {_fmt(ci[0], '.3f')}–{_fmt(ci[1], '.3f')} | "
                     f"{_fmt(r.get('relative_improvement'), '.1%')} | {_fmt(sum(times) if times else None, '.0f')} | "
                     f"{_fmt(candidate_cost(r, prices), '.4f')} |")
    return "\n".join(lines)


def answers_table(answers: list[dict[str, Any]]) -> str:
    lines = ["| prompt | reference | before | after |", "|---|---|---|---|"]
    for a in answers:
        lines.append(f"| {_fmt(a['prompt'])} | {_fmt(a['reference'])} | {_fmt(a['before'])} | {_fmt(a['after'])} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any], charts: dict[str, str]) -> str:
    """`charts` maps a chart's title to its image reference (a relative path, or a data: URI); a reference that is
    not a `safe_link` is left out."""
    backend = {r["backend"] for r in report["stages"] if r["backend"]}
    parts = [f"# Gemma LoRA run report\n\n{markup.code(report['run_prefix'])}: "
             f"{'all four stages finished' if report['complete'] else 'INCOMPLETE: some stages did not finish'}.\n",
             "## Results\n", summary_table(report) + "\n",
             *(["## Candidates\n", candidates_table(report["champion"], None if backend == {"local"} else report.get("prices"))
                + "\n", markup.line(report["champion"]["why"]) + ".\n"]
               if report.get("champion") else []),
             "## Stages (the champion's)\n", stage_table(report) + "\n",
             ("Local backend: times are this machine's wall time; no cost is shown, since the profiles' hardware "
              "never ran.\n" if backend == {"local"} else
              "Cost = the profile's hourly price x the hours the stage held its hardware. Prices are a configurable "
              "table, not quotes.\n")]
    for title, ref in charts.items():
        if markup.safe_link(ref):  # percent-encoded: nothing in it can end the link's destination
            parts.append(f"## {markup.text(title.capitalize())}\n\n![{markup.text(title)}]({quote(ref, safe='/:;,=+@.-_~?#!$*%')})\n")
    if report.get("answers"):
        parts.append("## What the model says\n\nGreedy answers to eval prompts, through transformers, before and after "
                     "fine-tuning.\n\n" + answers_table(report["answers"]) + "\n")
    parity = report["summary"].get("parity")
    if parity:
        parts.append("## Export parity\n\n" + markup.fence(json.dumps(parity, indent=2, default=str)))
    parts.append("## Artifacts\n\n" + "\n".join(f"- {markup.line(u)}" for uris in report["artifacts"].values() for u in uris) + "\n")
    parts.append("## Parameters\n\n" + markup.fence(json.dumps(report["params"], indent=2, sort_keys=True, default=str)))
    return "\n".join(parts)
