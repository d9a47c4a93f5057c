"""Read dataset rows from JSONL, JSON, CSV, Parquet, `hf://datasets/...` or the built-in demo set.

Each reader yields `Record`s; a record that cannot be parsed carries an error and its location
(`file:line`) so the caller can fail or quarantine it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from jobs.contract.errors import BadInputError
from jobs.preprocessing.archives import codec_of, open_input, strip_suffix
from jobs.preprocessing.demo import DEMO_TEXT_URI, DEMO_URI, demo_rows, demo_text_rows
from jobs.preprocessing.modes import split_text

FORMATS = ("jsonl", "json", "csv", "parquet", "txt")


@dataclass
class Record:
    location: str
    data: dict[str, Any] | None
    error: str | None = None
    raw: str = ""


def detect_format(uri: str, declared: str) -> str:
    if declared != "auto":
        if declared not in FORMATS:
            raise BadInputError("--input-format", declared, f"auto or one of {', '.join(FORMATS)}")
        return declared
    name = strip_suffix(uri.lower())
    for fmt, suffixes in {"jsonl": (".jsonl", ".ndjson"), "json": (".json",), "csv": (".csv",), "parquet": (".parquet", ".pq"),
                          "txt": (".txt", "/")}.items():
        if name.endswith(suffixes):
            return fmt
    raise BadInputError("--input", uri, "a file ending in .jsonl, .json, .csv, .parquet or .txt (optionally compressed: "
                        ".gz, .bz2, .xz, .zst), or a folder ending in / of .txt files (of another format: set --input-format)")


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise BadInputError(
            "--input", where, "UTF-8 text", f"byte offset {err.start} (line {line}) holds {data[err.start:err.start + 1]!r}, which is not valid UTF-8"
        ) from err


def _lines(path: Path, name: str) -> Iterator[tuple[int, bytes]]:
    """(byte offset in the decompressed content, raw line): files are streamed, never read whole."""
    offset = 0
    with open_input(path, name) as handle:
        for raw in handle:
            yield offset, raw
            offset += len(raw)


def read_jsonl(path: Path, name: str) -> Iterator[Record]:
    for number, (start, raw) in enumerate(_lines(path, name), start=1):
        where = f"{name}:{number}"
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            yield Record(where, None, f"not valid UTF-8 at byte offset {start + err.start}", raw.decode("utf-8", "replace"))
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            yield Record(where, None, f"malformed JSON: {err.msg} at column {err.colno}", text.rstrip("\n"))
            continue
        if not isinstance(value, dict):
            yield Record(where, None, f"expected a JSON object, got {type(value).__name__}", text.rstrip("\n"))
            continue
        yield Record(where, value)


def read_json(path: Path, name: str) -> Iterator[Record]:
    # A JSON array is parsed whole (the standard library has no streaming parser): JSONL is the format for big data.
    with open_input(path, name) as handle:
        text = _decode(handle.read(), name)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadInputError("--input", f"{name}:{err.lineno}", "a JSON array of objects", f"malformed JSON: {err.msg} at column {err.colno}") from err
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise BadInputError("--input", name, "a JSON array of objects (or an object with a 'data' array)")
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        if isinstance(item, dict):
            yield Record(where, item)
        else:
            yield Record(where, None, f"expected a JSON object, got {type(item).__name__}", json.dumps(item))


def _text_lines(path: Path, name: str) -> Iterator[str]:
    """Decoded lines for the csv module; bad UTF-8 anywhere makes the whole file unreadable, named by offset and line."""
    for number, (start, raw) in enumerate(_lines(path, name), start=1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise BadInputError("--input", name, "UTF-8 text", f"byte offset {start + err.start} (line {number}) holds "
                                f"{raw[err.start:err.start + 1]!r}, which is not valid UTF-8") from err


def read_csv(path: Path, name: str) -> Iterator[Record]:
    reader = csv.reader(_text_lines(path, name))
    header = next(reader, None)
    if not header:
        raise BadInputError("--input", name, "a CSV file with a header row")
    for row in reader:
        where = f"{name}:{reader.line_num}"
        if not row:
            continue
        if len(row) != len(header):
            yield Record(where, None, f"expected {len(header)} fields, got {len(row)}", ",".join(row))
        else:
            yield Record(where, dict(zip(header, row)))


def read_parquet(path: Path, name: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    if (codec := codec_of(path, name)) is not None:
        raise BadInputError("--input", name, "a Parquet file as written (Parquet compresses its own pages)",
                            f"the file is a {codec} archive; decompress it first")
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        index = 0
        for batch in batches:  # one row group's batch at a time: bounded memory on big files
            for row in batch.to_pylist():
                yield Record(f"{name}[row {index}]", row)
                index += 1
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise BadInputError("--input", name, "a readable Parquet file", str(err)) from err


def read_hf(uri: str, split: str) -> Iterator[Record]:
    dataset_id = uri.removeprefix("hf://datasets/").strip("/")
    if not dataset_id or uri == dataset_id:
        raise BadInputError("--input", uri, "hf://datasets/ORG/NAME")
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        data = datasets.load_dataset(dataset_id, split=split)
    except DatasetNotFoundError as err:
        raise BadInputError("--input", uri, "an existing Hugging Face dataset you can access", str(err)) from err
    except (ConnectionError, OSError) as err:
        if getattr(getattr(err, "response", None), "status_code", None) in (401, 403):  # a retry cannot help
            raise BadInputError("--input", uri, "a Hugging Face dataset that HF_TOKEN can read", str(err)) from err
        # offline or network trouble: worth a retry
        raise RuntimeError(
            f"could not download {uri} from the Hugging Face Hub ({err}); check network access and HF_TOKEN, "
            "or copy the data to gs:// or a local file"
        ) from err
    except ValueError as err:  # unknown split or config
        raise BadInputError("--hf-split", split, f"a split of {dataset_id}", str(err)) from err
    for index, row in enumerate(data):
        yield Record(f"{uri}[{split}][{index}]", dict(row))


SUFFIXES = {"jsonl": (".jsonl", ".ndjson"), "json": (".json",), "csv": (".csv",), "parquet": (".parquet", ".pq"),
            "txt": (".txt",)}


def ordered(names: list[str], fmt: str) -> list[str]:
    """The files of a folder input that hold `fmt` (by name, compressed or not), in reading order: by path parts, so
    a local folder and a gs:// prefix listing read in the same order on every engine."""
    return sorted((n for n in names if strip_suffix(n.lower()).endswith(SUFFIXES[fmt])), key=lambda n: PurePosixPath(n).parts)


def input_files(uri: str, local: Path, fmt: str) -> list[tuple[Path, str]]:
    """(local file, name in locations) of each file an input names: itself, or a folder's files of its format."""
    if not local.is_dir():
        return [(local, uri)]
    names = ordered([p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()], fmt)
    if not names:
        raise BadInputError("--input", uri, f"a .{fmt} file or a folder holding {' or '.join(SUFFIXES[fmt])} files")
    return [(local / name, f"{uri.rstrip('/')}/{name}") for name in names]


def read_file(path: Path, name: str, fmt: str, text_field: str = "text", sample_by: str = "paragraph") -> Iterator[Record]:
    """The records of one file; `name` is how locations name it."""
    if fmt != "txt":
        yield from READERS[fmt](path, name)
        return
    with open_input(path, name) as handle:
        text = _decode(handle.read(), name)
    for index, piece in enumerate(split_text(text, sample_by)):
        yield Record(f"{name}[{sample_by} {index}]" if sample_by != "document" else name, {text_field: piece})


READERS = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv, "parquet": read_parquet}


def read_records(uri: str, local: Path | None, fmt: str, hf_split: str, text_field: str = "text",
                 sample_by: str = "paragraph") -> Iterator[Record]:
    if uri == DEMO_URI:
        for index, row in enumerate(demo_rows()):
            yield Record(f"{DEMO_URI}[{index}]", row)
    elif uri == DEMO_TEXT_URI:
        for row in demo_text_rows():
            yield Record(row["source"], {text_field: row["text"]})
    elif uri.startswith("hf://"):
        yield from read_hf(uri, hf_split)
    else:
        assert local is not None
        for path, name in input_files(uri, local, fmt):
            yield from read_file(path, name, fmt, text_field, sample_by)
