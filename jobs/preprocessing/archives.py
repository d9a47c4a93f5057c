"""Compressed inputs: gzip, bz2, xz and zstd read transparently, known by their magic bytes (the extension is a hint
that must agree). A corrupt or truncated archive is a bad input that names the codec, not a UTF-8 error."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import io
import lzma
import zlib
from pathlib import Path
from typing import BinaryIO

from jobs.contract.errors import BadInputError

# codec -> (magic bytes, file suffixes)
CODECS: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "gzip": (b"\x1f\x8b", (".gz", ".gzip")),
    "bz2": (b"BZh", (".bz2",)),
    "xz": (b"\xfd7zXZ\x00", (".xz",)),
    "zstd": (b"\x28\xb5\x2f\xfd", (".zst", ".zstd")),
}
SUFFIXES = tuple(suffix for _, suffixes in CODECS.values() for suffix in suffixes)


def strip_suffix(name: str) -> str:
    """`data.jsonl.gz` -> `data.jsonl`: what format detection looks at."""
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def sniff(path: Path) -> str | None:
    """The codec of a file by its magic bytes alone (None: plain, or claimed by name only)."""
    with path.open("rb") as handle:
        head = handle.read(6)
    return next((codec for codec, (magic, _) in CODECS.items() if head.startswith(magic)), None)


def codec_of(path: Path, name: str) -> str | None:
    """The codec a file is compressed with, from its first bytes; None for a plain file; exit 2 when the name
    claims a codec the bytes do not have."""
    if (codec := sniff(path)) is not None:
        return codec
    with path.open("rb") as handle:
        head = handle.read(6)
    claimed = next((codec for codec, (_, suffixes) in CODECS.items() if name.lower().endswith(suffixes)), None)
    if claimed is not None:
        raise BadInputError("--input", name, f"a {claimed} archive (the file name ends in {name[len(strip_suffix(name)):]})",
                            f"its first bytes {head!r} are not {claimed}'s magic bytes {CODECS[claimed][0]!r}")
    return None


ARCHIVE_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, lzma.LZMAError, zlib.error)


def _zstd_errors() -> tuple[type[BaseException], ...]:
    try:
        import zstandard
    except ImportError:
        return ()
    return (zstandard.ZstdError,)


class _Checked(io.RawIOBase):
    """Turns a decompressor's error, wherever in the stream it comes, into a BadInputError naming the archive."""

    def __init__(self, inner: BinaryIO, codec: str, name: str) -> None:
        self._inner, self._codec, self._name = inner, codec, name
        self._errors = ARCHIVE_ERRORS + _zstd_errors()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        try:
            return self._inner.readinto(buffer)  # type: ignore[attr-defined]
        except self._errors as err:
            raise BadInputError("--input", self._name, f"a complete, valid {self._codec} archive",
                                f"the archive is corrupt or truncated: {err}") from err

    def close(self) -> None:
        self._inner.close()
        super().close()


class _Zstd(io.RawIOBase):
    """zstd frames one after another. zstandard's own stream reader returns what it has at a cut-off frame
    without an error; this one raises at the end of the file when the last frame is incomplete."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self._zstd, self._file = zstandard, path.open("rb")
        self._obj, self._pending, self._started = zstandard.ZstdDecompressor().decompressobj(), b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = self._file.read(1 << 16)
            if not chunk:
                if self._started and not self._obj.eof:
                    raise EOFError("the last zstd frame is cut short")
                return 0
            while chunk:
                self._started = True
                self._pending += self._obj.decompress(chunk)
                chunk = self._obj.unused_data if self._obj.eof else b""
                if chunk or self._obj.eof:  # the next frame, if the file goes on
                    leftover, self._obj = chunk, self._zstd.ZstdDecompressor().decompressobj()
                    self._started = bool(leftover)
                    chunk = leftover
        size = min(len(buffer), len(self._pending))
        buffer[:size], self._pending = self._pending[:size], self._pending[size:]
        return size

    def close(self) -> None:
        self._file.close()
        super().close()


def _decompressor(path: Path, codec: str, name: str) -> BinaryIO:
    if codec == "gzip":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if codec == "bz2":
        return bz2.open(path, "rb")  # type: ignore[return-value]
    if codec == "xz":
        return lzma.open(path, "rb")  # type: ignore[return-value]
    if importlib.util.find_spec("zstandard") is None:
        raise BadInputError("--input", name, "a codec this image can read (gzip, bz2, xz)",
                            "zstd needs the zstandard package (in the preprocess extra)")
    return _Zstd(path)  # type: ignore[return-value]


def open_input(path: Path, name: str) -> BinaryIO:
    """A binary stream of the file's content, decompressed when it is an archive."""
    codec = codec_of(path, name)
    if codec is None:
        return path.open("rb")
    return io.BufferedReader(_Checked(_decompressor(path, codec, name), codec, name), buffer_size=1 << 20)  # type: ignore[return-value]
