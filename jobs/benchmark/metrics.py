"""Task metrics of generated answers against the eval split's references, and their bootstrap intervals.

Scorers are maintained packages: exact match is lm-evaluation-harness's copy of Hugging Face `evaluate`'s
(whitespace stripped), ROUGE-L is Google's `rouge-score` (F-measure, its default tokenizer, stemming on),
chrF is `sacrebleu`'s sentence chrF (0-100). Every metric is a mean over examples, so a 95% interval resamples
examples; a difference between two models is a *paired* bootstrap (the same resampled examples for both),
which is what tells a real improvement from noise on a small eval split.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jobs.contract import rows as rows_lib

# name -> higher is better. Perplexity is lower-is-better; a `task:metric` takes its direction from lm-eval.
GENERATION = {"exact_match": True, "rouge_l": True, "chrf": True, "stop_rate": True, "answer_tokens": None}
SCORED = ("exact_match", "rouge_l", "chrf")  # computed against the reference; stop rate and length are not


def reference_text(reference: str) -> str:
    """The reference answer as a model's answer would read: without the end-of-turn marker it was trained on."""
    text = reference.strip()
    return text[: -len(rows_lib.END_OF_TURN)].rstrip() if text.endswith(rows_lib.END_OF_TURN) else text


def score(answers: list[str], references: list[str]) -> dict[str, np.ndarray]:
    """Per-example scores, each an array in the answers' order."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    refs = [reference_text(r) for r in references]
    hyps = [a.strip() for a in answers]
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    chrf = CHRF()
    return {
        "exact_match": np.asarray([exact_match_hf_evaluate([h], [r])["exact_match"] for h, r in zip(hyps, refs)], np.float64),
        "rouge_l": np.asarray([rouge.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)], np.float64),
        "chrf": np.asarray([chrf.sentence_score(h, [r]).score for h, r in zip(hyps, refs)], np.float64),
    }


def _picks(n: int, bootstrap: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(bootstrap, n))


def interval(values: np.ndarray, bootstrap: int, seed: int) -> dict[str, Any]:
    """The mean and its 95% bootstrap interval (None without resamples or examples)."""
    values = np.asarray(values, np.float64)
    if not len(values):
        return {"value": None, "ci95_low": None, "ci95_high": None}
    out: dict[str, Any] = {"value": float(values.mean()), "ci95_low": None, "ci95_high": None}
    if bootstrap:
        means = values[_picks(len(values), bootstrap, seed)].mean(1)
        out["ci95_low"], out["ci95_high"] = (float(v) for v in np.percentile(means, [2.5, 97.5]))
    return out


def paired(a: np.ndarray, b: np.ndarray, bootstrap: int, seed: int) -> dict[str, Any]:
    """mean(a) - mean(b) over the same examples, with a paired 95% bootstrap interval; `excludes_zero` says the
    difference is unlikely to be resampling noise."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap: {a.shape} vs {b.shape} examples; both must score the same examples")
    out = interval(a - b, bootstrap, seed)
    low, high = out["ci95_low"], out["ci95_high"]
    out["excludes_zero"] = None if low is None else bool(low > 0 or high < 0)
    return out


def summarize(per_example: dict[str, np.ndarray], bootstrap: int, seed: int) -> dict[str, dict[str, Any]]:
    return {name: interval(values, bootstrap, seed) for name, values in per_example.items()}


def improvement(base: float, tuned: float, higher_is_better: bool) -> float:
    """The tuned model's relative improvement in the metric's good direction: what `--require-improvement` gates.
    From a base of 0 any gain is unbounded (inf) and no change is 0."""
    gain = (tuned - base) if higher_is_better else (base - tuned)
    if base == 0:
        return 0.0 if gain == 0 else float("inf") if gain > 0 else float("-inf")
    return gain / abs(base)
