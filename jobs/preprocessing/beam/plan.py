"""The split and the shards of the Beam engine, decided from a histogram of the order keys (no Beam here: pure
functions, tested on their own).

The single-machine stage sorts every kept row by its order key and writes the first `n_eval` to eval and the next
`limit - n_eval` to train. Sorting a corpus on one worker does not scale, so the Beam engine counts rows per
16-bit key prefix, finds the prefix bucket that holds each cut (rank `n_eval`, rank `limit`), sorts that bucket's
keys alone to find the exact cut key, and sends every row to its split and to a shard by its key's place in the
split's key range. Shards are contiguous key ranges sorted within, so reading them in index order gives exactly the
single-machine stage's hash order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PREFIX_BYTES = 2  # 65,536 buckets: a cut sorts ~1/65,536 of the keys
SHARD_BYTES = 64 << 20  # default target size of a written shard; a shard is assembled in one worker's memory
FULL = 1 << 64


def prefix(key: bytes) -> int:
    return int.from_bytes(key[:PREFIX_BYTES], "big")


@dataclass(frozen=True)
class Cut:
    """The first key past a cut: the key of rank `rank` inside prefix bucket `bucket`."""

    bucket: int
    rank: int


def locate(hist: dict[int, tuple[int, int]], rank: int) -> Cut | None:
    """Where the key of global rank `rank` lies (None: no key has that rank, the cut is past the end)."""
    seen = 0
    for bucket in sorted(hist):
        count = hist[bucket][0]
        if seen + count > rank:
            return Cut(bucket, rank - seen)
        seen += count
    return None


def shard_count(rows: int, kept: int, kept_bytes: int, shard_bytes: int = SHARD_BYTES) -> int:
    """Shards for a split of `rows` rows out of `kept` rows of `kept_bytes` bytes: about `shard_bytes` each."""
    if not rows or not kept:
        return 1
    return max(1, math.ceil(kept_bytes * rows / kept / shard_bytes))


@dataclass
class Plan:
    kept: int
    limit: int
    n_eval: int
    cuts: dict[str, Cut | None]  # "eval", "limit": where the eval split and the written rows end
    shards: dict[str, int]
    ends: dict[str, bytes | None] = field(default_factory=dict)  # the exact first key past each cut

    @classmethod
    def from_histogram(cls, hist: dict[int, tuple[int, int]], limit: int, n_eval: int,
                       shard_bytes: int = SHARD_BYTES) -> Plan:
        kept = sum(count for count, _ in hist.values())
        kept_bytes = sum(size for _, size in hist.values())
        return cls(kept, limit, n_eval, {"eval": locate(hist, n_eval), "limit": locate(hist, limit)},
                   {"eval": shard_count(n_eval, kept, kept_bytes, shard_bytes),
                    "train": shard_count(limit - n_eval, kept, kept_bytes, shard_bytes)})

    def cut_buckets(self) -> set[int]:
        return {cut.bucket for cut in self.cuts.values() if cut is not None}

    def settle(self, bucket_keys: dict[int, list[bytes]]) -> Plan:
        """The exact cut keys from the sorted keys of the cut buckets."""
        for name, cut in self.cuts.items():
            self.ends[name] = None if cut is None else sorted(bucket_keys[cut.bucket])[cut.rank]
        return self

    def split_of(self, key: bytes) -> str | None:
        """"eval", "train", or None for a row past --max-examples."""
        if self.ends["eval"] is None or key < self.ends["eval"]:
            return "eval"
        if self.ends["limit"] is None or key < self.ends["limit"]:
            return "train"
        return None

    def shard_of(self, split: str, key: bytes) -> int:
        """Monotone in the key: shard i holds a contiguous key range, below shard i+1's."""
        low_key = None if split == "eval" else self.ends["eval"]
        high_key = self.ends["eval"] if split == "eval" else self.ends["limit"]
        low = int.from_bytes(low_key[:8], "big") if low_key else 0
        high = int.from_bytes(high_key[:8], "big") if high_key else FULL
        count = self.shards[split]
        return min(count - 1, (int.from_bytes(key[:8], "big") - low) * count // max(1, high - low))
