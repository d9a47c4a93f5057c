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

from jobs import families
from jobs.contract import bootstrap

# name -> higher is better. Perplexity is lower-is-better; a `task:metric` takes its direction from lm-eval.
GENERATION = {"exact_match": True, "rouge_l": True, "chrf": True, "stop_rate": True, "answer_tokens": None}
SCORED = ("exact_match", "rouge_l", "chrf")  # computed against the reference; stop rate and length are not


def reference_text(reference: str) -> str:
    """The reference answer as a model's answer would read: without the end-of-turn marker it was trained on
    (any family's: the rows carry the marker of the family they were preprocessed for)."""
    text = reference.strip()
    for marker in families.end_of_turn_markers():
        if text.endswith(marker):
            return text[: -len(marker)].rstrip()
    return text


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


def summarize(per_example: dict[str, np.ndarray], resamples: int, seed: int) -> dict[str, dict[str, Any]]:
    return {name: bootstrap.interval(values.tolist(), resamples, seed) for name, values in per_example.items()}

