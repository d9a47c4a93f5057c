from __future__ import annotations

import pytest

from jobs.contract import splits
from jobs.contract.errors import BadInputError


def test_a_split_is_one_file_or_a_complete_set_of_shards_in_order():
    shards = [splits.shard_name("train", i, 3) for i in (2, 0, 1)]
    assert splits.files(["train.jsonl", "eval.jsonl", "stats.json"], "train", "p") == ["train.jsonl"]
    assert splits.files([*shards, "eval-00000-of-00001.jsonl"], "train", "p") == sorted(shards)
    assert splits.files(["train.jsonl"], "eval", "p") == []


@pytest.mark.parametrize("names,message", [
    (["train.jsonl", "train-00000-of-00001.jsonl"], "both train.jsonl and train-00000-of-00001.jsonl"),
    (["train-00000-of-00003.jsonl", "train-00002-of-00003.jsonl"], "a complete set of train shards"),
    (["train-00000-of-00002.jsonl", "train-00001-of-00003.jsonl"], "a complete set of train shards"),
])
def test_a_mixed_or_incomplete_set_is_refused(names, message):
    with pytest.raises(BadInputError, match=message):
        splits.files(names, "train", "gs://b/pre")
