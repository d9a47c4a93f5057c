"""Before any Job: a base model of another family is refused naming the supported ones, and a preset its
fine-tune profile cannot hold is refused naming the model, the profile, the estimate and the profiles that
would. The preset index and the docs' fit table are what the code generates."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException
from gemma_pipeline.operators import tasks
from gemma_pipeline.plan import fit, profiles
from gemma_pipeline.tools import generate

from jobs import families
from tests.dags.test_candidates import PARAMS


def test_another_family_is_refused_at_plan():
    with pytest.raises(AirflowFailException) as raised:
        tasks.plan_task({**PARAMS, "base_model": "llama3_8b_en"}, "r1")
    assert "base_model: got 'llama3_8b_en'" in str(raised.value)
    assert "Gemma (1 and 2), Gemma 3, Gemma 4" in str(raised.value)


def test_a_profile_too_small_is_refused_naming_both_and_what_fits():
    with pytest.raises(AirflowFailException) as raised:
        tasks.plan_task({**PARAMS, "base_model": "gemma4_instruct_31b", "finetune_profile": "tpu-v5e-1",
                         "sequence_length": 1024, "batch_size": 4}, "r1")
    message = str(raised.value)
    assert "finetune_profile: 'tpu-v5e-1' cannot hold gemma4_instruct_31b (31.0B parameters)" in message
    assert "against its 16 GiB" in message and "gpu-h100-8" in message and "tpu-v5e-1," not in message


def test_the_same_model_on_a_big_enough_profile_plans():
    values = {**PARAMS, "base_model": "gemma4_instruct_31b", "finetune_profile": "gpu-h100-8", "model_parallel": 2,
              "sequence_length": 1024, "batch_size": 4}
    entry = tasks.plan_task(values, "r1")["candidates"][0]
    assert entry["finetune"]["profile_name"] == "gpu-h100-8"
    small = fit.check({**values, "base_model": "gemma3_instruct_1b", "finetune_profile": "cpu"}, "cpu")
    assert small is not None and small.fits and small.weight_dtype == "bfloat16"


def test_the_estimate_scales_as_it_should():
    preset = fit.presets()["gemma4_4b"]
    h100 = profiles.get("gpu-h100-8")
    base = {"sequence_length": 1024, "batch_size": 8}
    one, two = fit.estimate(preset, h100, {**base, "model_parallel": 1}), fit.estimate(preset, h100, {**base, "model_parallel": 2})
    assert two.weights == pytest.approx(one.weights / 2, rel=0.01)
    assert fit.estimate(preset, h100, {**base, "base_quantization": "int8"}).weights == pytest.approx(one.weights / 2, rel=0.01)
    assert fit.estimate(preset, h100, {**base, "mixed_precision": True}).weights == pytest.approx(one.weights * 2, rel=0.01)
    # 12·L·h² + V·h reproduces a known model's width within 10% (Gemma 3 27B: 62 layers, hidden 5376)
    assert fit.hidden_size(27_009_002_240, 62) == pytest.approx(5376, rel=0.1)
    assert fit.device_gib(profiles.get("cpu")) == 16


def test_the_preset_index_and_the_fit_table_are_current():
    index = fit.presets()
    assert len(index) > 20 and {"gemma4_instruct_2b", "gemma4_26b_a4b", "gemma3_270m"} <= set(index)
    for name, preset in index.items():  # every indexed preset is named as its family by the plan's name check
        assert families.of_name(name).name == preset["family"], name
    assert generate.stale("model_presets") == [] and generate.stale("models") == []
