"""Turn prompt/response rows into token batches with a response-only loss mask.

Batches are length-bucketed: rows of similar length are batched together and each batch is padded only to
the next power of two (at least 32, at most the sequence length) that holds its longest row, so short rows do
not pay for the longest one and the compiled step sees a handful of shapes. A hand-written sampler because the
loop is hand-written JAX (transformers' `group_by_length` lives inside its Trainer).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.common.errors import BadInputError
from jobs.common.lm import bucket_width


@dataclass
class TokenizedSplit:
    tokens: np.ndarray  # (n, sequence_length + 1) int32, padded with pad_id
    lengths: np.ndarray  # (n,) tokens actually present
    loss_mask: np.ndarray  # (n, sequence_length) 1.0 where the target is a response token
    truncated: int


def read_rows(path: Path, field: str) -> list[dict[str, str]]:
    if not path.exists():
        raise BadInputError(field, str(path), "a preprocessing output with this file")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for index, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise BadInputError(field, f"{path}:{index + 1}", "rows with string 'prompt' and 'response' fields")
    return rows


def tokenize(rows: list[dict[str, str]], tokenizer, sequence_length: int) -> TokenizedSplit:
    """BOS + prompt + response + EOS; the loss covers the response and EOS only."""
    n = len(rows)
    width = sequence_length + 1
    pad, bos, eos = tokenizer.pad_token_id, tokenizer.start_token_id, tokenizer.end_token_id
    tokens = np.full((n, width), pad, dtype=np.int32)
    mask = np.zeros((n, sequence_length), dtype=np.float32)
    lengths = np.zeros((n,), dtype=np.int32)
    truncated = 0
    prompts = tokenizer([r["prompt"] for r in rows]) if rows else []
    responses = tokenizer([r["response"] for r in rows]) if rows else []
    for i, (p_ids, r_ids) in enumerate(zip(prompts, responses)):
        ids = [bos, *[int(t) for t in p_ids], *[int(t) for t in r_ids], eos]
        if len(ids) > width:
            truncated += 1
            ids = ids[:width]
        tokens[i, : len(ids)] = ids
        lengths[i] = len(ids)
        # Target position j predicts ids[j + 1]; response targets start at the first response token.
        first_target = len(p_ids)  # ids[len(p_ids) + 1] is the first response token
        mask[i, first_target : len(ids) - 1] = 1.0
    return TokenizedSplit(tokens, lengths, mask, truncated)


GROUP_BATCHES = 32  # batches per sorted group: wide enough to find similar lengths, small enough to stay shuffled


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Example indices of global step `step`: a seeded permutation per epoch, wrapping to keep shapes fixed.

    A pure function of (step, seed): resuming at any step reproduces the same data order.
    """
    per_epoch = steps_per_epoch(n, batch_size)
    epoch, within = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    positions = (np.arange(batch_size) + within * batch_size) % n
    return order[positions]


class BatchPlan:
    """Example indices of every global step; a pure function of (step, seed), so resuming at any step
    reproduces the same data order. With `by_length`, each epoch's seeded permutation is cut into groups of
    GROUP_BATCHES batches, each group is sorted by length and cut into batches, and the batches are shuffled."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, by_length: bool = True) -> None:
        self.lengths, self.batch_size, self.seed, self.by_length = lengths, batch_size, seed, by_length
        self._epoch: tuple[int, list[np.ndarray]] | None = None

    def indices(self, step: int) -> np.ndarray:
        n = len(self.lengths)
        if not self.by_length:
            return batch_indices(n, self.batch_size, step, self.seed)
        epoch, within = divmod(step, steps_per_epoch(n, self.batch_size))
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._grouped(epoch))
        return self._epoch[1][within]

    def _grouped(self, epoch: int) -> list[np.ndarray]:
        n, size = len(self.lengths), self.batch_size
        order = np.resize(np.random.default_rng([self.seed, epoch]).permutation(n), steps_per_epoch(n, size) * size)
        batches = []
        for start in range(0, len(order), size * GROUP_BATCHES):
            group = order[start : start + size * GROUP_BATCHES]
            group = group[np.argsort(-self.lengths[group], kind="stable")]
            batches += [group[i : i + size] for i in range(0, len(group), size)]
        shuffle = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
        return [batches[i] for i in shuffle]


def make_batch(split: TokenizedSplit, indices: np.ndarray, bucket: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Inputs, targets and loss weights; padded to the batch's length bucket (or the full sequence length)."""
    sequence_length = split.tokens.shape[1] - 1
    width = bucket_width(int(split.lengths[indices].max()), sequence_length) if bucket else sequence_length
    tokens = split.tokens[indices, : width + 1]
    x = tokens[:, :-1]
    y = tokens[:, 1:]
    positions = np.arange(width)[None, :]
    padding_mask = (positions < split.lengths[indices, None]).astype(np.int32)
    return {"token_ids": x, "padding_mask": padding_mask}, y, split.loss_mask[indices, :width]
