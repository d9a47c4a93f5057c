"""Generated answers to the eval split's prompts, scored against its references: one model at a time.

Chat rows are prompted with everything before their last assistant turn and scored on that turn (the row's
`prompt` and `response`); raw text has no answer to compare against, so its runs skip generation and say why."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from jobs.benchmark import generation, metrics
from jobs.common import models
from jobs.contract import rows as rows_lib
from jobs.contract.configs.benchmark import BenchmarkConfig

log = logging.getLogger(__name__)
TEXT_SKIP = ("text mode (raw-text data, or --mode text) has no reference answers to compare generated ones with: "
             "perplexity only")
OFF_SKIP = "--max-new-tokens 0: generation metrics are off"


def skipped(config: BenchmarkConfig, mode: str) -> str | None:
    """Why this run computes no generation metrics, or None when it does."""
    if mode == "text":
        return TEXT_SKIP
    return OFF_SKIP if not config.max_new_tokens else None


def items(config: BenchmarkConfig, rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The prompts and references generation answers: the first `--generation-examples` scored rows."""
    chosen = rows[: config.generation_examples] if config.generation_examples else rows
    return [{"prompt": r["prompt"], "reference": r["response"]} for r in chosen if rows_lib.kind_of(r) != rows_lib.TEXT]


def settings(config: BenchmarkConfig, count: int) -> dict[str, Any]:
    sampling = "greedy" if config.temperature == 0 else f"top-p {config.top_p} at temperature {config.temperature}, seed {config.seed}"
    return {"max_new_tokens": config.max_new_tokens, "examples": count, "sampling": sampling,
            "batch_size": config.generation_batch_size}


def evaluate(model, config: BenchmarkConfig, chosen: list[dict[str, str]]) -> dict[str, Any]:
    """One model's answers, per-example scores, and each metric's mean with its 95% interval."""
    tokenizer = model.preprocessor.tokenizer
    stops = (int(tokenizer.end_token_id), models.end_of_turn_id(tokenizer))
    generation.configure(model, config.temperature, config.top_p, config.seed)
    prompts = generation.prompt_ids(tokenizer, [c["prompt"] for c in chosen], max(8, config.max_length - 1))
    out = generation.generate(model, prompts, config.max_new_tokens, stops, config.generation_batch_size,
                              int(tokenizer.pad_token_id))
    answers = [str(tokenizer.detokenize(ids)) if ids else "" for ids in out.tokens]
    per_example: dict[str, np.ndarray] = metrics.score(answers, [c["reference"] for c in chosen])
    per_example["stop_rate"] = np.asarray(out.stopped, np.float64)
    per_example["answer_tokens"] = np.asarray([len(t) for t in out.tokens], np.float64)
    log.info("generated %d answers (%d tokens) in %.1f s, %.1f tokens/s; stop rate %.3f, ROUGE-L %.4f",
             len(answers), out.steps, out.seconds, out.tokens_per_s, per_example["stop_rate"].mean(),
             per_example["rouge_l"].mean())
    return {"metrics": metrics.summarize(per_example, config.bootstrap, config.seed),
            "per_example": {k: [round(float(v), 6) for v in a] for k, a in per_example.items()},
            "answers": answers, "tokens_per_s": out.tokens_per_s, "seconds": out.seconds}


def lines(chosen: list[dict[str, str]], tuned: dict[str, Any] | None, base: dict[str, Any]) -> list[dict[str, Any]]:
    """`generations.jsonl`: every example with the tuned model's answer and the base's, and their scores."""
    main = tuned or base
    out = []
    for i, item in enumerate(chosen):
        line: dict[str, Any] = {"index": i, "prompt": item["prompt"], "reference": metrics.reference_text(item["reference"]),
                                **_one(main, i, "")}
        if tuned:
            line |= _one(base, i, "base_")
        out.append(line)
    return out


def _one(result: dict[str, Any], i: int, prefix: str) -> dict[str, Any]:
    per = result["per_example"]
    return {f"{prefix}answer": result["answers"][i], f"{prefix}stopped": bool(per["stop_rate"][i]),
            f"{prefix}answer_tokens": int(per["answer_tokens"][i]),
            f"{prefix}scores": {k: per[k][i] for k in metrics.SCORED}}
