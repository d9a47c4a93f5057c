"""The loss-position head: loss and LoRA gradients equal to the full-logits path (tiny Gemma 3, Gemma with
Gemma 2's final-logit soft-cap, Gemma 4 dense with per-layer inputs and shared key/value layers, Gemma 4 MoE), whatever the capacity's padding, with the logits kept or recomputed in slices."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.common import lm
from tests.tiny_models import make_tiny_causal_lm


def _soft_capped_gemma():
    import keras_hub

    base = make_tiny_causal_lm("gemma", seed=3)
    config = {**base.backbone.get_config(), "final_logit_soft_cap": 5.0, "attention_logit_soft_cap": 20.0}
    backbone = keras_hub.models.GemmaBackbone.from_config(config)
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=base.preprocessor)


@pytest.mark.parametrize("remat", [False, True], ids=["logits-kept", "sliced-recomputed"])
@pytest.mark.parametrize("kind", ["gemma3", "gemma2-softcap", "gemma4", "gemma4_moe"])
def test_loss_and_lora_gradients_equal_the_full_logits_path(kind, remat, monkeypatch):
    import jax
    import jax.numpy as jnp

    model = _soft_capped_gemma() if kind == "gemma2-softcap" else make_tiny_causal_lm(kind, seed=3)
    model.backbone.enable_lora(2, target_layer_names=["query", "value"])
    rng = np.random.default_rng(0)
    for variable in model.trainable_variables:  # LoRA B starts at zero: give every factor a gradient path
        variable.assign(rng.normal(scale=0.1, size=variable.shape).astype("float32"))
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    b, t = 3, 32
    x = rng.integers(4, 300, size=(b, t)).astype("int32")
    lengths = np.array([32, 20, 9])
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype("int32")
    y = np.roll(x, -1, axis=1)
    weights = (mask * (np.arange(t)[None, :] >= 4)).astype("float32")  # a response after a 4-token prompt
    inputs = {"token_ids": x, "padding_mask": mask}
    head = lm.LossPositionHead(model)
    if remat:  # past the budget: HEAD_CHUNK slices, logits recomputed in the backward pass (a tiny vocabulary never gets there)
        monkeypatch.setattr(lm, "HEAD_LOGITS_BUDGET", 0)

    def full_loss(params):
        nll, _ = lm.token_nll(model, params, non_trainable, inputs, y)
        return jnp.sum(nll * weights) / jnp.sum(weights), nll

    def head_loss(params, size):
        nll, _ = head(params, non_trainable, inputs, y, weights, size)
        return jnp.sum(nll * weights) / jnp.sum(weights), nll

    (loss, nll), grads = jax.value_and_grad(full_loss, has_aux=True)(trainable)
    for size in (lm.capacity(weights), 256):  # the batch's own capacity, and more than the batch holds
        (loss2, nll2), grads2 = jax.value_and_grad(lambda p, s=size: head_loss(p, s), has_aux=True)(trainable)
        assert abs(float(loss) - float(loss2)) <= 1e-5
        np.testing.assert_allclose(np.asarray(nll2)[weights > 0], np.asarray(nll)[weights > 0], atol=1e-5)
        assert np.all(np.asarray(nll2)[weights == 0] == 0)
        for g, g2 in zip(grads, grads2, strict=True):
            np.testing.assert_allclose(np.asarray(g2), np.asarray(g), atol=1e-5)
    assert any(float(jnp.abs(g).max()) > 1e-4 for g in grads)  # the comparison is not between zeros


def test_capacity_rounds_up_to_few_shapes():
    assert lm.capacity(np.zeros((4, 32))) == lm.MIN_CAPACITY
    assert lm.capacity(np.ones((4, 32))) == 128 and lm.capacity(np.ones((3, 50))) == 192
    sizes = {lm.capacity(np.ones(n)) for n in range(1, 4097)}
    assert sorted(sizes) == [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    assert all(lm.capacity(np.ones(n)) < 1.5 * n for n in range(64, 4097))  # pads less than half again
