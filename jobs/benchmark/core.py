"""Benchmark core: score the base and tuned models on the same tokens, report, chart, gate."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from jobs.benchmark import perplexity as ppl
from jobs.common import lm, models, storage
from jobs.common.manifest import StageRun, read_manifest, stage_in_upstream, upstream_ref
from jobs.contract import artifacts, documents
from jobs.contract import rows as rows_lib
from jobs.contract.configs.benchmark import BenchmarkConfig
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


def _tuned(config: BenchmarkConfig, workdir: Path) -> tuple[str, Callable[[], Any]]:
    """The tuned model: the fine-tune's merged preset, or, when it trained on a quantized base (its product is the
    adapter), the adapter applied to the full-precision base (the report's uri says which)."""
    settings = (read_manifest(config.finetune) or {}).get("config", {})
    if not models.adapter_only(settings):
        local = str(storage.stage_in(storage.join(config.finetune, artifacts.MERGED_MODEL), workdir / "tuned", name=artifacts.MERGED_MODEL))
        return storage.join(config.finetune, artifacts.MERGED_MODEL), lambda: models.load_causal_lm(local, workdir, field="--finetune")
    adapter = storage.join(config.finetune, artifacts.ADAPTER)
    log.info("the fine-tune trained on a %s base: scoring its adapter on the full-precision base %s",
             settings["base_quantization"], config.base_model)
    return (f"{adapter} on {config.base_model} (full precision; trained on a {settings['base_quantization']} base)",
            lambda: models.load_with_adapter(config.base_model, adapter, settings["lora_rank"],
                                             list(settings["lora_targets"]), workdir, field="--finetune"))


def run(config: BenchmarkConfig, workdir: Path) -> dict[str, Any]:
    inputs = [upstream_ref(config.data, "--data")]
    if config.finetune:
        inputs.append(upstream_ref(config.finetune, "--finetune"))
    base_handle = models.resolve(config.base_model, workdir)
    inputs.append(models.model_ref(config.base_model, base_handle))
    stage = StageRun("benchmark", config.output, asdict(config), inputs)
    if (out := stage.start(workdir)) is None:
        return stage.manifest

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

    candidates: dict[str, tuple[str, Callable[[], Any]]] = {
        "base": (config.base_model, lambda: models.load_causal_lm(config.base_model, workdir))}
    if config.finetune:
        candidates["tuned"] = _tuned(config, workdir)

    report: dict[str, Any] = {"mode": resolve_mode(config, rows), "max_length": config.max_length, "stride": config.stride,
                              "separator": config.separator, "models": {}}
    for name, (uri, load) in candidates.items():
        model = load()
        tokenizer = model.preprocessor.tokenizer
        scorer = lm.NllScorer(model)
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
            log.info("%s on %s: perplexity %.4f (%d tokens)", name, split, result["splits"][split]["perplexity"], int(counts.sum()))
        result["tokens_per_s"] = scorer.tokens_per_s
        report["models"][name] = result
        del model, scorer
        gc.collect()

    metrics: dict[str, Any] = {f"{name}_{split}_perplexity": r["splits"][split]["perplexity"]
                               for name, r in report["models"].items() for split in r["splits"]}
    if "tuned" in report["models"]:
        base, tuned = metrics["base_eval_perplexity"], metrics["tuned_eval_perplexity"]
        report["relative_improvement"] = metrics["relative_improvement"] = (base - tuned) / base
    gate_failed = bool(config.require_improvement) and report["relative_improvement"] < config.require_improvement
    report["quality_gate"] = {"required": config.require_improvement, "passed": not gate_failed}
    (out / artifacts.BENCHMARK_REPORT).write_bytes(documents.BENCHMARK.dump(report))
    chart(report, out / artifacts.PERPLEXITY_CHART)
    if gate_failed:
        storage.publish_dir(out, config.output)  # the report explains the failure; no manifest: not complete
        raise QualityGateError(
            f"--require-improvement: tuned eval perplexity {metrics['tuned_eval_perplexity']:.4f} is "
            f"{report['relative_improvement']:.2%} lower than base {metrics['base_eval_perplexity']:.4f}; "
            f"expected at least {config.require_improvement:.2%}"
        )
    return stage.finish(out, metrics)
