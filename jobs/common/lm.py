"""Per-token negative log-likelihood of a keras-hub causal LM, shared by training and benchmarking."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from jobs import families

SEGMENT_IDS = "segment_ids"


@contextmanager
def document_attention(backbone, x: dict):
    """Yield the backbone's inputs (token ids and padding mask, with what the model's family adds: Gemma 4's
    positions); with `segment_ids` in `x` (packed raw text), every decoder block's attention
    mask also requires query and key to be in the same document while the call is traced. Written by hand because
    keras-hub's Gemma backbones take only a padding mask: this wraps each block's own mask (causal, padding,
    sliding window stays inside attention) rather than rebuilding it. RoPE makes attention depend on relative
    positions only, so a packed document sees what it would see alone (tests/jobs/common/test_packing.py)."""
    x = {**x, **families.of_model(backbone).backbone_inputs(x["token_ids"], x["padding_mask"])}
    segments = x.get(SEGMENT_IDS)
    if segments is None:
        yield x
        return
    import jax.numpy as jnp

    blocks = list(backbone.transformer_layers)
    if not all(hasattr(block, "_compute_attention_mask") for block in blocks):
        raise ValueError(f"{type(backbone).__name__}: no per-block attention mask to restrict to documents")
    same = segments[:, :, None] == segments[:, None, :]

    def restricted(original):
        def compute(*args, **kwargs):
            return jnp.logical_and(original(*args, **kwargs).astype(bool), same)
        return compute

    for block in blocks:  # an instance attribute shadows the class's method for this trace only
        block._compute_attention_mask = restricted(block._compute_attention_mask)
    try:
        yield {k: v for k, v in x.items() if k != SEGMENT_IDS}
    finally:
        for block in blocks:
            del block._compute_attention_mask


def token_nll(model, trainable, non_trainable, x: dict, y):
    """NLL of each target token (float32, shape of `y`) and the updated non-trainable state: the whole LM head on
    every position. The reference the loss-position path below is tested against."""
    import jax
    import jax.numpy as jnp

    with document_attention(model.backbone, x) as inputs:
        logits, non_trainable = model.stateless_call(trainable, non_trainable, inputs)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0], non_trainable


HEAD_CHUNK = 128  # positions per slice of the LM head when its logits are recomputed in the backward pass
MIN_CAPACITY = 64
# Logits of all scored positions up to this size are kept for the backward pass (one slice, no recompute); past
# it the head runs in HEAD_CHUNK slices whose logits are recomputed, bounding memory at a third more head compute.
# 512 MiB is 512 positions of Gemma 3's 262k vocabulary in float32.
HEAD_LOGITS_BUDGET = 512 * 2**20


def capacity(weights: np.ndarray) -> int:
    """How many positions the loss-position head computes for a batch: the scored ones, rounded up to the next
    of 64, 96, 128, 192, 256, 384, … (powers of two and halfway steps), so the compiled step sees a few shapes
    only and pads at most a third."""
    needed, size = int(np.count_nonzero(weights)), MIN_CAPACITY
    while size < needed:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


class LossPositionHead:
    """The NLL of the scored positions only. Gemma's tied head over a 262k vocabulary costs more per position
    than the whole 270M body, and only response tokens carry loss; so the backbone runs on every position, and
    the head (logits, soft-cap, log-softmax) on the `capacity` positions that count; past HEAD_LOGITS_BUDGET in
    slices of HEAD_CHUNK whose logits are recomputed in the backward pass rather than stored. Same result as
    `token_nll` where the weights are non-zero (tests/jobs/common/test_lm.py); zero elsewhere."""

    def __init__(self, model) -> None:
        backbone = model.backbone
        ids = [id(v) for v in model.trainable_variables] + [id(v) for v in model.non_trainable_variables]
        own = [id(v) for v in backbone.trainable_variables] + [id(v) for v in backbone.non_trainable_variables]
        if ids != own:  # the causal LM's variables are its backbone's, in the same order (keras-hub's functional model)
            raise ValueError("the causal LM's variables are not its backbone's; use the full-logits path")
        self.backbone = backbone
        embedding = backbone.token_embedding
        self.embedding_index = next(i for i, v in enumerate([*backbone.trainable_variables, *backbone.non_trainable_variables])
                                    if v is embedding.embeddings)
        self.n_trainable = len(backbone.trainable_variables)
        self.soft_cap = getattr(embedding, "logit_soft_cap", None)
        self.reverse_dtype = getattr(embedding, "reverse_dtype", None)
        self.scale_index = None
        mode = getattr(embedding, "quantization_mode", None)
        if mode == "int8" and getattr(embedding, "tie_weights", False):
            # An int8 table is used dequantized (row / its scale). Not keras' own int8 reverse call: it quantizes the
            # hidden states with a scale it differentiates through, which halves their gradient (measured with
            # keras 3.15; tests/jobs/finetuning/test_quantized.py), so LoRA on an int8 base would learn slowly.
            self.scale_index = next(i for i, v in enumerate([*backbone.trainable_variables, *backbone.non_trainable_variables])
                                    if v is embedding.embeddings_scale)
        elif mode is not None:
            raise ValueError(f"the loss-position head reads an unquantized or int8 table, not {mode}; use the full-logits path")

    def __call__(self, trainable, non_trainable, x: dict, y, weights, size: int):
        import jax
        import jax.numpy as jnp

        with document_attention(self.backbone, x) as inputs:
            hidden, non_trainable = self.backbone.stateless_call(trainable, non_trainable, inputs)
        table = ([*trainable, *non_trainable])[self.embedding_index]
        if self.scale_index is not None:
            table = table.astype(jnp.float32) / ([*trainable, *non_trainable])[self.scale_index][:, None]
        flat_w = weights.reshape(-1)
        # The scored positions first (stable: in order), then unscored ones, then (when the capacity exceeds the
        # batch) repeats of position 0; only picks that are scored positions count.
        order = jnp.argsort(jnp.where(flat_w > 0, 0, 1), stable=True)
        picks = jnp.pad(order, (0, max(0, size - order.shape[0])))[:size]
        counted = (jnp.arange(size) < order.shape[0]) & (flat_w[picks] > 0)
        h = hidden.reshape(-1, hidden.shape[-1])[picks]
        targets = y.reshape(-1)[picks]
        remat = size * table.shape[0] * 4 > HEAD_LOGITS_BUDGET
        chunks = max(1, size // HEAD_CHUNK) if remat else 1
        h = h.reshape(chunks, size // chunks, h.shape[-1])
        targets = targets.reshape(chunks, size // chunks)
        dtype = self.reverse_dtype

        def slice_nll(args):
            hs, ts = args
            # As keras' ReversibleEmbedding: its reverse dtype when set, else the hidden states' (bfloat16 under
            # mixed precision), so both paths round alike.
            kernel = table.astype(hs.dtype) if dtype is None else table.astype(dtype)
            hs = hs if dtype is None else hs.astype(dtype)
            logits = jnp.matmul(hs, kernel.T)
            if self.soft_cap is not None:
                logits = jnp.tanh(logits / self.soft_cap) * self.soft_cap
            log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            return -jnp.take_along_axis(log_probs, ts[:, None], axis=-1)[:, 0]

        per_slice = jax.lax.map(jax.checkpoint(slice_nll), (h, targets)) if remat else slice_nll((h[0], targets[0]))[None]
        nll = jnp.where(counted, per_slice.reshape(-1), 0.0)
        return jnp.zeros(flat_w.shape, jnp.float32).at[picks].add(nll).reshape(weights.shape), non_trainable


class NllScorer:
    """Scores fixed-shape batches with one compiled function per shape; reports steady-state tokens/s. Given the
    targets' weights, the LM head runs only where they are non-zero (`LossPositionHead`); NLL elsewhere is 0."""

    def __init__(self, model, loss_positions: bool = True) -> None:
        import jax

        self.model = model
        self.state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])
        self._fn = jax.jit(lambda t, n, x, y: token_nll(model, t, n, x, y)[0])
        head = LossPositionHead(model) if loss_positions else None
        self._head_fn = jax.jit(lambda t, n, x, y, w, size: head(t, n, x, y, w, size)[0], static_argnums=(5,)) if head else None
        self.tokens, self.seconds = 0, 0.0
        self._compiled = False  # the first call compiles; throughput counts the calls after it

    def __call__(self, x: np.ndarray, lengths: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        mask = (np.arange(x.shape[1])[None, :] < lengths[:, None]).astype(np.int32)
        inputs = {"token_ids": x, "padding_mask": mask}
        started = time.perf_counter()
        if self._head_fn is not None and weights is not None:
            nll = np.asarray(self._head_fn(*self.state, inputs, y, weights, capacity(weights)))
        else:
            nll = np.asarray(self._fn(*self.state, inputs, y))
        elapsed = time.perf_counter() - started
        if self._compiled:
            self.tokens += int(mask.sum())
            self.seconds += elapsed
        self._compiled = True
        return nll

    def refresh(self) -> None:
        """Read the model's weights again (after `models.merge_adapter`): the compiled functions stay, since the
        weights are their arguments; throughput starts over for the new weights."""
        self.state = ([v.value for v in self.model.trainable_variables], [v.value for v in self.model.non_trainable_variables])
        self.tokens, self.seconds = 0, 0.0

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
