"""Turn preprocessed rows into token batches: prompt/response pairs and chat conversations with loss on the
response (every assistant turn) only; raw-text documents packed into full sequences with loss on every token.

Batches are length-bucketed: rows of similar length are batched together and each batch is padded only to
the next power of two (at least 32, at most the sequence length) that holds its longest row, so short rows do
not pay for the longest one and the compiled step sees a handful of shapes. A hand-written sampler because the
loop is hand-written JAX (transformers' `group_by_length` lives inside its Trainer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs import families
from jobs.common.lm import bucket_width
from jobs.common.models import end_of_turn_id
from jobs.contract import rows as rows_lib
from jobs.contract import splits
from jobs.contract.errors import BadInputError


@dataclass
class TokenizedSplit:
    tokens: np.ndarray  # (n, sequence_length + 1) int32, padded with pad_id
    lengths: np.ndarray  # (n,) tokens actually present
    loss_mask: np.ndarray  # (n, sequence_length) 1.0 where the target is a response token
    truncated: int
    segments: np.ndarray | None = None  # (n, sequence_length) packed text: the document of each input position


def read_rows(path: Path | list[Path], field: str) -> list[dict[str, Any]]:
    """Rows of a split file, or of a split's shards in order (the format: jobs.contract.rows)."""
    paths = path if isinstance(path, list) else [path]
    for part in paths:
        if not part.exists():
            raise BadInputError(field, str(part), "a preprocessing output with this file")
    return rows_lib.parse(((f"{part}:{number}", line) for part in paths
                           for number, line in enumerate(part.read_text(encoding="utf-8").splitlines(), start=1)), field)


def read_split(data_dir: Path, split: str, field: str, required: bool = True) -> list[dict[str, Any]]:
    """A split of a preprocessing output (one file, or shards from the Beam engine); [] when absent and optional."""
    parts = splits.paths(data_dir, split)
    if not parts and required:
        raise BadInputError(field, str(data_dir / f"{split}.jsonl"),
                            f"a preprocessing output with a {split} split ({split}.jsonl or {split}-NNNNN-of-NNNNN.jsonl)")
    return read_rows(parts, field) if parts else []


def tokenize(rows: list[dict[str, Any]], tokenizer, sequence_length: int) -> TokenizedSplit:
    """BOS + segments + EOS per row; the loss covers the tokens of loss segments (the response, or every
    assistant turn) and the EOS after a final loss segment. Raw-text rows are packed instead (`pack`). Every loss
    segment must end with the end-of-turn token, so the model learns to stop after each answer: a row or tokenizer
    that breaks that is refused, not trained into a model that never stops."""
    if rows and rows_lib.kind_of(rows[0]) == rows_lib.TEXT:
        return pack(rows, tokenizer, sequence_length)
    end_of_turn = end_of_turn_id(tokenizer) if rows else -1
    n = len(rows)
    width = sequence_length + 1
    pad, bos, eos = tokenizer.pad_token_id, tokenizer.start_token_id, tokenizer.end_token_id
    tokens = np.full((n, width), pad, dtype=np.int32)
    mask = np.zeros((n, sequence_length), dtype=np.float32)
    lengths = np.zeros((n,), dtype=np.int32)
    truncated = 0
    row_segments = [rows_lib.segments_of(r) for r in rows]
    texts = [text for segments in row_segments for text, _ in segments]
    pieces = iter(tokenizer(texts) if texts else [])
    for i, segments in enumerate(row_segments):
        ids, scored = [bos], [False]  # scored[p]: ids[p] is a loss token (target position p - 1)
        for text, loss in segments:
            piece = [int(t) for t in next(pieces)]
            if loss and piece[-1:] != [end_of_turn]:
                _refuse_turn(i, text, tokenizer)
            ids += piece
            scored += [bool(loss)] * len(piece)
        ids.append(eos)
        scored.append(bool(segments[-1][1]))
        if len(ids) > width:
            truncated += 1
            ids, scored = ids[:width], scored[:width]
        tokens[i, : len(ids)] = ids
        lengths[i] = len(ids)
        mask[i, : len(ids) - 1] = np.asarray(scored[1:], dtype=np.float32)
    return TokenizedSplit(tokens, lengths, mask, truncated)


def _refuse_turn(index: int, text: str, tokenizer) -> None:
    family = families.of_tokenizer(tokenizer)
    marker = family.chat.end_of_turn
    if not text.endswith(marker):
        other = [f.title for f in families.all_families() if f.chat.end_of_turn != marker and text.endswith(f.chat.end_of_turn)]
        hint = f"; it ends with {other[0]}'s marker: preprocess again with this base model" if other else ""
        raise BadInputError("--data", f"row {index + 1}: an answer ending {text[-40:]!r}",
                            f"every response and assistant turn to end with {marker}, {family.title}'s end of turn (as "
                            f"this project's preprocessing writes them for a {family.title} base){hint}")
    raise BadInputError("tokenizer", type(tokenizer).__name__, f"a tokenizer that keeps {marker} as one "
                        f"token (it split it in row {index + 1}; the model could not learn to stop on it)")


def pack(rows: list[dict[str, Any]], tokenizer, sequence_length: int) -> TokenizedSplit:
    """Raw text: `BOS doc EOS` of every document, in row order, as one stream cut into rows of sequence_length + 1
    tokens that overlap by one (every token is a target once; no padding but at the very end). Loss on every
    target except a document's BOS (nothing predicts where a document starts). `segments` numbers the document
    of each input position, for the attention mask that keeps each document to itself."""
    bos, eos, pad = tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.pad_token_id
    docs = tokenizer([r["text"] for r in rows]) if rows else []
    stream: list[int] = []
    owner: list[int] = []
    for index, ids in enumerate(docs):
        piece = [bos, *[int(t) for t in ids], eos]
        stream += piece
        owner += [index] * len(piece)
    width = sequence_length + 1
    n = max(1, -(-(len(stream) - 1) // sequence_length))
    tokens = np.full((n, width), pad, dtype=np.int32)
    segments = np.full((n, sequence_length), -1, dtype=np.int32)
    mask = np.zeros((n, sequence_length), dtype=np.float32)
    lengths = np.zeros((n,), dtype=np.int32)
    stream_a, owner_a = np.asarray(stream, dtype=np.int32), np.asarray(owner, dtype=np.int32)
    starts = np.zeros(len(stream), dtype=bool)
    starts[np.flatnonzero(np.diff(owner_a, prepend=-1))] = True  # a document's first token (its BOS)
    for r in range(n):
        lo, hi = r * sequence_length, min(r * sequence_length + width, len(stream))
        count = hi - lo
        tokens[r, :count] = stream_a[lo:hi]
        lengths[r] = count
        segments[r, : count - 1] = owner_a[lo : hi - 1]
        mask[r, : count - 1] = ~starts[lo + 1 : hi]
    return TokenizedSplit(tokens, lengths, mask, 0, segments)


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


def make_batch(split: TokenizedSplit, indices: np.ndarray, bucket: bool = True,
               document_mask: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Inputs, targets and loss weights; padded to the batch's length bucket (or the full sequence length).
    Packed text with `document_mask` carries `segment_ids` too (see `jobs.common.lm.document_attention`)."""
    sequence_length = split.tokens.shape[1] - 1
    width = bucket_width(int(split.lengths[indices].max()), sequence_length) if bucket else sequence_length
    tokens = split.tokens[indices, : width + 1]
    x = tokens[:, :-1]
    y = tokens[:, 1:]
    positions = np.arange(width)[None, :]
    padding_mask = (positions < split.lengths[indices, None]).astype(np.int32)
    inputs = {"token_ids": x, "padding_mask": padding_mask}
    if split.segments is not None and document_mask:
        inputs["segment_ids"] = split.segments[indices, :width]
    return inputs, y, split.loss_mask[indices, :width]
