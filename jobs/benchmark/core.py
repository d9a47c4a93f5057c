"""Benchmark core: score the base and tuned models on the same tokens, report, chart, gate."""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from jobs.benchmark import answers, metrics
from jobs.benchmark import perplexity as ppl
from jobs.common import compilation, lm, models, storage, timing
from jobs.common.manifest import StageRun, digest_json, read_manifest, stage_in_upstream, upstream_ref
from jobs.contract import artifacts, bootstrap, documents
from jobs.contract import rows as rows_lib
from jobs.contract.configs.benchmark import AUTO, METRICS, BenchmarkConfig, improvement
from jobs.contract.errors import BadInputError, QualityGateError
from jobs.finetuning import data as data_lib

log = logging.getLogger(__name__)


def resolve_mode(config: BenchmarkConfig, rows: list[dict[str, Any]]) -> str:
    text = rows_lib.kind_of(rows[0]) == rows_lib.TEXT
    if config.mode == "response" and text:
        raise BadInputError("--mode", config.mode, "text or auto for raw-text data (it has no responses)")
    return config.mode if config.mode != "auto" else "text" if text else "response"


def eval_windows(config: BenchmarkConfig, rows: list[dict[str, Any]], tokenizer) -> tuple[ppl.Windows, int]:
    if resolve_mode(config, rows) == "response":
        split = data_lib.tokenize(rows, tokenizer, config.max_length - 1)
        if split.truncated:
            log.warning("%d examples exceed --max-length %d and were truncated", split.truncated, config.max_length)
        return ppl.example_windows(split.tokens, split.lengths, split.loss_mask), len(rows)
    return text_windows(config, [rows_lib.document_of(r) for r in rows], tokenizer), len(rows)


def text_windows(config: BenchmarkConfig, docs: list[str], tokenizer) -> ppl.Windows:
    ids = [[int(t) for t in doc] for doc in tokenizer(docs)]
    sep = [int(t) for t in tokenizer(config.separator)] if config.separator else []
    tokens, owner = ppl.stream(ids, sep, tokenizer.start_token_id)
    return ppl.sliding_windows(tokens, owner, config.max_length, config.stride, tokenizer.pad_token_id)


def score(scorer: lm.NllScorer, windows: ppl.Windows, batch_size: int) -> np.ndarray:
    """NLL of every target; windows are batched by length and padded only to their length bucket (padding is
    masked, so a token's NLL does not depend on it)."""
    nll = np.zeros(windows.weights.shape, np.float32)
    limit = windows.x.shape[1]
    for rows, valid in lm.batches(len(windows.x), batch_size, windows.lengths):
        width = lm.bucket_width(int(windows.lengths[rows].max()), limit)
        out = scorer(windows.x[rows, :width], windows.lengths[rows], windows.y[rows, :width],
                     windows.weights[rows, :width] * valid[:, None])
        nll[rows[valid], :width] = out[valid]
    return nll


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    splits = sorted({s for m in report["models"].values() for s in m["splits"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(splits)
    for i, split in enumerate(splits):
        values = [report["models"][n]["splits"].get(split, {}) for n in names]
        heights = [v.get("perplexity", 0) for v in values]
        low = [v["perplexity"] - v.get("ci95_low", v["perplexity"]) if v else 0 for v in values]
        high = [v.get("ci95_high", v["perplexity"]) - v["perplexity"] if v else 0 for v in values]
        xs = np.arange(len(names)) + i * width
        bars = ax.bar(xs, heights, width, yerr=[low, high], capsize=4, label=split)
        ax.bar_label(bars, fmt="%.2f", padding=3)
    ax.set_xticks(np.arange(len(names)) + width * (len(splits) - 1) / 2, names)
    ax.set_ylabel(f"perplexity ({report['mode']} mode, 95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _adapter(config: BenchmarkConfig, inputs: list[dict[str, Any]], workdir: Path) -> tuple[str, Path]:
    """The fine-tune's adapter, which the benchmark folds into the base it already loaded: the fine-tune's merged
    model is that same sum (and a fine-tune on a quantized base is scored, as it is served, on the full-precision
    base). The base must be the fine-tune's own."""
    manifest = read_manifest(config.finetune) or {}
    settings = manifest.get("config", {})
    trained_on = (manifest.get("inputs") or [{}])[-1]
    if trained_on and trained_on != inputs[-1]:
        raise BadInputError("--base-model", config.base_model, f"the base the fine-tune trained ({settings.get('base_model', trained_on.get('uri'))})",
                            "its adapter only applies to that base")
    uri = storage.join(config.finetune, artifacts.ADAPTER)
    local = storage.stage_in(uri, workdir / "tuned", name=artifacts.ADAPTER)
    quantized = models.adapter_only(settings)
    if quantized:
        log.info("the fine-tune trained on a %s base: scoring its adapter on the full-precision base %s",
                 settings["base_quantization"], config.base_model)
    label = f"{uri} on {config.base_model}" + (f" (full precision; trained on a {settings['base_quantization']} base)" if quantized else "")
    return label, local


def _result(name: str, uri: str, model: Any, scorer: lm.NllScorer, config: BenchmarkConfig, rows: list[dict[str, Any]],
            ood_docs: list[str], chosen: list[dict[str, str]], workdir: Path) -> dict[str, Any]:
    """One model's whole evaluation: perplexity per split, answers and their task metrics, lm-eval tasks."""
    tokenizer = model.preprocessor.tokenizer
    windows, n_docs = eval_windows(config, rows, tokenizer)
    splits = {"eval": windows}
    if ood_docs:
        splits["ood"] = text_windows(config, ood_docs, tokenizer)
    result: dict[str, Any] = {"uri": uri, "splits": {}}
    for split, win in splits.items():
        nll = score(scorer, win, config.batch_size)
        sums, counts = ppl.per_document(win, nll, n_docs if split == "eval" else len(ood_docs))
        result["splits"][split] = ppl.summarize(sums, counts, config.bootstrap, config.seed)
        result["splits"][split]["tokens_sha256"] = ppl.digest(win)
        if split == "eval":  # what a paired bootstrap of the perplexity difference resamples
            result["per_document"] = {"sums": sums.tolist(), "counts": counts.tolist()}
        log.info("%s on %s: perplexity %.4f (%d tokens)", name, split, result["splits"][split]["perplexity"], int(counts.sum()))
    result["tokens_per_s"] = scorer.tokens_per_s
    if chosen:
        result["generation"] = answers.evaluate(model, config, chosen)
    if config.tasks:
        from jobs.benchmark import harness

        result["tasks"] = harness.run_tasks(model, config.tasks, workdir / f"tasks-{name}", batch_size=config.batch_size,
                                            max_length=config.max_length, limit=config.eval_task_limit or None,
                                            seed=config.seed)
    return result


def _shared_base(config: BenchmarkConfig, inputs: list[dict[str, Any]], code: dict[str, Any]) -> tuple[str, str, dict | None]:
    """Where the base model's evaluation is shared, and the evaluation when a candidate or an earlier run already
    made it: keyed by everything it depends on (eval data, base model, every option that changes it, the code)."""
    if not config.shared:
        return "", "", None
    own = {k: v for k, v in asdict(config).items() if k not in ("output", "finetune", "shared", "require_improvement", "champion_metric")}
    key = digest_json({"data": inputs[0], "model": inputs[-1], "config": own, "code": code})[:24]
    uri = storage.join(config.shared, artifacts.base_evaluation(key))
    if not storage.exists(uri):
        return uri, key, None
    doc = documents.BASE_EVALUATION.load(storage.read_bytes(uri), uri)
    if doc["key"] != key:
        return uri, key, None
    log.info("base model: reusing its evaluation from %s (same data, model, options and code)", uri)
    return uri, key, doc["result"]


def _save_shared(uri: str, key: str, result: dict[str, Any]) -> None:
    try:  # create-only: a candidate that finished first wrote the same evaluation
        storage.write_bytes(uri, documents.BASE_EVALUATION.dump({"key": key, "result": result}), "application/json",
                            if_generation_match=0)
    except storage.Conflict:
        log.info("base model: %s was written by another candidate meanwhile", uri)


def compare(report: dict[str, Any], config: BenchmarkConfig) -> dict[str, Any]:
    """Tuned minus base for every metric both have, each with a paired 95% bootstrap interval (perplexity: base minus
    tuned resampling documents, so a positive difference is an improvement as for the others)."""
    base, tuned = report["models"]["base"], report["models"]["tuned"]
    out: dict[str, Any] = {}
    bgen, tgen = base.get("generation"), tuned.get("generation")
    if bgen and tgen:
        for name in metrics.GENERATION:
            out[name] = bootstrap.paired(tgen["per_example"][name], bgen["per_example"][name], config.bootstrap, config.seed)
    if "per_document" in base and "per_document" in tuned:
        out["perplexity"] = ppl.paired_difference(base["per_document"], tuned["per_document"], config.bootstrap, config.seed)
    for task, figures in (tuned.get("tasks") or {}).items():
        for metric, figure in figures.items():
            before = ((base.get("tasks") or {}).get(task) or {}).get(metric)
            if before and figure.get("value") is not None and before.get("value") is not None:
                out[f"{task}:{metric}"] = {"value": figure["value"] - before["value"], "ci95_low": None,
                                           "ci95_high": None, "excludes_zero": None}
    return out


def champion_metric(config: BenchmarkConfig, report: dict[str, Any]) -> dict[str, Any]:
    """The metric that chooses and gates: `auto` is ROUGE-L when answers were generated, else perplexity. A
    `task:metric` must be one the tasks produced (exit 2 naming what exists)."""
    name = config.champion_metric
    if name == AUTO:
        name = "rouge_l" if "generation" in report["models"]["base"] else "perplexity"
    if name in METRICS:
        if name != "perplexity" and "generation" not in report["models"]["base"]:
            raise BadInputError("--champion-metric", name, f"perplexity or a task:metric: {report['generation']['skipped']}")
        return {"name": name, "higher_is_better": METRICS[name]}
    task, _, metric = name.partition(":")
    tasks = report["models"]["base"].get("tasks") or {}
    if metric not in (tasks.get(task) or {}):
        produced = [f"{t}:{m}" for t, figures in tasks.items() for m in figures]
        raise BadInputError("--champion-metric", name, f"one of the task metrics produced: {', '.join(produced) or 'none'}")
    return {"name": name, "higher_is_better": bool(tasks[task][metric].get("higher_is_better", True))}


def run(config: BenchmarkConfig, workdir: Path) -> dict[str, Any]:
    inputs = [upstream_ref(config.data, "--data")]
    if config.finetune:
        inputs.append(upstream_ref(config.finetune, "--finetune"))
    base_handle = models.resolve(config.base_model, workdir)
    inputs.append(models.model_ref(config.base_model, base_handle))
    stage = StageRun("benchmark", config.output, asdict(config), inputs)
    if (out := stage.start(workdir)) is None:
        return stage.manifest

    xla_cache = compilation.enable_cache(workdir)  # the tuned model, and later candidates, reuse what the base compiled
    timing.begin("compute")
    data_dir = stage_in_upstream(config.data, inputs[0], workdir / "data", name="data")
    rows = data_lib.read_split(data_dir, artifacts.EVAL, "--data")
    if config.max_examples:
        rows = rows[: config.max_examples]
    if not rows:
        raise BadInputError("--data", config.data, "a preprocessing output with a non-empty eval split (--eval-fraction > 0)")
    ood_docs: list[str] = []
    if config.ood_text:
        text = storage.stage_in(config.ood_text, workdir / "ood").read_text(encoding="utf-8")
        ood_docs = [d for d in text.split("\n\n") if d.strip()]

    mode = resolve_mode(config, rows)
    why_not = answers.skipped(config, mode)
    if why_not and config.champion_metric in METRICS and config.champion_metric != "perplexity":
        raise BadInputError("--champion-metric", config.champion_metric, f"perplexity or a task:metric: {why_not}")
    chosen = [] if why_not else answers.items(config, rows)
    report: dict[str, Any] = {"mode": mode, "max_length": config.max_length, "stride": config.stride,
                              "separator": config.separator, "models": {},
                              "generation": {"skipped": why_not} if why_not else answers.settings(config, len(chosen)),
                              "eval_tasks": list(config.tasks)}
    shared_uri, shared_key, base = _shared_base(config, inputs, stage.code)
    report["base_evaluation"] = {"uri": shared_uri or None, "reused": base is not None}
    tuned = _adapter(config, inputs, workdir) if config.finetune else None  # a wrong base fails before any loading
    # One model in memory: the base, then (the adapter folded in) the tuned model, through the same compiled functions.
    model = models.load_causal_lm(config.base_model, workdir) if base is None or config.finetune else None
    scorer = lm.NllScorer(model) if model is not None else None
    if base is None:
        base = _result("base", config.base_model, model, scorer, config, rows, ood_docs, chosen, workdir)
        if shared_uri:
            _save_shared(shared_uri, shared_key, base)
    report["models"]["base"] = base
    report["champion_metric"] = champion_metric(config, report)  # a metric the tasks lack fails before the tuned model
    if tuned is not None:
        uri, adapter = tuned
        log.info("tuned model: %d kernels of the base updated from %s", models.merge_adapter(model, adapter, uri=uri), uri)
        scorer.refresh()
        report["models"]["tuned"] = _result("tuned", uri, model, scorer, config, rows, ood_docs, chosen, workdir)
    del model, scorer
    gc.collect()
    xla_cache.save()
    return _finish(config, stage, report, chosen, out)


def _finish(config: BenchmarkConfig, stage: StageRun, report: dict[str, Any], chosen: list[dict[str, str]], out: Path) -> dict[str, Any]:
    models_ = report["models"]
    metrics_: dict[str, Any] = {f"{name}_{split}_perplexity": r["splits"][split]["perplexity"]
                                for name, r in models_.items() for split in r["splits"]}
    chosen_metric = report["champion_metric"]
    if "tuned" in models_:
        base, tuned = metrics_["base_eval_perplexity"], metrics_["tuned_eval_perplexity"]
        report["relative_improvement"] = metrics_["relative_improvement"] = (base - tuned) / base
        report["differences"] = compare(report, config)
        before = documents.metric(report, "base", chosen_metric["name"]).get("value")
        after = documents.metric(report, "tuned", chosen_metric["name"]).get("value")
        report["improvement"] = {"metric": chosen_metric["name"], "base": before, "tuned": after,
                                 "relative": improvement(before, after, chosen_metric["higher_is_better"])}
        for name in ("exact_match", "rouge_l", "chrf", "stop_rate"):
            for model in ("base", "tuned"):
                value = documents.metric(report, model, name).get("value")
                if value is not None:
                    metrics_[f"{model}_{name}"] = value
    else:
        report["relative_improvement"] = None
    gate = report.get("improvement", {}).get("relative")
    gate_failed = bool(config.require_improvement) and (gate is None or gate < config.require_improvement)
    report["quality_gate"] = {"required": config.require_improvement, "metric": chosen_metric["name"], "passed": not gate_failed}
    (out / artifacts.BENCHMARK_REPORT).write_bytes(documents.BENCHMARK.dump(report))
    if chosen:
        tuned_gen = models_.get("tuned", {}).get("generation")
        with (out / artifacts.GENERATIONS).open("w", encoding="utf-8") as handle:
            for line in answers.lines(chosen, tuned_gen, models_["base"]["generation"]):
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    chart(report, out / artifacts.PERPLEXITY_CHART)
    if gate_failed:
        storage.publish_dir(out, config.output)  # the report explains the failure; no manifest: not complete
        imp = report["improvement"]
        raise QualityGateError(
            f"--require-improvement: tuned {imp['metric']} {imp['tuned']:.4f} vs base {imp['base']:.4f} is a "
            f"{imp['relative']:.2%} improvement; expected at least {config.require_improvement:.2%}"
        )
    return stage.finish(out, metrics_)
