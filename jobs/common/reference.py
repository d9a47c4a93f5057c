"""Reference logits: what a Keras model says on the probe texts, kept so that its Hugging Face export and PEFT
adapter can be checked later by a process that never loads Keras (the convert stage).

Gemma's vocabulary makes full logits large (262k floats per position), so a reference keeps, per probe text: the
token ids, the full logits of the last position (the greedy next token and its margin), and every position's
logits on a fixed, seeded sample of vocabulary columns. A wrong weight anywhere in the model moves all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = 4096  # vocabulary columns kept at every position
SEED = 0


@dataclass
class Sample:
    text: str
    ids: list[int]  # the tokenizer's ids for the text, without BOS
    input: list[int]  # what the model saw: BOS + ids
    columns: np.ndarray  # the vocabulary ids kept at every position
    sampled: np.ndarray  # (positions, len(columns)) float32
    last: np.ndarray  # (vocabulary,) float32: the last position's full logits


def columns_for(vocabulary: int) -> np.ndarray:
    if vocabulary <= COLUMNS:
        return np.arange(vocabulary)
    return np.sort(np.random.default_rng(SEED).choice(vocabulary, COLUMNS, replace=False))


def compute(model: Any, texts: list[str]) -> list[Sample]:
    """The probe texts through a keras-hub causal LM (as it is: LoRA enabled or merged), one padded batch."""
    import keras

    tokenizer = model.preprocessor.tokenizer
    ids = [[int(t) for t in tokenizer(text)] for text in texts]
    inputs = [[int(tokenizer.start_token_id), *row] for row in ids]
    width = max(len(row) for row in inputs)
    tokens = np.full((len(inputs), width), int(tokenizer.pad_token_id), np.int32)
    mask = np.zeros((len(inputs), width), np.int32)
    for i, row in enumerate(inputs):  # right padding: a causal model's real positions never see it
        tokens[i, : len(row)], mask[i, : len(row)] = row, 1
    from jobs import families

    logits = keras.ops.convert_to_numpy(model(families.of_model(model).backbone_inputs(tokens, mask))).astype(np.float32)
    columns = columns_for(logits.shape[-1])
    return [Sample(text, row_ids, row, columns, logits[i, : len(row)][:, columns].copy(), logits[i, len(row) - 1].copy())
            for i, (text, row_ids, row) in enumerate(zip(texts, ids, inputs, strict=True))]


def save(samples: list[Sample], path: Path) -> None:
    arrays: dict[str, Any] = {"texts": np.array([s.text for s in samples]), "columns": samples[0].columns}
    for i, s in enumerate(samples):
        arrays[f"ids_{i}"] = np.asarray(s.ids, np.int64)
        arrays[f"input_{i}"] = np.asarray(s.input, np.int64)
        arrays[f"sampled_{i}"] = s.sampled
        arrays[f"last_{i}"] = s.last
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


def load(path: Path) -> list[Sample]:
    with np.load(path, allow_pickle=False) as data:
        texts = [str(t) for t in data["texts"]]
        return [Sample(text, data[f"ids_{i}"].tolist(), data[f"input_{i}"].tolist(), data["columns"],
                       data[f"sampled_{i}"], data[f"last_{i}"]) for i, text in enumerate(texts)]


def compare(samples: list[Sample], logits_of: Any, tolerance: float | None) -> dict[str, Any]:
    """Run `logits_of(input ids) -> (positions, vocabulary)` on every probe and compare with the reference: the
    largest |difference| on the kept logits, and whether the greedy next token agrees. `tolerance` None: 2% of the
    largest logit (what a bfloat16 export can keep)."""
    max_diff, max_logit, tops = 0.0, 0.0, []
    for sample in samples:
        logits = np.asarray(logits_of(sample.input), np.float32)
        max_diff = max(max_diff, float(np.abs(logits[:, sample.columns] - sample.sampled).max()),
                       float(np.abs(logits[-1] - sample.last).max()))
        max_logit = max(max_logit, float(np.abs(sample.last).max()), float(np.abs(sample.sampled).max()))
        tops.append((int(sample.last.argmax()), int(logits[-1].argmax()), sample.last))
    tolerance = tolerance if tolerance is not None else 0.02 * max_logit
    # A different greedy token fails only when the reference preferred its own by more than the tolerance: a
    # near-tie (common in a random or bfloat16 model) cannot be kept through rounding the check already allows.
    greedy = [mine == theirs or float(last[mine] - last[theirs]) <= tolerance for mine, theirs, last in tops]
    return {"samples": len(samples), "logits_max_abs_diff": max_diff, "tolerance": tolerance,
            "greedy_next_token_equal": all(greedy), "greedy_near_ties": sum(m != t for m, t, _ in tops),
            "passed": max_diff <= tolerance and all(greedy)}
