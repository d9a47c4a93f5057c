"""Candidate fine-tunes and their champion.

A run trains one adapter per candidate (a set of overrides of the fine-tune's Params), scores every candidate
on the same eval tokens and prompts, and picks the best by the `champion_metric` Param. Preprocessing is shared: no candidate
field changes the split, so every candidate is scored on identical rows and none trains on another's eval rows
(a candidate's data size is `max_train_examples`, a cut of the shared train split, never a new split).

Layout: `runs/RUN/preprocess/`, `runs/RUN/candidates/<key>/{finetune,benchmark,convert}/`, and
`runs/RUN/champion.json`. The key is stable in the overrides, so a rerun skips finished candidates and an added
candidate runs alone. Pure functions; the DAG's `plan` and `select` tasks call them.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from gemma_pipeline.plan import eval_tasks, fit, jobspec, profiles
from jobs.contract import artifacts, bootstrap, documents, stages
from jobs.contract.configs.benchmark import AUTO, METRICS, check_champion_metric, improvement
from jobs.contract.errors import BadInputError
from jobs.contract.layout import DEFAULT_CANDIDATE, RunLayout

# What a candidate may override: fine-tune Params only (see the module docstring for why not preprocessing's).
FIELDS = ("lora_rank", "learning_rate", "max_steps", "epochs", "batch_size", "max_train_examples", "seed",
          "base_quantization", "model_parallel", "finetune_profile")
MAX_CANDIDATES = 16


def field_schemas() -> dict[str, dict[str, Any]]:
    options = jobspec.param_options()
    schemas = {name: options[name].json_schema() for name in FIELDS if name in options}
    schemas["finetune_profile"] = {"enum": profiles.names_for("finetune"), "description": "accelerator profile of the fine-tune Job"}
    return schemas


def schema() -> dict[str, Any]:
    """The `candidates` Param's JSON schema: the trigger form refuses a bad list before anything runs."""
    return {
        "type": "array", "minItems": 1, "maxItems": MAX_CANDIDATES,
        "items": {"type": "object", "properties": field_schemas(), "additionalProperties": False},
        "description": "candidate fine-tunes, each a JSON object overriding any of " + ", ".join(FIELDS)
                       + "; [{}] is one candidate with the params above. The best by champion_metric wins.",
    }


def validate(candidates: Any) -> list[dict[str, Any]]:
    """The candidate list, checked field by field; a ValueError names the candidate, the field, the value and
    what was expected."""
    import jsonschema

    if isinstance(candidates, str):  # a conf from the CLI may carry the list as JSON text
        try:
            candidates = json.loads(candidates)
        except json.JSONDecodeError as err:
            raise ValueError(f"candidates: got {candidates!r}; expected a JSON list of objects ({err})") from err
    if not isinstance(candidates, list) or not 1 <= len(candidates) <= MAX_CANDIDATES:
        raise ValueError(f"candidates: got {candidates!r}; expected a list of 1 to {MAX_CANDIDATES} objects")
    schemas, options = field_schemas(), jobspec.param_options()
    seen: dict[str, int] = {}
    for index, candidate in enumerate(candidates):
        where = f"candidates[{index}]"
        if not isinstance(candidate, dict):
            raise ValueError(f"{where}: got {candidate!r}; expected an object of overrides")
        for field, value in candidate.items():
            if field not in schemas:
                close = difflib.get_close_matches(field, FIELDS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{where}.{field}: not a field a candidate can override{hint}; expected one of {', '.join(FIELDS)}")
            errors = list(jsonschema.Draft7Validator(schemas[field]).iter_errors(value))
            if errors:
                expected = options[field].expected() if field in options else f"one of {', '.join(schemas[field]['enum'])}"
                raise ValueError(f"{where}.{field}: got {value!r}; expected {expected}")
        key = candidate_key(candidate)
        if key in seen:
            raise ValueError(f"{where}: the same overrides as candidates[{seen[key]}]; each candidate must differ")
        seen[key] = index
    return candidates


def candidate_key(overrides: dict[str, Any]) -> str:
    """A folder name that is the same for the same overrides whatever their order: readable, plus a hash."""
    if not overrides:
        return DEFAULT_CANDIDATE
    canonical = json.dumps(overrides, sort_keys=True, separators=(",", ":"))
    readable = re.sub(r"[^a-z0-9]+", "-", "-".join(f"{k}-{v}" for k, v in sorted(overrides.items())).lower()).strip("-")
    return f"{readable[:40].rstrip('-')}-{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"


def check_evaluation(params: dict[str, Any], read: eval_tasks.Reader) -> dict[str, tuple[str, ...]]:
    """Before any Job runs: every `eval_tasks` entry is an lm-eval task or a task file that parses, and
    `champion_metric` is one the benchmark computes (a `task:metric`: a task of `eval_tasks` that reports that
    metric). A ValueError names the param, the value and what exists. Returns each task's metrics."""
    tasks = eval_tasks.parse(params.get("eval_tasks"))
    metric = params.get("champion_metric") or AUTO
    try:
        check_champion_metric(metric, tasks)
    except BadInputError as err:
        raise ValueError(f"champion_metric: got {metric!r}; expected {err.expected}") from None
    if metric in METRICS and metric != "perplexity" and not int(params.get("max_new_tokens", 1) or 0):
        raise ValueError(f"champion_metric: got {metric!r}; expected perplexity or a task:metric, since max_new_tokens "
                         "is 0 (no answers are generated)")
    produced = eval_tasks.metrics_of(tasks, read)
    eval_tasks.check_metric(metric, produced)
    return produced


def plan(params: dict[str, Any], run_key: str, read: eval_tasks.Reader | None = None) -> dict[str, Any]:
    """Every stage's Job of the run, rendered once from the Params: the shared preprocessing (as a Job, and as the
    Dataflow launch's template parameters), then one entry per candidate with its key, overrides, prefixes and the
    fine-tune, benchmark and convert Jobs' arguments, profile and labels (what the mapped tasks submit)."""
    check_evaluation(params, read or _read_local)
    layout = RunLayout.of(params["bucket"], run_key)
    run_labels = {jobspec.RUN_LABEL: run_key}
    shared = layout.stages()
    preprocess = stage_job("preprocess", params, shared, params["preprocess_profile"], run_labels)
    entries = []
    for index, overrides in enumerate(validate(params.get("candidates", [{}]))):
        key = candidate_key(overrides)
        prefixes = layout.stages(key)
        # The quality gate judges the champion (in select), not every candidate.
        values = {**params, **overrides, "require_improvement": 0.0}
        profile = {"finetune": overrides.get("finetune_profile", params["finetune_profile"]),
                   "benchmark": params["benchmark_profile"], "convert": params["convert_profile"]}
        profiles.check_model_parallel(profiles.get(profile["finetune"]), int(values.get("model_parallel", 1)))
        fit.check(values, profile["finetune"])
        labels = {**run_labels, jobspec.CANDIDATE_LABEL: key[:63].rstrip("-")}
        entries.append({"index": index, "key": key, "overrides": overrides, "run_prefix": layout.prefix, "prefixes": prefixes,
                        **{stage: stage_job(stage, values, prefixes, profile[stage], labels) for stage in stages.CANDIDATE_STAGES}})
    return {"run_key": run_key, "run_prefix": layout.prefix, "preprocess": preprocess,
            "dataflow": {"job_name": f"gemma-preprocess-{run_key}", "run_key": run_key,
                         "parameters": jobspec.template_parameters(preprocess["arguments"])},
            "candidates": entries}


def _read_local(uri: str) -> bytes:
    if "://" in uri:
        raise ValueError(f"{uri}: only local task files can be read here (the plan task reads gs:// ones)")
    return Path(uri).read_bytes()


def stage_job(stage: str, values: dict[str, Any], prefixes: dict[str, str], profile: str,
              labels: dict[str, str]) -> dict[str, Any]:
    """One stage's Job as the task submits it: arguments, profile, where its progress appears, and its labels
    (Kueue's queue and priority class, the run's and the candidate's)."""
    return {"arguments": jobspec.stage_args(stage, values, prefixes), "profile_name": profile,
            "progress_uri": f"{prefixes[stage]}/{artifacts.PROGRESS}",
            "labels": {**jobspec.job_labels(stage, values["queue"], values["priority_class"]), **labels}}


def _figures(report: dict[str, Any], model: str) -> dict[str, dict[str, Any]]:
    """Every metric a benchmark report has for one model, as {name: {"value", "ci95": [low, high]}}."""
    out = {}
    for name in documents.metric_names(report, model):
        figure = documents.metric(report, model, name)
        if figure.get("value") is not None:
            out[name] = {"value": figure["value"], "ci95": [figure.get("ci95_low"), figure.get("ci95_high")]}
    return out


def _per_example(report: dict[str, Any], name: str) -> list[float] | None:
    return (((report.get("models") or {}).get("tuned", {}).get("generation") or {}).get("per_example") or {}).get(name)


def choose_metric(requested: str, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The champion metric and its direction. `auto` takes what the benchmarks resolved it to (ROUGE-L when answers
    were generated, else perplexity); a named one must be in every finished candidate's report."""
    name = requested or AUTO
    if name == AUTO:
        name = next((r["champion_metric"]["name"] for r in reports if r.get("champion_metric")), "perplexity")
    for report in reports:
        chosen = report.get("champion_metric") or {}
        if chosen.get("name") == name:
            return {"name": name, "higher_is_better": bool(chosen["higher_is_better"])}
    if name in METRICS:
        return {"name": name, "higher_is_better": METRICS[name]}
    task, _, metric = name.partition(":")
    figure = ((reports[0].get("models") or {}).get("tuned", {}).get("tasks") or {}).get(task, {}).get(metric) if reports else None
    return {"name": name, "higher_is_better": bool((figure or {}).get("higher_is_better", True))}


def select(entries: list[dict[str, Any]], reports: dict[str, dict | None], require_improvement: float,
           champion_metric: str = AUTO, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The champion: the best value of the champion metric among candidates whose benchmark finished, all scored on
    the same eval tokens and the same generated prompts (else nothing is comparable and this raises). Says which
    candidates the champion cannot be told apart from (overlapping 95% intervals of that metric), the paired
    bootstrap difference from each other candidate where per-example scores exist, and whether the champion's
    improvement over the base in that metric passes the quality gate."""
    rows = []
    for entry in entries:
        report = reports.get(entry["key"])
        row: dict[str, Any] = {"key": entry["key"], "overrides": entry["overrides"], "prefixes": entry["prefixes"],
                               "status": "finished" if report else "missing",
                               "lineage": {s: f"{entry['prefixes'][s]}/{artifacts.MANIFEST}" for s in ("preprocess", "finetune", "benchmark")}}
        if report:
            tuned, base = documents.eval_split(report, "tuned"), documents.eval_split(report, "base")
            row |= {"perplexity": tuned["perplexity"], "ci95": [tuned.get("ci95_low"), tuned.get("ci95_high")],
                    "base_perplexity": base["perplexity"], "relative_improvement": report.get("relative_improvement"),
                    "tokens": tuned["tokens"], "tokens_sha256": tuned.get("tokens_sha256"),
                    "metrics": _figures(report, "tuned"), "base_metrics": _figures(report, "base"),
                    "vs_base": {name: {"value": d["value"], "ci95": [d.get("ci95_low"), d.get("ci95_high")],
                                       "excludes_zero": d.get("excludes_zero")}
                                for name, d in (report.get("differences") or {}).items()}}
        rows.append(row)
    finished = [r for r in rows if r["status"] == "finished"]
    if not finished:
        raise ValueError("no candidate's benchmark finished; nothing to choose from")
    digests = {r["tokens_sha256"] for r in finished}
    if len(digests) != 1:
        raise ValueError(f"the candidates were scored on different eval tokens ({len(digests)} digests); perplexities do not compare")
    finished_reports = [reports[r["key"]] for r in finished]
    settings = {json.dumps(r.get("generation"), sort_keys=True) for r in finished_reports}
    if len(settings) != 1:
        raise ValueError(f"the candidates' answers were generated with different settings ({', '.join(sorted(settings))}); "
                         "their task metrics do not compare")
    metric = choose_metric(champion_metric, finished_reports)
    name, sign = metric["name"], 1 if metric["higher_is_better"] else -1
    lacking = [r["key"] for r in finished if name not in r["metrics"]]
    if lacking:
        raise ValueError(f"champion_metric: {name!r} is not in the benchmark of {', '.join(lacking)}; "
                         f"expected one of {', '.join(finished[0]['metrics'])}")
    champion = min(finished, key=lambda r: (-sign * r["metrics"][name]["value"], r["perplexity"], r["key"]))
    figure = champion["metrics"][name]
    ties = [r["key"] for r in finished if r is not champion and bootstrap.overlaps(figure["ci95"], r["metrics"][name]["ci95"])]
    pairwise = {}
    mine = _per_example(reports[champion["key"]], name)
    for r in finished:
        theirs = _per_example(reports[r["key"]], name)
        if r is not champion and mine is not None and theirs is not None:
            pairwise[r["key"]] = bootstrap.paired(mine, theirs, resamples, seed)
    best = "highest" if metric["higher_is_better"] else "lowest"
    why = (f"{best} eval {name} {figure['value']:.4f} of {len(finished)} finished candidate(s) on identical eval "
           f"{'tokens' if name == 'perplexity' else 'examples'}")
    if ties:
        why += f"; its 95% interval overlaps {', '.join(ties)}: the difference may be noise, not a better model"
    base_value = champion["base_metrics"].get(name, {}).get("value")
    gain = improvement(base_value, figure["value"], metric["higher_is_better"]) if base_value is not None else None
    gate_passed = not require_improvement or (gain is not None and gain >= require_improvement)
    for row in rows:
        row["champion"] = row is champion
    return {"champion": champion["key"], "index": next(e["index"] for e in entries if e["key"] == champion["key"]),
            "why": why, "overlapping": ties, "eval_tokens_sha256": digests.pop(), "champion_metric": metric,
            "pairwise": pairwise, "generation": finished_reports[0].get("generation") or {},
            "quality_gate": {"required": require_improvement, "metric": name, "relative_improvement": gain,
                             "passed": gate_passed},
            "candidates": rows}

