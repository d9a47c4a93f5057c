"""Disk buckets, so that dedup and the hash-ordered split hold one bucket in memory rather than the dataset.

Hand-written because the job is small (append pickled items to N files, read one file back) and the libraries that
do external hashing and sorting (Beam, Dask, DuckDB) would each be a large dependency of the preprocess image.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

BUCKET_BYTES = 32 << 20  # target size of one bucket on disk; its items in memory are a few times that
MAX_BUCKETS = 512  # two sets open at once stay under the common 1024 open-file limit; past 16 GiB buckets grow


def bucket_count(input_bytes: int | None, default: int = 64) -> int:
    """Enough buckets that each holds about BUCKET_BYTES of input (None: size unknown, e.g. a hub dataset)."""
    if input_bytes is None:
        return default
    return max(1, min(MAX_BUCKETS, input_bytes // BUCKET_BYTES + 1))


class Buckets:
    """`count` append-only files of pickled items; a bucket is read back whole, in the order its items came."""

    def __init__(self, folder: Path, count: int) -> None:
        self.folder, self.count = folder, count
        folder.mkdir(parents=True, exist_ok=True)
        self._handles: dict[int, BinaryIO] = {}
        self.items = 0

    def add(self, index: int, item: Any) -> None:
        handle = self._handles.get(index)
        if handle is None:
            handle = self._handles[index] = (self.folder / f"{index:05d}.pkl").open("ab", buffering=1 << 16)
        pickle.dump(item, handle, protocol=pickle.HIGHEST_PROTOCOL)
        self.items += 1

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def read(self, index: int) -> Iterator[Any]:
        path = self.folder / f"{index:05d}.pkl"
        if not path.exists():
            return
        with path.open("rb") as handle:
            while True:
                try:
                    yield pickle.load(handle)
                except EOFError:
                    return

    def drain(self) -> Iterator[list[Any]]:
        """Each bucket's items in turn, deleting each file once read."""
        self.close()
        for index in range(self.count):
            items = list(self.read(index))
            (self.folder / f"{index:05d}.pkl").unlink(missing_ok=True)
            yield items


def hash_bucket(digest: bytes, count: int) -> int:
    """A bucket from the first 8 bytes of a uniform digest; monotone in the digest, so buckets read in index order
    and sorted within give the global digest order."""
    return int.from_bytes(digest[:8], "big") * count >> 64
