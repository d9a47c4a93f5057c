"""Perplexity, defined as in Hugging Face's perplexity guide, computed with any causal LM.

Running text ("text" mode): documents are joined with a separator into one token stream that starts with
BOS. Windows of `max_length` tokens start every `stride` tokens; in each window only the tokens not scored
by an earlier window are targets, the rest is context:

    PPL = exp( sum_t NLL(x_t | x_{max(0, e_w - max_length) .. t-1}) / T )

where t runs over every token after the first exactly once, e_w is the end of the window that scores it,
and T is the number of scored tokens (a token-weighted mean; the guide's loop weights each window's mean
loss by its target count minus one, which differs by at most one token per window).

Instruction data ("response" mode): each example is BOS + prompt + response + EOS scored on its own;
only the response tokens and EOS are targets:

    PPL = exp( sum_examples sum_{t in response} NLL(x_t | x_<t) / T_response )
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# score(token_ids, padding_mask) -> log-probabilities of the next token at each position, shape (B, L)
# evaluated at the given targets; see `Scorer`.
NllFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Windows:
    """Fixed-shape batches of windows: inputs, targets, target weights, and the document of each target."""

    x: np.ndarray  # (n, max_length - 1) int32
    y: np.ndarray  # (n, max_length - 1) int32
    lengths: np.ndarray  # (n,) valid input positions
    weights: np.ndarray  # (n, max_length - 1) 1.0 where the target is scored
    doc: np.ndarray  # (n, max_length - 1) document index of each target (-1 where not scored)


def digest(windows: Windows) -> str:
    """What was scored, as one hash: the inputs, the targets and which of them count. Two reports with the same
    digest scored identical tokens, so their perplexities compare directly (the candidates' champion choice)."""
    import hashlib

    h = hashlib.sha256()
    for array in (windows.x, windows.y, windows.weights, windows.lengths):
        h.update(np.ascontiguousarray(array).astype(np.int64 if array.dtype.kind in "iu" else np.float32).tobytes())
    return h.hexdigest()


def stream(docs_ids: list[list[int]], sep_ids: list[int], bos: int) -> tuple[np.ndarray, np.ndarray]:
    """One token stream (BOS + doc0 + sep + doc1 + ...) and the document index of every token."""
    tokens, owner = [bos], [0]
    for index, ids in enumerate(docs_ids):
        piece = ([*sep_ids] if index else []) + list(ids)
        tokens += piece
        owner += [index] * len(piece)
    return np.asarray(tokens, dtype=np.int32), np.asarray(owner, dtype=np.int32)


def sliding_windows(tokens: np.ndarray, owner: np.ndarray, max_length: int, stride: int, pad_id: int) -> Windows:
    n_tokens = len(tokens)
    width = max_length - 1
    xs, ys, lens, ws, ds = [], [], [], [], []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        ids = tokens[begin:end]
        x = np.full(width, pad_id, np.int32)
        y = np.full(width, pad_id, np.int32)
        w = np.zeros(width, np.float32)
        d = np.full(width, -1, np.int32)
        x[: len(ids) - 1], y[: len(ids) - 1] = ids[:-1], ids[1:]
        first_target = max(prev_end, begin + 1)  # global index of the first token this window scores
        local = np.arange(first_target - begin - 1, end - begin - 1)
        w[local] = 1.0
        d[local] = owner[local + begin + 1]
        xs.append(x), ys.append(y), lens.append(len(ids) - 1), ws.append(w), ds.append(d)
        prev_end = end
        if end == n_tokens:
            break
    return Windows(np.stack(xs), np.stack(ys), np.asarray(lens, np.int32), np.stack(ws), np.stack(ds))


def example_windows(tokens: np.ndarray, lengths: np.ndarray, loss_mask: np.ndarray) -> Windows:
    """Per-example rows (from `jobs.finetuning.data.tokenize`): response targets only."""
    n, width = loss_mask.shape
    doc = np.where(loss_mask > 0, np.arange(n)[:, None], -1).astype(np.int32)
    return Windows(tokens[:, :-1], tokens[:, 1:], np.minimum(lengths, width), loss_mask.astype(np.float32), doc)


def per_document(windows: Windows, nll: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum of NLL and count of scored tokens for every document."""
    mask = windows.weights > 0
    sums = np.bincount(windows.doc[mask], weights=nll[mask].astype(np.float64), minlength=n_docs)
    counts = np.bincount(windows.doc[mask], minlength=n_docs).astype(np.float64)
    return sums, counts


def summarize(sums: np.ndarray, counts: np.ndarray, bootstrap: int, seed: int) -> dict[str, float]:
    """Perplexity, mean NLL, token count, and a 95% bootstrap interval resampling documents."""
    total_nll, total_tokens = float(sums.sum()), float(counts.sum())
    mean_nll = total_nll / total_tokens
    result = {"perplexity": float(np.exp(mean_nll)), "mean_nll": mean_nll, "tokens": int(total_tokens), "documents": int((counts > 0).sum())}
    if bootstrap:
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(sums), size=(bootstrap, len(sums)))
        ppl = np.exp(sums[picks].sum(1) / np.maximum(counts[picks].sum(1), 1))
        result["ci95_low"], result["ci95_high"] = (float(v) for v in np.percentile(ppl, [2.5, 97.5]))
    return result


def paired_difference(base: dict[str, list[float]], tuned: dict[str, list[float]], bootstrap: int, seed: int) -> dict:
    """Base minus tuned perplexity over the same documents, with a paired 95% bootstrap interval (documents resampled
    once for both models); positive is an improvement. Each side is {"sums", "counts"} from `per_document`."""
    bs, bc = np.asarray(base["sums"]), np.asarray(base["counts"])
    ts, tc = np.asarray(tuned["sums"]), np.asarray(tuned["counts"])
    value = float(np.exp(bs.sum() / bc.sum()) - np.exp(ts.sum() / tc.sum()))
    out = {"value": value, "ci95_low": None, "ci95_high": None, "excludes_zero": None}
    if bootstrap and len(bs):
        picks = np.random.default_rng(seed).integers(0, len(bs), size=(bootstrap, len(bs)))
        diffs = (np.exp(bs[picks].sum(1) / np.maximum(bc[picks].sum(1), 1))
                 - np.exp(ts[picks].sum(1) / np.maximum(tc[picks].sum(1), 1)))
        out["ci95_low"], out["ci95_high"] = (float(v) for v in np.percentile(diffs, [2.5, 97.5]))
        out["excludes_zero"] = bool(out["ci95_low"] > 0 or out["ci95_high"] < 0)
    return out
