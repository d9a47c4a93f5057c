"""Bootstrap intervals of a mean over examples, and paired ones of a difference between two models scored on the
same examples: the benchmark stage computes them for base vs tuned, the DAG's `select` task for the champion vs
each other candidate. Standard library only (the DAG imports it on Composer); a few thousand resamples of a few
thousand examples take well under a second."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def interval(values: Sequence[float], resamples: int, seed: int) -> dict[str, Any]:
    """The mean and its 95% bootstrap interval (None without resamples or examples)."""
    values = [float(v) for v in values]
    n = len(values)
    if not n:
        return {"value": None, "ci95_low": None, "ci95_high": None}
    out: dict[str, Any] = {"value": sum(values) / n, "ci95_low": None, "ci95_high": None}
    if resamples:
        rng = random.Random(seed)
        means = sorted(sum(values[i] for i in rng.choices(range(n), k=n)) / n for _ in range(resamples))
        out["ci95_low"], out["ci95_high"] = _percentile(means, 2.5), _percentile(means, 97.5)
    return out


def paired(a: Sequence[float], b: Sequence[float], resamples: int, seed: int) -> dict[str, Any]:
    """mean(a) - mean(b) over the same examples, with a paired 95% interval (each resample draws the same examples
    for both); `excludes_zero`: the difference is unlikely to be resampling noise."""
    if len(a) != len(b):
        raise ValueError(f"paired bootstrap: {len(a)} vs {len(b)} examples; both must score the same examples")
    out = interval([float(x) - float(y) for x, y in zip(a, b)], resamples, seed)
    low, high = out["ci95_low"], out["ci95_high"]
    out["excludes_zero"] = None if low is None else bool(low > 0 or high < 0)
    return out


def overlaps(a: Sequence[float | None], b: Sequence[float | None]) -> bool:
    """Whether two [low, high] intervals overlap (False when either is unknown)."""
    if None in (*a, *b):
        return False
    return a[0] <= b[1] and b[0] <= a[1]
