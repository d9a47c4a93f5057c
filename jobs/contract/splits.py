"""A preprocessing output's splits, whichever engine wrote them: `train.jsonl` and `eval.jsonl` (the single-machine
stage) or shards `train-00000-of-00004.jsonl` ... (the Beam engine), which read in index order are the split in the
same hash order. Standard library only: the stage images and the Beam image import it alike."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from jobs.contract.errors import BadInputError

SHARD = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.jsonl$")


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.jsonl"


def files(names: Iterable[str], split: str, where: str) -> list[str]:
    """The names of `split`'s files among `names`, in reading order ([] when the split is absent); exit 2 on an
    incomplete or mixed set, which no retry can fix."""
    names = set(names)
    whole = f"{split}.jsonl"
    shards = sorted((m for n in names if (m := SHARD.match(n)) and m["split"] == split), key=lambda m: m.string)
    if whole in names and shards:
        raise BadInputError("--data", where, f"one {split} split", f"it holds both {whole} and {shards[0].string}...: "
                            "two engines wrote to this prefix; preprocess again into an empty prefix")
    if whole in names:
        return [whole]
    if not shards:
        return []
    counts = {int(m["count"]) for m in shards}
    indices = [int(m["index"]) for m in shards]
    if len(counts) != 1 or indices != list(range(counts.pop())):
        raise BadInputError("--data", where, f"a complete set of {split} shards",
                            f"found {', '.join(m.string for m in shards[:6])}{' ...' if len(shards) > 6 else ''}")
    return [m.string for m in shards]


def paths(data_dir: Path, split: str) -> list[Path]:
    """The split's files in a local copy of a preprocessing output."""
    names = [p.name for p in data_dir.iterdir() if p.is_file()] if data_dir.is_dir() else []
    return [data_dir / name for name in files(names, split, str(data_dir))]
