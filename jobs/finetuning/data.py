"""Turn prompt/response rows into fixed-shape token batches with a response-only loss mask."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.common.errors import BadInputError


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


def make_batch(split: TokenizedSplit, indices: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    tokens = split.tokens[indices]
    x = tokens[:, :-1]
    y = tokens[:, 1:]
    positions = np.arange(x.shape[1])[None, :]
    padding_mask = (positions < split.lengths[indices, None]).astype(np.int32)
    return {"token_ids": x, "padding_mask": padding_mask}, y, split.loss_mask[indices]
