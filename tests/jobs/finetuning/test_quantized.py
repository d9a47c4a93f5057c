"""LoRA on a quantized base (QLoRA-style): only the LoRA variables train, the base kernels stay quantized and
unchanged. That the adapter is then the product, scored and exported on the full-precision base, is shown through
the DAG in tests/reliability/test_local_dag_modes.py."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from jobs.contract.configs.finetune import FinetuneConfig
from jobs.contract.errors import BadInputError
from tests.support.finetune import _config


@pytest.mark.parametrize("mode", ["int8", pytest.param("int4", marks=pytest.mark.slow)])  # one quantized path by default
def test_only_lora_trains_and_the_base_kernels_stay_quantized(tiny_gemma3, prepared, mode):  # noqa: F811
    import keras_hub

    from jobs.finetuning import data as data_lib
    from jobs.finetuning.core import quantize_base
    from jobs.finetuning.train import Trainer, make_optimizer

    model = keras_hub.models.CausalLM.from_preset(str(tiny_gemma3))
    quantize_base(model, mode)
    model.backbone.enable_lora(2, target_layer_names=["query", "value"])
    config = _config(prepared, "-", tiny_gemma3)
    trainer = Trainer(model, make_optimizer(config, 4)[0], None, "all")
    paths = [v.path for v in model.backbone.non_trainable_variables]
    frozen_before = [np.asarray(v).copy() for v in trainer.non_trainable]
    lora_before = [np.asarray(v).copy() for v in trainer.trainable]
    split = data_lib.tokenize(data_lib.read_rows(prepared / "train.jsonl", "--data"), model.preprocessor.tokenizer, 48)
    for step in range(3):
        loss = trainer.train_step(data_lib.make_batch(split, np.arange(4) + 4 * step))
        assert np.isfinite(loss)

    assert all("lora_kernel" in v.path for v in model.backbone.trainable_variables)
    kernels = {p: v for p, v in zip(paths, trainer.non_trainable) if p.endswith("/kernel") and "decoder_block" in p}
    assert kernels and all(v.dtype == np.int8 for v in kernels.values())  # int4 is stored packed in int8
    for path, before, after in zip(paths, frozen_before, trainer.non_trainable):
        np.testing.assert_array_equal(before, np.asarray(after), err_msg=path)  # the base did not move
    assert any(not np.array_equal(b, np.asarray(a)) for b, a in zip(lora_before, trainer.trainable))


def test_quantized_base_refusals():
    with pytest.raises(BadInputError, match="--model-parallel.*int4"):
        FinetuneConfig(data="d", output="o", base_quantization="int4", distribution="model", model_parallel=2)
    # float8 (which Keras cannot train LoRA on) is case F14 of the bad-input catalogue.


@functools.cache
def _lora_grad_norm(preset: str, mode: str, head: bool) -> float:
    """The norm of the LoRA gradients of a tiny Gemma 3 (non-zero B, so A gets a gradient too) on a fixed batch, with
    the base in `mode`, through the loss-position head or Keras' full-logits path."""
    import jax
    import jax.numpy as jnp
    import keras_hub

    from jobs.common.lm import LossPositionHead, token_nll
    from jobs.finetuning.core import quantize_base

    tokens = np.random.default_rng(0).integers(4, 300, size=(4, 33)).astype(np.int32)
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((4, 32), np.int32)}
    y, w = tokens[:, 1:], np.ones((4, 32), np.float32)
    model = keras_hub.models.CausalLM.from_preset(preset)
    if mode != "none":
        quantize_base(model, mode)
    model.backbone.enable_lora(2, target_layer_names=["query", "value"])
    for variable in model.trainable_variables:
        if "lora_kernel_b" in variable.path:
            variable.assign(np.full(variable.shape, 0.05, np.float32))
    frozen = [v.value for v in model.non_trainable_variables]
    position_head = LossPositionHead(model)

    def loss(trainable):
        nll = position_head(trainable, frozen, x, y, w, 128)[0] if head else token_nll(model, trainable, frozen, x, y)[0]
        return jnp.mean(nll)

    grads = jax.grad(loss)([v.value for v in model.trainable_variables])
    return float(np.sqrt(sum(float(jnp.sum(g ** 2)) for g in grads)))


def test_an_int8_base_gets_the_lora_gradients_of_the_full_precision_model(tiny_gemma3):
    """The loss-position head uses an int8 table dequantized, so LoRA gradients on an int8 base are close to those
    on the full-precision base."""
    reference = _lora_grad_norm(str(tiny_gemma3), "none", False)
    assert 0.8 < _lora_grad_norm(str(tiny_gemma3), "int8", True) / reference < 1.25


@pytest.mark.xfail(strict=True, reason="Keras' int8 reverse embedding (the full-logits path) quantizes the hidden "
                   "states with a scale it differentiates through and about halves the LoRA gradients; the pipeline's "
                   "loss-position head avoids that path. An XPASS means Keras fixed it: drop this marker.")
def test_keras_int8_reverse_embedding_keeps_the_lora_gradients(tiny_gemma3):
    reference = _lora_grad_norm(str(tiny_gemma3), "none", False)
    assert 0.8 < _lora_grad_norm(str(tiny_gemma3), "int8", False) / reference < 1.25
