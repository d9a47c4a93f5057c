"""Inputs as they come: compressed files, values of the wrong type or null, too few rows for an eval split, and
input bigger than memory (the disk buckets give the same output as one bucket)."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
from pathlib import Path

import pytest
import zstandard

from jobs.contract.configs.preprocess import PreprocessConfig
from jobs.contract.errors import BadInputError
from jobs.preprocessing import spill
from jobs.preprocessing.core import run
from jobs.preprocessing.rows import percentiles as _percentiles

ROWS = [{"instruction": f"What does helper {i} return?", "response": f"The number {i}."} for i in range(30)]
COMPRESS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress, "zst": zstandard.ZstdCompressor().compress}


def _encoded(fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    if fmt == "json":
        return json.dumps(ROWS).encode()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["instruction", "response"])
    writer.writeheader()
    writer.writerows(ROWS)
    return buffer.getvalue().encode()


def _run(tmp_path: Path, model: Path, source: Path | str, name: str = "out", **kwargs) -> tuple[dict, Path]:
    out = tmp_path / name
    run(PreprocessConfig(input=str(source), output=str(out), base_model=str(model), **kwargs), tmp_path / f"w-{name}")
    return json.loads((out / "stats.json").read_text()), out


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_compressed_inputs_read_like_plain_ones(tmp_path, tiny_gemma3, fmt):
    plain = tmp_path / f"plain.{fmt}"
    plain.write_bytes(_encoded(fmt))
    _, expected = _run(tmp_path, tiny_gemma3, plain, "plain")
    for suffix, compress in COMPRESS.items():
        source = tmp_path / f"data.{fmt}.{suffix}"
        source.write_bytes(compress(_encoded(fmt)))
        stats, out = _run(tmp_path, tiny_gemma3, source, suffix)
        assert stats["rows_out"] == 30, suffix
        for split in ("train.jsonl", "eval.jsonl"):
            assert [r["prompt"] for r in map(json.loads, (out / split).read_text().splitlines())] == \
                   [r["prompt"] for r in map(json.loads, (expected / split).read_text().splitlines())], suffix


def test_compression_is_known_by_its_magic_bytes_whatever_the_name(tmp_path, tiny_gemma3):
    source = tmp_path / "looks-plain.jsonl"
    source.write_bytes(gzip.compress(_encoded("jsonl")))  # the case that used to fail as "not valid UTF-8"
    stats, _ = _run(tmp_path, tiny_gemma3, source)
    assert stats["rows_out"] == 30


@pytest.mark.parametrize("suffix", list(COMPRESS))
def test_a_truncated_archive_is_named_as_such_and_nothing_is_published(tmp_path, tiny_gemma3, suffix):
    data = COMPRESS[suffix](_encoded("jsonl") * 20)
    source = tmp_path / f"cut.jsonl.{suffix}"
    source.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match=rf"(?s)cut\.jsonl\.{suffix}.*valid \w+ archive.*corrupt or truncated"):
        _run(tmp_path, tiny_gemma3, source)
    assert not (tmp_path / "out" / "_manifest.json").exists() and not (tmp_path / "out" / "train.jsonl").exists()


def test_a_name_that_claims_compression_must_be_true(tmp_path, tiny_gemma3):
    source = tmp_path / "data.jsonl.gz"
    source.write_bytes(_encoded("jsonl"))
    with pytest.raises(BadInputError, match="expected a gzip archive.*not gzip's magic bytes"):
        _run(tmp_path, tiny_gemma3, source)


def test_txt_folders_may_hold_compressed_files(tmp_path, tiny_gemma3):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("First document.\n\nSecond paragraph.\n")
    (folder / "b.txt.gz").write_bytes(gzip.compress(b"Third one.\n\nFourth one.\n"))
    stats, _ = _run(tmp_path, tiny_gemma3, f"{folder}/", mode="text", eval_fraction=0.25)
    assert stats["rows_in"] == 4 and stats["rows_out"] == 4


def test_nulls_wrong_types_and_coercions_each_have_a_reason(tmp_path, tiny_gemma3):
    source = tmp_path / "typed.jsonl"
    rows = [
        *ROWS[:10],
        {"instruction": "What is six times seven?", "response": 42},        # number: coerced to text
        {"instruction": "Is it true?", "response": True},                   # boolean: rejected
        {"instruction": "List them.", "response": ["a", "b"]},              # list: rejected
        {"instruction": None, "response": "orphan"},                        # null: dropped
        {"instruction": "Nothing?", "response": float("nan")},              # NaN is null too
        {"instruction": "", "response": "no question"},                     # empty: dropped
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats, out = _run(tmp_path, tiny_gemma3, source, on_bad_record="skip")
    assert stats["dropped"]["wrong_type"] == 2 and stats["dropped"]["null"] == 2 and stats["dropped"]["empty"] == 1
    assert stats["coerced"]["number_to_text"] == 1 and stats["rows_out"] == 11 and stats["quarantined"] == 2
    reasons = [json.loads(line)["reason"] for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert reasons == ["field 'response' holds a boolean (true); expected text", 'field \'response\' holds a list (["a", "b"]); expected text']
    kept = [json.loads(line) for name in ("train.jsonl", "eval.jsonl") for line in (out / name).read_text().splitlines()]
    assert any(r["response"].startswith("42") for r in kept)
    with pytest.raises(BadInputError, match=r"typed\.jsonl:12.*field 'response' holds a boolean"):
        _run(tmp_path, tiny_gemma3, source, "fail")  # fail mode stops at the first wrong type


def test_chat_messages_stored_as_json_text_are_parsed_and_counted(tmp_path, tiny_gemma3):
    source = tmp_path / "chat.csv"
    with source.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages"])
        for i in range(6):
            writer.writerow([json.dumps([{"role": "user", "content": f"Hi {i}?"}, {"role": "assistant", "content": f"Hello {i}."}])])
        writer.writerow(["not json"])
    stats, _ = _run(tmp_path, tiny_gemma3, source, mode="chat", on_bad_record="skip", eval_fraction=0.2)
    assert stats["coerced"]["json_text_to_messages"] == 6 and stats["dropped"]["wrong_type"] == 1 and stats["rows_out"] == 6


def test_too_few_rows_for_the_eval_split_asked_for_is_exit_2_with_the_counts(tmp_path, tiny_gemma3):
    source = tmp_path / "dupes.jsonl"
    source.write_text("".join(json.dumps(ROWS[0]) + "\n" for _ in range(5)))
    with pytest.raises(BadInputError, match=r"--eval-fraction.*1 row\(s\) left.*rows in 5.*'duplicate': 4.*--eval-fraction 0"):
        _run(tmp_path, tiny_gemma3, source)
    assert not (tmp_path / "out" / "_manifest.json").exists()
    stats, _ = _run(tmp_path, tiny_gemma3, source, "no-eval", eval_fraction=0.0)  # the documented way out
    assert stats["train_rows"] == 1 and stats["eval_rows"] == 0


def test_many_disk_buckets_give_exactly_the_one_bucket_output(tmp_path, tiny_gemma3, monkeypatch):
    source = tmp_path / "many.jsonl"
    rows = [{"instruction": f"Question {i % 700}?", "response": f"Answer {i % 700}."} for i in range(1000)]  # 300 dupes
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(spill, "BUCKET_BYTES", 1 << 40)
    one_stats, one = _run(tmp_path, tiny_gemma3, source, "one", max_examples=600)
    monkeypatch.setattr(spill, "BUCKET_BYTES", 1024)  # ~60 buckets for this 60 KB file
    assert spill.bucket_count(source.stat().st_size) > 50
    many_stats, many = _run(tmp_path, tiny_gemma3, source, "many", max_examples=600)
    assert one_stats == many_stats and many_stats["dropped"]["duplicate"] == 300 and many_stats["dropped"]["over_cap"] == 100
    for name in ("train.jsonl", "eval.jsonl"):
        assert (one / name).read_bytes() == (many / name).read_bytes()
    assert not list((tmp_path / "w-many").rglob("*.pkl"))  # the buckets are removed


def test_percentiles_from_a_histogram_are_the_nearest_rank_ones():
    from collections import Counter

    values = [5, 1, 9, 9, 3, 7, 2, 8, 8, 8, 4]
    ordered = sorted(values)
    rank = lambda q: ordered[max(0, -(-int(q * 100) * len(values) // 100) - 1)]  # noqa: E731
    assert _percentiles(Counter(values)) == {"p50": rank(0.5), "p90": rank(0.9), "p95": rank(0.95), "p99": rank(0.99),
                                             "max": 9, "min": 1}
    assert _percentiles(Counter()) == {}


def test_token_counts_are_the_keras_hub_tokenizers_own(tmp_path, tiny_gemma3):
    from jobs.common import sources
    from jobs.preprocessing.core import token_counter
    from jobs.preprocessing.demo import demo_rows
    from jobs.preprocessing.rows import normalise

    texts = [r["instruction"] + "\n\n" + r["response"] for r in list(demo_rows())[:200]] + ["", " ", "é\u00a0日本"]
    for model in (tiny_gemma3, "demo:gemma3-270m"):
        tokenizer = sources.load_tokenizer(str(model), tmp_path)
        assert token_counter(tokenizer)(texts) == [len(ids) for ids in tokenizer(texts)]
    assert normalise(" A\u00a0b\t\nC  ") == "a b c"  # Unicode whitespace, as re's \s
