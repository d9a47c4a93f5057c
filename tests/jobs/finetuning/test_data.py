"""Length-bucketed batching: same data, less padding, order still a pure function of (step, seed)."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.common.lm import bucket_width
from jobs.finetuning import data as data_lib


def _split(lengths: list[int], sequence_length: int = 128) -> data_lib.TokenizedSplit:
    n = len(lengths)
    tokens = np.zeros((n, sequence_length + 1), np.int32)
    mask = np.zeros((n, sequence_length), np.float32)
    for i, length in enumerate(lengths):
        tokens[i, :length] = np.arange(1, length + 1)
        mask[i, length // 2 : length - 1] = 1.0
    return data_lib.TokenizedSplit(tokens, np.asarray(lengths, np.int32), mask, 0)


@pytest.mark.parametrize("longest,width", [(1, 32), (32, 32), (33, 64), (100, 128), (129, 128), (5000, 128)])
def test_bucket_width(longest, width):
    assert bucket_width(longest, 128) == width


def test_each_epoch_covers_every_row_in_full_batches():
    lengths = np.random.default_rng(0).integers(5, 120, size=100)
    plan = data_lib.BatchPlan(lengths, batch_size=8, seed=3)
    per_epoch = data_lib.steps_per_epoch(100, 8)
    epoch = np.concatenate([plan.indices(s) for s in range(per_epoch)])
    assert all(len(plan.indices(s)) == 8 for s in range(per_epoch))
    assert set(epoch.tolist()) == set(range(100)) and len(epoch) == per_epoch * 8  # 4 rows repeat to fill the last batch
    second = np.concatenate([plan.indices(s) for s in range(per_epoch, 2 * per_epoch)])
    assert not np.array_equal(epoch, second)  # a new order every epoch


def test_order_is_a_pure_function_of_step_and_seed():
    lengths = np.random.default_rng(1).integers(5, 120, size=50)
    sequential = data_lib.BatchPlan(lengths, 4, seed=7)
    walked = [sequential.indices(s) for s in range(30)]
    resumed = data_lib.BatchPlan(lengths, 4, seed=7)  # a fresh process resuming at step 17
    assert all(np.array_equal(resumed.indices(s), walked[s]) for s in (17, 3, 29))
    assert not np.array_equal(data_lib.BatchPlan(lengths, 4, seed=8).indices(0), walked[0])


def test_bucketing_cuts_padding_on_skewed_lengths():
    # Mostly short rows with a long tail, like instruction data.
    lengths = np.clip(np.random.default_rng(2).lognormal(3.5, 0.6, size=800).astype(int), 4, 129)
    split = _split(lengths.tolist())
    steps = data_lib.steps_per_epoch(800, 8)
    def padded(by_length: bool) -> int:
        plan = data_lib.BatchPlan(split.lengths, 8, seed=0, by_length=by_length)
        return sum(data_lib.make_batch(split, plan.indices(s), by_length)[0]["token_ids"].size for s in range(steps))
    assert padded(True) * 1.5 < padded(False)
    widths = {data_lib.make_batch(split, data_lib.BatchPlan(split.lengths, 8, 0).indices(s))[0]["token_ids"].shape[1] for s in range(steps)}
    assert widths <= {32, 64, 128}  # few shapes: few compilations


def test_a_bucketed_batch_is_the_prefix_of_the_full_width_batch():
    split = _split([10, 40, 25, 3])
    indices = np.array([0, 1, 2, 3])
    (x, y, w), (fx, fy, fw) = (data_lib.make_batch(split, indices, b) for b in (True, False))
    width = x["token_ids"].shape[1]
    assert width == 64 and fx["token_ids"].shape[1] == 128
    np.testing.assert_array_equal(x["token_ids"], fx["token_ids"][:, :width])
    np.testing.assert_array_equal(y, fy[:, :width])
    np.testing.assert_array_equal(x["padding_mask"], fx["padding_mask"][:, :width])
    assert w.sum() == fw.sum()  # no loss weight falls outside the bucket


def test_bucketed_eval_equals_full_width_eval(tiny_gemma3):
    import keras_hub

    from jobs.contract.configs.finetune import FinetuneConfig
    from jobs.finetuning.distribution import setup
    from jobs.finetuning.train import Trainer, make_optimizer

    model = keras_hub.models.CausalLM.from_preset(str(tiny_gemma3))
    model.backbone.enable_lora(2)
    config = FinetuneConfig(data="unused", output="unused", sequence_length=64)
    trainer = Trainer(model, make_optimizer(config, 10)[0], setup("none", 1, 3))
    split = _split([5, 60, 17, 33, 9, 41, 12], sequence_length=64)
    split.tokens[split.tokens >= 300] = 7  # stay inside the tiny vocabulary
    bucketed, full = trainer.evaluate(split, 3, bucket=True), trainer.evaluate(split, 3, bucket=False)
    assert bucketed["tokens"] == full["tokens"]
    assert bucketed["loss"] == pytest.approx(full["loss"], rel=1e-5)


class Gemma3Tokenizer:
    """A stand-in with the keras-hub tokenizer's surface the tokenizer code uses: ids per character-ish word. Its
    class name is keras-hub's Gemma 3 tokenizer's: the model family (its end-of-turn marker) is looked up by it."""

    start_token_id, end_token_id, pad_token_id = 2, 1, 0
    END = 106

    def __init__(self, splits_marker: bool = False, has_marker: bool = True) -> None:
        self.splits_marker, self.has_marker = splits_marker, has_marker

    def token_to_id(self, token: str) -> int:
        if not self.has_marker:
            raise KeyError(token)
        return self.END

    def __call__(self, texts: list[str]) -> list[list[int]]:
        out = []
        for text in texts:
            body, marker, _ = text.partition("<end_of_turn>")
            ids = [10 + (ord(c) % 50) for c in body]
            out.append(ids + ([7, 8] if self.splits_marker else [self.END]) if marker else ids)
        return out


ROWS = [{"prompt": "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "response": "Hello<end_of_turn>"},
        {"segments": [["<start_of_turn>user\nA<end_of_turn>\n<start_of_turn>model\n", False], ["B<end_of_turn>", True],
                      ["\n<start_of_turn>user\nC<end_of_turn>\n<start_of_turn>model\n", False], ["D<end_of_turn>", True]]}]


@pytest.mark.parametrize("row", ROWS, ids=["instruction", "chat"])
def test_every_answer_ends_with_a_scored_end_of_turn(row):
    split = data_lib.tokenize([row], Gemma3Tokenizer(), 64)
    targets = split.tokens[0, 1 : split.lengths[0]]
    mask = split.loss_mask[0, : split.lengths[0] - 1]
    ends = np.flatnonzero(targets == Gemma3Tokenizer.END)
    answers = sum(1 for _, loss in data_lib.rows_lib.segments_of(row) if loss)
    scored_ends = [p for p in ends if mask[p] == 1.0]
    assert len(scored_ends) == answers >= 1  # every answer's end of turn is a loss target; the prompt's are not
    assert mask[len(targets) - 1] == 1.0 and targets[-1] == Gemma3Tokenizer.end_token_id  # and the EOS after the last


def test_an_answer_without_its_end_of_turn_is_refused_naming_the_row():
    from jobs.contract.errors import BadInputError

    rows = [ROWS[0], {**ROWS[0], "response": "Hello, and no end"}]
    with pytest.raises(BadInputError, match=r"--data: got \"row 2: an answer ending 'Hello, and no end'\"; expected "
                                            r"every response and assistant turn to end with <end_of_turn>"):
        data_lib.tokenize(rows, Gemma3Tokenizer(), 64)


@pytest.mark.parametrize(("tokenizer", "message"), [
    (Gemma3Tokenizer(splits_marker=True), "a tokenizer that keeps <end_of_turn> as one token .it split it in row 1"),
    (Gemma3Tokenizer(has_marker=False), "a tokenizer with <end_of_turn> as one token")])
def test_a_tokenizer_that_cannot_stop_is_refused(tokenizer, message):
    from jobs.contract.errors import BadInputError

    with pytest.raises(BadInputError, match=f"tokenizer: got 'Gemma3Tokenizer'; expected {message}"):
        data_lib.tokenize(ROWS[:1], tokenizer, 64)
