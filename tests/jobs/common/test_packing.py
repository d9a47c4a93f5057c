"""Packed raw text and chat loss masks: the packer conserves tokens and is deterministic; the document mask makes a
packed document's logits those of the document alone; chat loss covers exactly the assistant tokens."""

from __future__ import annotations

import numpy as np
import pytest

from jobs import families
from jobs.common.lm import document_attention
from jobs.finetuning import data as data_lib
from jobs.preprocessing.modes import render_chat

DOCS = [{"text": "The first document talks about rivers and lakes."}, {"text": "Second: mountains."},
        {"text": "A third document, " + "with many words " * 12}, {"text": "Four."}]


@pytest.fixture(scope="module")
def model(tiny_gemma3):
    import keras_hub

    return keras_hub.models.CausalLM.from_preset(str(tiny_gemma3))


def test_the_packer_conserves_tokens_and_is_deterministic(model):
    tokenizer = model.preprocessor.tokenizer
    split = data_lib.pack(DOCS, tokenizer, 16)
    again = data_lib.pack(DOCS, tokenizer, 16)
    assert all(np.array_equal(a, b) for a, b in zip((split.tokens, split.segments, split.loss_mask),
                                                     (again.tokens, again.segments, again.loss_mask)))
    docs = [[tokenizer.start_token_id, *map(int, ids), tokenizer.end_token_id] for ids in tokenizer([d["text"] for d in DOCS])]
    stream = [t for d in docs for t in d]
    rebuilt = list(split.tokens[0, : split.lengths[0]])
    for r in range(1, len(split.tokens)):  # rows overlap by one token: each row starts where the last ended
        assert split.tokens[r, 0] == rebuilt[-1]
        rebuilt += list(split.tokens[r, 1 : split.lengths[r]])
    assert rebuilt == stream
    assert (split.lengths[:-1] == 17).all()  # full rows: padding only at the very end
    # Every token is a target once, except the BOS of a following document.
    assert split.loss_mask.sum() == len(stream) - 1 - (len(DOCS) - 1)
    owners = [i for i, d in enumerate(docs) for _ in d]
    for r in range(len(split.tokens)):
        n = split.lengths[r] - 1
        assert list(split.segments[r, :n]) == owners[16 * r : 16 * r + n]


def _logits(model, x, segments=None):
    inputs = {"token_ids": x, "padding_mask": np.ones_like(x)}
    if segments is not None:
        inputs["segment_ids"] = segments
    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])
    with document_attention(model.backbone, inputs) as plain:
        logits, _ = model.stateless_call(*state, plain)
    return np.asarray(logits)


def test_a_packed_documents_logits_equal_the_document_alone(model):
    tokenizer = model.preprocessor.tokenizer
    first, second = ([tokenizer.start_token_id, *map(int, ids), tokenizer.end_token_id]
                     for ids in tokenizer([DOCS[0]["text"], DOCS[2]["text"]]))
    packed = np.asarray([first + second], dtype=np.int32)
    segments = np.asarray([[0] * len(first) + [1] * len(second)], dtype=np.int32)
    alone = _logits(model, np.asarray([second], dtype=np.int32))[0]
    masked = _logits(model, packed, segments)[0, len(first):]
    np.testing.assert_allclose(masked, alone, atol=2e-5, rtol=0)
    unmasked = _logits(model, packed)[0, len(first):]
    assert np.abs(unmasked - alone).max() > 1e-3  # without the mask, the second document sees the first


def test_chat_loss_covers_exactly_the_assistant_tokens(model):
    tokenizer = model.preprocessor.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there?"},
                {"role": "assistant", "content": "Hello friend."}, {"role": "user", "content": "Sum of 2 and 2?"},
                {"role": "assistant", "content": "It is 4."}]
    segments = render_chat(messages, families.of_model(model).chat)
    split = data_lib.tokenize([{"segments": segments}], tokenizer, 96)
    targets = split.tokens[0, 1 : split.lengths[0]]
    scored = [int(t) for t, m in zip(targets, split.loss_mask[0]) if m]
    expected = [int(t) for text, loss in segments if loss for t in tokenizer(text)] + [tokenizer.end_token_id]
    assert scored == expected
    assert tokenizer.detokenize(np.asarray(scored[:-1])).replace("<end_of_turn>", "|") .count("|") == 2
