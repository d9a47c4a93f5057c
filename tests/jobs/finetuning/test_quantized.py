"""LoRA on a quantized base (QLoRA-style): only the LoRA variables train, the base kernels stay quantized and
unchanged, the product is the adapter, and benchmark and convert apply it to the full-precision base."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jobs.common.errors import BadInputError
from jobs.finetuning.config import FinetuneConfig
from jobs.finetuning.core import ADAPTER, MERGED
from tests.conftest import run_module
from tests.jobs.finetuning.test_finetuning import _config, prepared  # noqa: F401  (module fixture)


@pytest.mark.parametrize("mode", ["int8", "int4"])
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


def test_the_adapter_is_the_product_and_benchmark_and_convert_use_the_full_precision_base(tmp_path, tiny_gemma3, prepared):  # noqa: F811
    env = {**os.environ, "KERAS_BACKEND": "jax", "STAGE_WORKDIR": str(tmp_path / "w")}
    ft, bench, conv = tmp_path / "ft", tmp_path / "bench", tmp_path / "conv"
    (tmp_path / "w").mkdir()
    result = run_module("jobs.finetuning", "--data", str(prepared), "--output", str(ft), "--base-model", str(tiny_gemma3),
                        "--max-steps", "4", "--batch-size", "4", "--sequence-length", "48", "--learning-rate", "0.02",
                        "--base-quantization", "int8", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (ft / ADAPTER).exists() and not (ft / MERGED).exists()
    metrics = json.loads((ft / "metrics.json").read_text())
    assert metrics["base_quantization"] == "int8" and metrics["product"] == "adapter"

    result = run_module("jobs.benchmark", "--data", str(prepared), "--finetune", str(ft), "--output", str(bench),
                        "--base-model", str(tiny_gemma3), "--bootstrap", "0", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tuned = json.loads((bench / "report.json").read_text())["models"]["tuned"]
    assert "full precision; trained on a int8 base" in tuned["uri"] and tuned["splits"]["eval"]["perplexity"] > 0

    result = run_module("jobs.convert", "--finetune", str(ft), "--output", str(conv), env={**env, "KERAS_BACKEND": "torch"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((conv / "_manifest.json").read_text())
    assert manifest["metrics"]["parity"]["passed"]
    assert "with the adapter applied (trained on a int8 base)" in manifest["metrics"]["exported_from"]
