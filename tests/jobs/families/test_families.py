"""The family seam: every family found, and a model of another family refused by its config, naming the ones
supported; each family's chat turns."""

from __future__ import annotations

import json

import pytest

from jobs import families
from jobs.contract.errors import BadInputError
from jobs.families import gemma4


def test_every_family_module_is_found():
    names = [f.name for f in families.all_families()]
    assert names == ["gemma", "gemma3", "gemma4"]
    assert families.supported() == "Gemma (1 and 2), Gemma 3, Gemma 4"


@pytest.mark.parametrize("uri, family", [
    ("demo:gemma3-270m", "gemma3"), ("gemma3_instruct_1b", "gemma3"), ("gemma4_instruct_2b", "gemma4"),
    ("gemma4_26b_a4b", "gemma4"), ("gemma2_2b_en", "gemma"), ("kaggle://keras/gemma4/keras/gemma4_31b/1", "gemma4"),
])
def test_a_preset_name_names_its_family(uri, family):
    assert families.of_source(uri).name == family


@pytest.mark.parametrize("config, family", [
    ({"model_type": "gemma4_text", "architectures": ["Gemma4ForCausalLM"]}, "gemma4"),
    ({"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"]}, "gemma4"),
    ({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}, "gemma3"),
    ({"model_type": "gemma2"}, "gemma"),
    ({"registered_name": "keras_hub>Gemma4Backbone", "config": {}}, "gemma4"),
])
def test_a_directory_names_its_family_in_config_json(tmp_path, config, family):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert families.of_source(str(tmp_path)).name == family


@pytest.mark.parametrize("uri, config", [
    ("llama3_8b_en", None),
    ("dir", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}),
    ("dir", {"registered_name": "keras_hub>Llama3Backbone"}),
])
def test_another_family_is_refused_naming_the_supported_ones(tmp_path, uri, config):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
        uri = str(tmp_path)
    with pytest.raises(BadInputError) as raised:
        families.of_source(uri)
    message = str(raised.value)
    assert "--base-model" in message and "Gemma (1 and 2), Gemma 3, Gemma 4" in message


def test_each_family_has_its_chat_turns():
    gemma3, g4 = families.by_name("gemma3").chat, families.by_name("gemma4").chat
    assert gemma3.user_turn("Hi?") == "<start_of_turn>user\nHi?<end_of_turn>\n<start_of_turn>model\n"
    assert g4.user_turn("Hi?") == "<|turn>user\nHi?<turn|>\n<|turn>model\n"
    assert g4.model_turn("Yes.") == "Yes.<turn|>"
    assert set(families.end_of_turn_markers()) == {"<end_of_turn>", "<turn|>"}


def test_a_multimodal_gemma4_says_what_it_leaves_out():
    keras_preset = {"registered_name": "keras_hub>Gemma4Backbone",
                    "config": {"vision_encoder": {"class_name": "Gemma4VisionEncoder"}, "audio_encoder": None}}
    hf = {"model_type": "gemma4", "vision_config": {"hidden_size": 8}, "audio_config": {"hidden_size": 8}}
    assert gemma4.ignored_parts(keras_preset) == ["vision encoder"]
    assert gemma4.ignored_parts(hf) == ["audio encoder", "vision encoder"]
    assert gemma4.ignored_parts({"model_type": "gemma4_text"}) == []


def test_gemma4_export_fixes_what_keras_hub_writes(tmp_path):
    """keras-hub 0.32's exporter: a base-model architecture, no RoPE types, no K=V flag (../shared facts §7)."""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Gemma4TextModel"], "model_type": "gemma4_text",
        "rope_parameters": {"full_attention": {"partial_rotary_factor": 0.25}, "sliding_attention": {}}}))

    class KEqV:
        num_global_key_value_heads = 1

    families.by_name("gemma4").finish_export(tmp_path, KEqV())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Gemma4ForCausalLM"] and config["attention_k_eq_v"] is True
    assert config["rope_parameters"]["full_attention"]["rope_type"] == "proportional"
    assert config["rope_parameters"]["sliding_attention"]["rope_type"] == "default"
