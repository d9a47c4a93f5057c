"""The benchmark's generation outputs as the run report reads them (one schema for the report's tests): a line of
`generations.jsonl` and a metric of `champion.json`."""

from __future__ import annotations

from typing import Any


def metric(value: Any, low: Any = None, high: Any = None) -> dict[str, Any]:
    """A champion.json metric entry: the value and its 95% interval ([None, None]: no interval)."""
    return {"value": value, "ci95": [low, high]}


def generation_row(index: int, tuned: float, base: float, *, prompt: str | None = None, reference: str | None = None,
                   answer: str | None = None, base_answer: str | None = None, stopped: bool = True,
                   base_stopped: bool = True) -> dict[str, Any]:
    """One eval example's line of generations.jsonl; `tuned` and `base` are its ROUGE-L (chrF is 10 and 5, exact
    match 0 for both). Texts default to `prompt 3`, `reference 3`, `tuned 3`, `base 3` for index 3."""
    scores = lambda rouge_l, chrf: {"exact_match": 0, "rouge_l": rouge_l, "chrf": chrf}  # noqa: E731
    return {"index": index, "prompt": f"prompt {index}" if prompt is None else prompt,
            "reference": f"reference {index}" if reference is None else reference,
            "answer": f"tuned {index}" if answer is None else answer, "stopped": stopped, "answer_tokens": 3,
            "scores": scores(tuned, 10.0),
            "base_answer": f"base {index}" if base_answer is None else base_answer, "base_stopped": base_stopped,
            "base_scores": scores(base, 5.0)}
