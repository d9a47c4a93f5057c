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
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gemma_pipeline.plan import approval, json_object, markup, profiles
from jobs.contract import artifacts, splits, stages
from jobs.contract import documents as docs
from jobs.contract.layout import RunLayout

SUMMARY_METRICS = ("stop_rate", "rouge_l", "chrf", "exact_match")  # the task metrics the summary shows before/after
PRICES_ENV = "GEMMA_PIPELINE_PRICES"
PRICES_VARIABLE = "gemma_pipeline_prices"
CHARTS = {"loss curve": ("finetune", artifacts.LOSS_CURVE), "perplexity": ("benchmark", artifacts.PERPLEXITY_CHART)}

# The benchmark's metrics in the order a reader expects them; lm-evaluation-harness's `task:metric` names follow,
# sorted. Labels and formats are ours; any other name is data and is shown escaped.
METRIC_LABELS = {"perplexity": "perplexity", "exact_match": "exact match", "rouge_l": "ROUGE-L", "chrf": "chrF",
                 "stop_rate": "stop rate", "answer_tokens": "mean answer tokens"}
METRIC_FORMATS = {"perplexity": ".3f", "chrf": ".2f", "stop_rate": ".1%", "answer_tokens": ".1f"}  # else .3f
# Scored per example in generations.jsonl (all higher is better), so they can rank single examples.
EXAMPLE_METRICS = ("exact_match", "rouge_l", "chrf")
FALLBACK_EXAMPLE_METRIC = "rouge_l"
EXPORT_CHECK_TITLE = "The exported champion, checked through transformers"
SIDE_BY_SIDE = 5  # eval examples whose answers the report sets side by side
MOST_CHANGED = 3  # examples shown each for "improved most" and "regressed most"
# What the report reads of each candidate's generations.jsonl: the worker holds every candidate's at once, and an
# eval split can be large, so a ranged read of the head, then at most this many examples of it.
GENERATIONS_LINES = 200
GENERATIONS_BYTES = 2 * 2**20


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
        "time_split": docs.time_split(manifest),
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
        "task_metrics": {name: {model: docs.metric(bench, model, name) for model in ("base", "tuned")}
                         for name in SUMMARY_METRICS if docs.metric(bench, "base", name)},
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
          run_started: str = "", generations: dict[str, list[dict[str, Any]]] | None = None,
          asking: bool = False) -> dict[str, Any]:
    """The report as data (report.json); `generations` maps a candidate's key to the head of its generations.jsonl
    (`generation_rows`), absent for a run that generated nothing or a champion.json older than generation."""
    generations = generations or {}
    rows = [stage_row(s, manifests.get(s), usages.get(s), prices, run_started) for s in stages.NAMES]
    where = stage_prefixes(run_prefix, champion)
    costs = [r["cost_usd"] for r in rows if r["cost_usd"] is not None]
    decision = (champion or {}).get("approval")
    return {
        "run_prefix": run_prefix,
        "complete": all(r["done"] for r in rows),
        # A person's decision (plan.approval): a rejected run converts nothing, and says so instead of failing.
        "approval": decision,
        "rejected": approval.rejected(champion),
        "awaiting_approval": asking,
        "params": params,
        "summary": summarize(manifests, documents),
        "stages": rows,
        "total_cost_usd": round(sum(costs), 4) if costs else None,
        "artifacts": {s: [f"{where[s]}/{name}" for name in key_artifacts(s, manifests[s])] for s in stages.NAMES
                      if manifests.get(s)},
        "champion": champion,
        "answers": documents.get("answers") or [],
        "prices": prices,
        "generation": (champion or {}).get("generation"),
        "metrics": metrics_summary(champion),
        "side_by_side": side_by_side(champion, generations),
        "most_changed": most_changed(champion, generations),
    }


def generation_rows(data: bytes, limit: int = GENERATIONS_LINES) -> list[dict[str, Any]]:
    """The first `limit` examples of a generations.jsonl head. A line that is not a JSON object is passed over:
    the last line of a ranged read is usually cut, and a report shows what it can rather than fail the run's page.
    Split on newlines only: `str.splitlines` would also split on U+2028 and friends inside an answer."""
    rows: list[dict[str, Any]] = []
    for raw in data.decode("utf-8", errors="replace").split("\n"):
        if len(rows) == limit:
            break
        try:
            row = json.loads(raw) if raw.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _metric_order(names: Iterable[Any]) -> list[str]:
    present = {n for n in names if isinstance(n, str)}
    known = [n for n in METRIC_LABELS if n in present]
    return known + sorted(present - set(known))


def _base_metrics(champion: dict[str, Any]) -> dict[str, Any]:
    """Every candidate's benchmark scores the same base model on the same eval split: the champion's copy, else
    the first there is."""
    rows = [docs.champion_row(champion) or {}, *champion.get("candidates", [])]
    return next((r["base_metrics"] for r in rows if r.get("base_metrics")), {})


def metrics_summary(champion: dict[str, Any] | None) -> dict[str, Any] | None:
    """Every metric of the base model and of each candidate, their differences from base and the champion's from
    each other candidate; None for a champion.json written before the benchmark reported more than perplexity."""
    if not champion:
        return None
    rows = champion.get("candidates") or []
    base = _base_metrics(champion)
    if not base and not any(r.get("metrics") or r.get("vs_base") for r in rows):
        return None
    return {
        "champion_metric": champion.get("champion_metric") or {},
        "names": _metric_order([*base, *(n for r in rows for n in r.get("metrics") or {})]),
        "difference_names": _metric_order(n for r in rows for n in r.get("vs_base") or {}),
        "base": base,
        "candidates": [{"key": r.get("key"), "champion": bool(r.get("champion")), "metrics": r.get("metrics") or {},
                        "vs_base": r.get("vs_base") or {}} for r in rows],
        "pairwise": champion.get("pairwise") or {},
    }


def _index(row: dict[str, Any]) -> int | None:
    index = row.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else None


def _position(index: int | None) -> float:
    """Where an example sorts: by its index, one without an index last."""
    return math.inf if index is None else index


def _answer(row: dict[str, Any] | None, prefix: str = "") -> dict[str, Any] | None:
    return {"answer": row.get(f"{prefix}answer"), "stopped": row.get(f"{prefix}stopped")} if row else None


def side_by_side(champion: dict[str, Any] | None, generations: dict[str, list[dict[str, Any]]],
                 count: int = SIDE_BY_SIDE) -> dict[str, Any] | None:
    """The first `count` eval examples (by index) with the base model's answer and each candidate's whose
    generations were read, matched by example index, so every column answers the same prompt."""
    rows = [r for r in (champion or {}).get("candidates", []) if isinstance(r.get("key"), str) and r["key"] in generations]
    if not rows:
        return None
    # The champion's file leads: its base answers are the ones the champion is judged against.
    lead = generations[next((r["key"] for r in rows if r.get("champion")), rows[0]["key"])]
    first = sorted((r for r in lead if _index(r) is not None), key=lambda r: _position(_index(r)))[:count]
    by_index = [{_index(g): g for g in generations[r["key"]]} for r in rows]
    return {
        "candidates": [{"key": r["key"], "champion": bool(r.get("champion"))} for r in rows],
        "examples": [{"index": _index(example), "prompt": example.get("prompt"), "reference": example.get("reference"),
                      "base": _answer(example, "base_"), "answers": [_answer(found.get(_index(example))) for found in by_index]}
                     for example in first],
    }


def _score(scores: Any, name: str) -> float | None:
    value = scores.get(name) if isinstance(scores, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _change(row: dict[str, Any], name: str) -> dict[str, Any]:
    base, tuned = _score(row.get("base_scores"), name), _score(row.get("scores"), name)
    return {"index": _index(row), "prompt": row.get("prompt"), "reference": row.get("reference"),
            "base_answer": row.get("base_answer"), "answer": row.get("answer"), "base_score": base, "score": tuned,
            "difference": tuned - base if tuned is not None and base is not None else None}


def most_changed(champion: dict[str, Any] | None, generations: dict[str, list[dict[str, Any]]],
                 top: int = MOST_CHANGED) -> dict[str, Any] | None:
    """The champion's examples that gained and lost most against the base model, by the champion metric when it
    scores single examples, else by ROUGE-L (perplexity and lm-eval tasks have no per-answer score here). Only
    the examples read (`GENERATIONS_LINES`); ties go to the lower index, so the page is stable across reruns."""
    key = (docs.champion_row(champion) or {}).get("key")
    rows = generations.get(key) if isinstance(key, str) else None
    if not rows:
        return None
    chosen = ((champion or {}).get("champion_metric") or {}).get("name")
    name = chosen if chosen in EXAMPLE_METRICS else FALLBACK_EXAMPLE_METRIC
    changes = [c for c in (_change(r, name) for r in rows) if c["difference"] is not None]
    return {"metric": name, "examples": len(rows), "improved": _largest(changes, 1, top),
            "regressed": _largest(changes, -1, top)}


def _largest(changes: list[dict[str, Any]], sign: int, top: int) -> list[dict[str, Any]]:
    """The `top` changes in the direction of `sign` (1: gains, -1: losses), largest first; an unchanged example
    is neither, so a run where nothing improved shows no "improved" example rather than a zero."""
    moved = [c for c in changes if sign * c["difference"] > 0]
    return sorted(moved, key=lambda c: (-sign * c["difference"], _position(c["index"])))[:top]


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
    for name, models in (s.get("task_metrics") or {}).items():
        lines.append(f"| {metric_label(name)} before → after (95% interval) | "
                     f"{_before_after(models['base'])} → {_before_after(models['tuned'])} |")
    parity = s.get("parity")
    if parity:
        lines.append(f"| export parity | {'passed' if parity.get('passed') else 'FAILED'} "
                     f"(max logit diff {_fmt(parity.get('logits_max_abs_diff'), '.2e')}, tolerance {_fmt(parity.get('tolerance'))}) |")
    return "\n".join(lines)


def _before_after(figure: dict[str, Any] | None) -> str:
    figure = figure or {}
    if figure.get("value") is None:
        return "n/a"
    if figure.get("ci95_low") is None:
        return _fmt(figure["value"], ".3f")
    return f"{_fmt(figure['value'], '.3f')} [{_fmt(figure['ci95_low'], '.3f')}–{_fmt(figure['ci95_high'], '.3f')}]"


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


PHASE_LABELS = {"model_load": "model load"}


def time_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, split) for every stage process of the run: the shared stages once, the per-candidate ones for each
    candidate (the champion.json rows carry them), else the champion's."""
    candidates = (report.get("champion") or {}).get("candidates") or []
    out = []
    for row in report["stages"]:
        per_candidate = [(f"{row['stage']} [{c['key']}]", c["time_split"][row["stage"]]) for c in candidates
                         if (c.get("time_split") or {}).get(row["stage"])]
        if per_candidate:  # fine-tune and benchmark: every candidate's
            out += per_candidate
        elif row.get("time_split"):  # preprocess, and convert (the champion's)
            out.append((row["stage"], row["time_split"]))
    return out


def time_table(report: dict[str, Any]) -> str | None:
    """Where each stage's wall time went (seconds per phase), its compute share and its XLA cache hits/misses."""
    rows = time_rows(report)
    if not rows:
        return None
    lines = [_row(["stage", *(PHASE_LABELS.get(p, p) for p in docs.PHASES), "compute share", "XLA cache hits / misses"]),
             _row(["---"] * (len(docs.PHASES) + 3))]
    for label, split in rows:
        seconds, cache = split["seconds"], split.get("cache")
        total = sum(v for v in seconds.values() if _number(v))
        share = seconds.get("compute", 0) / total if total else None
        lines.append(_row([markup.text(label), *(_fmt(seconds.get(p), ".1f") for p in docs.PHASES), _fmt(share, ".0%"),
                           f"{cache['hits']} / {cache['misses']}" if cache else "–"]))
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


def _candidate_name(row: dict[str, Any]) -> str:
    return f"**{markup.text(row['key'])}** (champion)" if row.get("champion") else markup.text(row["key"])


def candidates_table(champion: dict[str, Any], prices: dict[str, float] | None = None) -> str:
    lines = ["| candidate | overrides | status | eval perplexity | 95% interval | vs base | time (s) | cost (USD) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in champion["candidates"]:
        ci = r.get("ci95") or [None, None]
        name = _candidate_name(r)
        times = [t for t in (r.get("seconds") or {}).values() if t is not None]
        lines.append(f"| {name} | {markup.code(json.dumps(r['overrides'], sort_keys=True), cell=True)} | {markup.text(r['status'])} | "
                     f"{_fmt(r.get('perplexity'), '.3f')} | {_fmt(ci[0], '.3f')}–{_fmt(ci[1], '.3f')} | "
                     f"{_fmt(r.get('relative_improvement'), '.1%')} | {_fmt(sum(times) if times else None, '.0f')} | "
                     f"{_fmt(candidate_cost(r, prices), '.4f')} |")
    return "\n".join(lines)


def _pair(ci: Any) -> tuple[Any, Any]:
    return (ci[0], ci[1]) if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None)


def _interval(entry: dict[str, Any]) -> tuple[Any, Any]:
    """A figure's 95% interval: champion.json writes `ci95: [low, high]`; a bootstrap result copied as it is
    (`jobs.contract.bootstrap`) has `ci95_low`/`ci95_high`."""
    if "ci95" in entry:
        return _pair(entry["ci95"])
    return entry.get("ci95_low"), entry.get("ci95_high")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def excludes_zero(entry: dict[str, Any]) -> bool:
    """A difference whose 95% interval lies wholly on one side of 0: unlikely to be resampling noise alone. The
    bootstrap's own verdict when it gives one, else read off the interval."""
    if isinstance(entry.get("excludes_zero"), bool):
        return entry["excludes_zero"]
    low, high = _interval(entry)
    return _number(low) and _number(high) and (low > 0 or high < 0)


def metric_label(name: str, champion_metric: dict[str, Any] | None = None) -> str:
    """A metric's column title (escaped: a `task:metric` name comes from the user's task list), the champion
    metric's marked with its direction."""
    label = markup.text(METRIC_LABELS.get(name, name))
    if (champion_metric or {}).get("name") != name:
        return label
    higher = (champion_metric or {}).get("higher_is_better")
    direction = "" if higher is None else f", {'higher' if higher else 'lower'} is better"
    return f"{label} ★ (champion metric{direction})"


def metric_cell(entry: Any, name: str, signed: bool = False) -> str:
    """`value (low–high)`; the value alone when there is no interval (a task reported none), n/a when absent."""
    if entry is None:
        return "n/a"
    value, (low, high) = (entry.get("value"), _interval(entry)) if isinstance(entry, dict) else (entry, (None, None))
    spec = ("+" if signed else "") + METRIC_FORMATS.get(name, ".3f")
    interval = f" ({_fmt(low, spec)}–{_fmt(high, spec)})" if low is not None or high is not None else ""
    return _fmt(value, spec) + interval


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def metrics_table(metrics: dict[str, Any]) -> str:
    names = metrics["names"]
    lines = [_row(["model", *(metric_label(n, metrics["champion_metric"]) for n in names)]), _row(["---"] * (len(names) + 1)),
             _row(["base model (no fine-tune)", *(metric_cell(metrics["base"].get(n), n) for n in names)])]
    lines += [_row([_candidate_name(r), *(metric_cell(r["metrics"].get(n), n) for n in names)]) for r in metrics["candidates"]]
    return "\n".join(lines)


def _difference_cell(entry: Any, name: str) -> str:
    cell = metric_cell(entry, name, signed=True)
    return f"{cell} †" if isinstance(entry, dict) and excludes_zero(entry) else cell


def differences_table(metrics: dict[str, Any]) -> str:
    names = metrics["difference_names"]
    # Perplexity's difference is base − tuned (jobs/benchmark/perplexity.py), so that a drop reads as a gain: say so.
    lines = [_row(["tuned − base", *(metric_label(n, metrics["champion_metric"]) + (" (base − tuned)" if n == "perplexity" else "")
                                     for n in names)]),
             _row(["---"] * (len(names) + 1))]
    lines += [_row([_candidate_name(r), *(_difference_cell(r["vs_base"].get(n), n) for n in names)])
              for r in metrics["candidates"]]
    return "\n".join(lines)


def pairwise_table(metrics: dict[str, Any]) -> str:
    name = metrics["champion_metric"].get("name", "")
    lines = [_row(["other candidate", f"champion − other, {metric_label(name)}"]), _row(["---"] * 2)]
    lines += [_row([markup.text(key), _difference_cell(entry, name)]) for key, entry in metrics["pairwise"].items()]
    return "\n".join(lines)


def generation_line(generation: dict[str, Any] | None) -> str | None:
    """One line on how the eval answers were generated, or why they were not (raw text has no prompts to answer)."""
    if not generation:
        return None
    if "skipped" in generation:
        return f"Generation on the eval split was skipped: {markup.text(generation['skipped'])}.\n"
    return (f"Answers generated for {_fmt(generation.get('examples'))} eval examples, {_fmt(generation.get('sampling'))}, "
            f"at most {_fmt(generation.get('max_new_tokens'))} new tokens each.\n")


def metrics_section(report: dict[str, Any]) -> list[str]:
    metrics, generation = report.get("metrics"), report.get("generation")
    parts = ["## Metrics\n"] if metrics or generation else []
    if line := generation_line(generation):
        parts.append(line)
    if not metrics:
        return parts
    if metrics["names"]:
        parts.append("Each value with its 95% interval where one was computed, on the shared eval split.\n\n" + metrics_table(metrics) + "\n")
    if "stop_rate" in metrics["names"]:
        limit = (generation or {}).get("max_new_tokens")
        parts.append("Stop rate: the share of answers that ended with the model's end-of-turn within max_new_tokens"
                     f"{f' ({_fmt(limit)})' if limit is not None else ''}; the rest were cut off.\n")
    if metrics["difference_names"]:
        parts.append("### Against the base model\n\nTuned minus base on the same eval examples (perplexity: base minus "
                     "tuned, so a lower perplexity shows as +), with the paired bootstrap's 95% interval; † marks an "
                     "interval that excludes 0.\n\n" + differences_table(metrics) + "\n")
    if metrics["pairwise"] and metrics["champion_metric"].get("name"):
        parts.append("### The champion against the other candidates\n\n" + pairwise_table(metrics) + "\n")
    return parts


def _answer_cell(answer: dict[str, Any] | None) -> str:
    """An answer; one that hit max_new_tokens without the end-of-turn is marked, since it reads as cut short."""
    if answer is None:
        return "n/a"
    return _fmt(answer.get("answer")) + (" (cut off)" if answer.get("stopped") is False else "")


def side_by_side_table(table: dict[str, Any]) -> str:
    columns = ["prompt", "reference", "base model", *(_candidate_name(c) for c in table["candidates"])]
    lines = [_row(columns), _row(["---"] * len(columns))]
    lines += [_row([_fmt(e["prompt"]), _fmt(e["reference"]), _answer_cell(e["base"]), *map(_answer_cell, e["answers"])])
              for e in table["examples"]]
    return "\n".join(lines)


def changes_table(changes: list[dict[str, Any]], name: str) -> str:
    spec, label = METRIC_FORMATS.get(name, ".3f"), metric_label(name)
    lines = [_row(["prompt", "reference", "base answer", "champion answer", f"base {label}", f"champion {label}"]),
             _row(["---"] * 6)]
    lines += [_row([_fmt(c["prompt"]), _fmt(c["reference"]), _fmt(c["base_answer"]), _fmt(c["answer"]),
                    _fmt(c["base_score"], spec), _fmt(c["score"], spec)]) for c in changes]
    return "\n".join(lines)


def answers_sections(report: dict[str, Any]) -> list[str]:
    parts = []
    table = report.get("side_by_side")
    if table and table["examples"]:
        parts.append(f"## Answers side by side\n\nThe first {len(table['examples'])} eval examples, answered by the base "
                     "model and by each candidate's tuned model in the benchmark stage.\n\n" + side_by_side_table(table) + "\n")
    changed = report.get("most_changed")
    if changed:
        total = (report.get("generation") or {}).get("examples")
        of = f" of {_fmt(total)}" if _number(total) and total > changed["examples"] else ""
        parts.append(f"## Where the champion changed most\n\nAgainst the base model, by {metric_label(changed['metric'])} "
                     f"per example, among the first {changed['examples']}{of} eval examples.\n")
        for title, rows in (("Improved most", changed["improved"]), ("Regressed most", changed["regressed"])):
            parts.append(f"### {title}\n\n" + (changes_table(rows, changed["metric"]) if rows else "None.") + "\n")
    return parts


def answers_table(answers: list[dict[str, Any]]) -> str:
    lines = ["| prompt | reference | before | after |", "|---|---|---|---|"]
    for a in answers:
        lines.append(f"| {_fmt(a['prompt'])} | {_fmt(a['reference'])} | {_fmt(a['before'])} | {_fmt(a['after'])} |")
    return "\n".join(lines)


def _state(report: dict[str, Any]) -> str:
    if report.get("rejected"):
        return "REJECTED at approval: nothing was converted or served"
    if report.get("awaiting_approval"):
        return "awaiting approval: nothing is converted or served until a person decides"
    if report["complete"]:
        return "all four stages finished"
    return "INCOMPLETE: some stages did not finish"


def approval_section(report: dict[str, Any]) -> list[str]:
    if report.get("awaiting_approval"):
        return ["## Approval\n", "Awaiting a person's decision under Required Actions in the Airflow UI (or the REST "
                "API): serve the champion, serve another finished candidate, or reject.\n"]
    line = approval.summary(report.get("approval"))
    return ["## Approval\n", markup.line(line) + "\n"] if line else []


def markdown(report: dict[str, Any], charts: dict[str, str]) -> str:
    """`charts` maps a chart's title to its image reference (a relative path, or a data: URI); a reference that is
    not a `safe_link` is left out."""
    backend = {r["backend"] for r in report["stages"] if r["backend"]}
    parts = [f"# Gemma LoRA run report\n\n{markup.code(report['run_prefix'])}: {_state(report)}.\n",
             "## Results\n", summary_table(report) + "\n",
             *(["## Candidates\n", candidates_table(report["champion"], None if backend == {"local"} else report.get("prices"))
                + "\n", markup.line(report["champion"]["why"]) + ".\n"]
               if report.get("champion") else []),
             *approval_section(report), *metrics_section(report), *answers_sections(report),
             "## Stages (the champion's)\n", stage_table(report) + "\n",
             *(["## Where the time went\n\nSeconds per phase of each stage's process (compilation: JAX's tracing, lowering "
                "and compiling, or reading the persistent cache); compute share = compute / all.\n\n" + table + "\n"]
               if (table := time_table(report)) else []),
             ("Local backend: times are this machine's wall time; no cost is shown, since the profiles' hardware "
              "never ran.\n" if backend == {"local"} else
              "Cost = the profile's hourly price x the hours the stage held its hardware. Prices are a configurable "
              "table, not quotes.\n")]
    for title, ref in charts.items():
        if markup.safe_link(ref):  # percent-encoded: nothing in it can end the link's destination
            parts.append(f"## {markup.text(title.capitalize())}\n\n![{markup.text(title)}]({quote(ref, safe='/:;,=+@.-_~?#!$*%')})\n")
    if report.get("answers"):
        parts.append(f"## {EXPORT_CHECK_TITLE}\n\nGreedy answers to eval prompts from the convert stage's Hugging Face "
                     "exports, loaded through transformers the way a server loads them: the base model (before) and the "
                     "exported champion (after).\n\n" + answers_table(report["answers"]) + "\n")
    parity = report["summary"].get("parity")
    if parity:
        parts.append("## Export parity\n\n" + markup.fence(json.dumps(parity, indent=2, default=str)))
    parts.append("## Artifacts\n\n" + "\n".join(f"- {markup.line(u)}" for uris in report["artifacts"].values() for u in uris) + "\n")
    parts.append("## Parameters\n\n" + markup.fence(json.dumps(report["params"], indent=2, sort_keys=True, default=str)))
    return "\n".join(parts)
