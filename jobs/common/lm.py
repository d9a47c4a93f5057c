"""Per-token negative log-likelihood of a keras-hub causal LM, shared by training and benchmarking."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np


def token_nll(model, trainable, non_trainable, x: dict, y):
    """NLL of each target token (float32, shape of `y`) and the updated non-trainable state."""
    import jax
    import jax.numpy as jnp

    logits, non_trainable = model.stateless_call(trainable, non_trainable, x)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0], non_trainable


class NllScorer:
    """Scores fixed-shape batches with one compiled function; reports steady-state tokens/s."""

    def __init__(self, model) -> None:
        import jax

        self.model = model
        self.state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])
        self._fn = jax.jit(lambda t, n, x, y: token_nll(model, t, n, x, y)[0])
        self.tokens, self.seconds = 0, 0.0
        self._compiled = False  # the first call compiles; throughput counts the calls after it

    def __call__(self, x: np.ndarray, lengths: np.ndarray, y: np.ndarray) -> np.ndarray:
        mask = (np.arange(x.shape[1])[None, :] < lengths[:, None]).astype(np.int32)
        started = time.perf_counter()
        nll = np.asarray(self._fn(*self.state, {"token_ids": x, "padding_mask": mask}, y))
        elapsed = time.perf_counter() - started
        if self._compiled:
            self.tokens += int(mask.sum())
            self.seconds += elapsed
        self._compiled = True
        return nll

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None


MIN_BUCKET = 32


def bucket_width(longest: int, limit: int) -> int:
    """Padded width for a batch whose longest row is `longest`: the next power of two (at least MIN_BUCKET,
    at most `limit`), so rows pay only for their own bucket and the compiled function sees few shapes."""
    width = MIN_BUCKET
    while width < longest:
        width *= 2
    return min(width, limit)


def batches(n: int, batch_size: int, lengths: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Row indices in fixed-size batches (in length order when `lengths` is given, so similar lengths share a
    batch) and which of them are real: a short last batch repeats rows, which callers must ignore."""
    order = np.arange(n) if lengths is None else np.argsort(lengths, kind="stable")
    for start in range(0, n, batch_size):
        chunk = order[start : start + batch_size]
        yield np.resize(chunk, batch_size), np.arange(batch_size) < len(chunk)
