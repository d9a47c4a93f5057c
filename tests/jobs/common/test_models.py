"""Loading a model: the fast path (placeholder initial values, an untracked vocabulary) gives keras-hub's own model,
value for value."""

from __future__ import annotations

import numpy as np

from jobs.common import models


def test_a_fast_load_equals_keras_hubs_own(tiny_gemma3, tmp_path):
    import keras_hub

    ours = models.load_causal_lm(str(tiny_gemma3), tmp_path)
    theirs = keras_hub.models.CausalLM.from_preset(str(tiny_gemma3))
    assert [v.path for v in ours.weights] == [v.path for v in theirs.weights] and ours.weights
    assert all(np.array_equal(np.asarray(a.value), np.asarray(b.value)) for a, b in zip(ours.weights, theirs.weights, strict=True))
    text = "What does os.path.join do?"
    assert [int(t) for t in ours.preprocessor.tokenizer(text)] == [int(t) for t in theirs.preprocessor.tokenizer(text)]


def test_a_variable_the_load_did_not_assign_gets_its_own_initializer():
    import keras

    with models._placeholder_initialization():
        loaded = keras.Variable(initializer="ones", shape=(3,))
        untouched = keras.Variable(initializer="ones", shape=(2,))
        half = keras.Variable(initializer="ones", shape=(2,), dtype="bfloat16")  # numpy has no bfloat16: initialized the usual way
        loaded.assign(np.full(3, 7.0, np.float32))
        assert np.array_equal(np.asarray(untouched.value), np.zeros(2))  # a placeholder while loading
    assert np.array_equal(np.asarray(loaded.value), np.full(3, 7.0)) and np.array_equal(np.asarray(untouched.value), np.ones(2))
    assert str(half.value.dtype) == "bfloat16" and np.array_equal(np.asarray(half.value, np.float32), np.ones(2))
