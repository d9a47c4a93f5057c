"""A JAX training loop over a keras-hub causal LM: stateless keras calls inside `jax.jit`.

Written by hand rather than `model.fit` because resume must restore the exact step, data position and
optimizer state mid-epoch, and SIGTERM must checkpoint between two steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jobs.common.lm import LossPositionHead, batches, capacity, token_nll
from jobs.finetuning import data as data_lib
from jobs.finetuning import multihost
from jobs.finetuning.distribution import shard_batch


def make_optimizer(config, total_steps: int):
    import keras

    warmup = int(total_steps * config.warmup_fraction)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else config.learning_rate,
        decay_steps=max(1, total_steps - warmup),
        alpha=0.1,
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
    )
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=config.weight_decay,
        global_clipnorm=config.max_grad_norm or None,
    )
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale", "norm"])
    return optimizer, schedule


class Trainer:
    def __init__(self, model, optimizer, distribution, lm_head: str = "loss_positions", document_mask: bool = True) -> None:
        import jax

        self.model, self.optimizer, self.distribution = model, optimizer, distribution
        self.document_mask = document_mask
        self.head = LossPositionHead(model) if lm_head == "loss_positions" else None
        optimizer.build(model.trainable_variables)
        self.trainable = [v.value for v in model.trainable_variables]
        self.non_trainable = [v.value for v in model.non_trainable_variables]
        self.opt_vars = [v.value for v in optimizer.variables]
        # `size` (how many positions the head computes) is part of the compiled shape.
        self._train_step = jax.jit(self._step, donate_argnums=(0, 2), static_argnums=(6,))
        self._eval_step = jax.jit(self._loss_sums, static_argnums=(5,))

    def _loss_sums(self, trainable, non_trainable, x, y, weights, size):
        import jax.numpy as jnp

        if self.head is not None:
            nll, non_trainable = self.head(trainable, non_trainable, x, y, weights, size)
        else:
            nll, non_trainable = token_nll(self.model, trainable, non_trainable, x, y)
        return jnp.sum(nll * weights), jnp.sum(weights), non_trainable

    def _size(self, weights) -> int:
        return capacity(np.asarray(weights)) if self.head is not None else 0

    def _step(self, trainable, non_trainable, opt_vars, x, y, weights, size):
        import jax
        import jax.numpy as jnp

        def loss_fn(params):
            total, count, new_non_trainable = self._loss_sums(params, non_trainable, x, y, weights, size)
            return total / jnp.maximum(count, 1.0), (new_non_trainable, count)

        (loss, (non_trainable, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        trainable, opt_vars = self.optimizer.stateless_apply(opt_vars, grads, trainable)
        return trainable, non_trainable, opt_vars, loss, count

    def _device_batch(self, batch):
        x, y, w = batch
        return {k: shard_batch(self.distribution, v) for k, v in x.items()}, shard_batch(self.distribution, y), shard_batch(self.distribution, w)

    def train_step(self, batch) -> float:
        size = self._size(batch[2])
        x, y, w = self._device_batch(batch)
        self.trainable, self.non_trainable, self.opt_vars, loss, _ = self._train_step(
            self.trainable, self.non_trainable, self.opt_vars, x, y, w, size
        )
        return float(loss)

    def evaluate(self, split: data_lib.TokenizedSplit, batch_size: int, max_batches: int = 0, bucket: bool = True) -> dict[str, float]:
        """Token-weighted mean NLL over the response tokens of the split (each example counted once). Rows are
        scored in length order so each batch pads only to its own bucket; the sum does not depend on order."""
        n = len(split.lengths)
        limit = min(n, max_batches * batch_size) if max_batches else n
        total, count = 0.0, 0.0
        for rows, valid in batches(limit, batch_size, split.lengths[:limit] if bucket else None):
            x, y, w = data_lib.make_batch(split, rows, bucket, self.document_mask)
            w = w * valid[:, None]  # a short last batch repeats rows, weighted zero
            sums = self._eval_step(self.trainable, self.non_trainable, *self._device_batch((x, y, w)), self._size(w))
            total, count = total + float(sums[0]), count + float(sums[1])
        loss = total / max(count, 1.0)
        return {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": count}

    def trainable_digest(self) -> str:
        """sha256 over the trainable (LoRA) weights as this process holds them: equal on every process."""
        import hashlib

        digest = hashlib.sha256()
        for value in multihost.to_host(self.trainable):
            digest.update(np.ascontiguousarray(value).tobytes())
        return digest.hexdigest()

    def sync_to_model(self) -> None:
        """Write the functional state back into the keras variables (before saving)."""
        for variable, value in zip(self.model.trainable_variables, self.trainable):
            variable.assign(value)
        for variable, value in zip(self.model.non_trainable_variables, self.non_trainable):
            variable.assign(value)
        for variable, value in zip(self.optimizer.variables, self.opt_vars):
            variable.assign(value)

    def restore(self, arrays: dict[str, Any]) -> None:
        import jax

        def put(old, new):
            return jax.device_put(np.asarray(new, dtype=old.dtype), old.sharding)

        self.trainable = [put(old, arrays[f"t{i}"]) for i, old in enumerate(self.trainable)]
        self.opt_vars = [put(old, arrays[f"o{i}"]) for i, old in enumerate(self.opt_vars)]
