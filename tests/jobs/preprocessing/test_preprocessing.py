from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from jobs.contract.artifacts import MANIFEST
from jobs.contract.configs.preprocess import PreprocessConfig
from jobs.contract.errors import BadInputError
from jobs.preprocessing.core import run
from jobs.preprocessing.demo import DEMO_URI, demo_rows
from jobs.preprocessing.rows import DROP_REASONS
from tests.conftest import run_module

GOOD = [{"instruction": f"Question number {i}?", "response": f"Answer {i}."} for i in range(20)]


def _jsonl(path: Path, lines: list[str | dict | bytes]) -> Path:
    with path.open("wb") as handle:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            handle.write(line if isinstance(line, bytes) else line.encode())
            handle.write(b"\n")
    return path


def _config(tmp_path: Path, model: Path, source: Path | str, **kwargs) -> PreprocessConfig:
    return PreprocessConfig(input=str(source), output=str(tmp_path / "out"), base_model=str(model), **kwargs)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_messy_jsonl_counts_and_quarantine(tmp_path, tiny_gemma3):
    source = _jsonl(tmp_path / "d.jsonl", [
        *GOOD,
        '{"instruction": "broken",',                                   # malformed
        GOOD[0],                                                       # exact duplicate
        {"instruction": "  question NUMBER 1? ", "response": "answer   1."},  # duplicate after normalising
        {"instruction": "   ", "response": "x"},                        # empty prompt
        {"instruction": "y", "response": ""},                           # empty response
        {"instruction": "long " * 400, "response": "too long"},         # over-long
        b'{"instruction": "caf\xe9", "response": "latin-1"}',           # not UTF-8
        '[1, 2]',                                                      # not an object
    ])
    result = run(_config(tmp_path, tiny_gemma3, source, on_bad_record="skip", max_tokens=128), tmp_path / "work")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rows_in"] == 28
    assert stats["dropped"] == {**dict.fromkeys(DROP_REASONS, 0), "bad_record": 3, "empty": 2, "duplicate": 2, "too_long": 1}
    assert stats["rows_out"] == 20 and stats["train_rows"] + stats["eval_rows"] == 20 and stats["eval_rows"] == 2
    assert stats["token_length"]["max"] <= 128
    quarantine = _read(tmp_path / "out" / "quarantine.jsonl")
    assert [q["location"] for q in quarantine] == [f"{source}:21", f"{source}:27", f"{source}:28"]
    assert "malformed JSON" in quarantine[0]["reason"]
    assert "byte offset" in quarantine[1]["reason"] and "UTF-8" in quarantine[1]["reason"]
    assert result["metrics"]["rows_out"] == 20
    assert (tmp_path / "out" / MANIFEST).exists()
    rows = _read(tmp_path / "out" / "train.jsonl")
    assert rows[0]["prompt"].startswith("<start_of_turn>user\n") and rows[0]["prompt"].endswith("<start_of_turn>model\n")
    assert rows[0]["response"].endswith("<end_of_turn>")


def test_fail_mode_names_file_and_line(tmp_path, tiny_gemma3):
    source = _jsonl(tmp_path / "d.jsonl", [*GOOD[:3], "{oops"])
    with pytest.raises(BadInputError, match=r"d\.jsonl:4.*malformed JSON"):
        run(_config(tmp_path, tiny_gemma3, source), tmp_path / "work")
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_split_is_deterministic_per_seed(tmp_path, tiny_gemma3):
    source = _jsonl(tmp_path / "d.jsonl", GOOD)

    def split(seed: int, name: str) -> list[str]:
        cfg = PreprocessConfig(input=str(source), output=str(tmp_path / name), base_model=str(tiny_gemma3), seed=seed, eval_fraction=0.25)
        run(cfg, tmp_path / "work")
        return [r["prompt"] for r in _read(tmp_path / name / "eval.jsonl")]

    assert split(1, "a") == split(1, "b")
    assert split(1, "a") != split(2, "c")
    assert len(split(1, "a")) == 5


def test_missing_fields_list_existing_columns(tmp_path, tiny_gemma3):
    source = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(BadInputError, match="instruction, response.*columns that exist.*question, answer"):
        run(_config(tmp_path, tiny_gemma3, source), tmp_path / "work")


def test_template_with_unknown_placeholder(tmp_path, tiny_gemma3):
    source = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(BadInputError, match="topic.*question, answer"):
        run(_config(tmp_path, tiny_gemma3, source, template="{question} about {topic}", response_field="answer"), tmp_path / "work")


def test_template_and_csv(tmp_path, tiny_gemma3):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "topic", "answer"])
        for i in range(6):
            writer.writerow([f"Why {i}?", "math", f"Because {i}."])
    run(_config(tmp_path, tiny_gemma3, path, template="[{topic}] {question}", response_field="answer", chat_format="none", eval_fraction=0.0), tmp_path / "w")
    rows = _read(tmp_path / "out" / "train.jsonl")
    assert len(rows) == 6 and all(r["prompt"].startswith("[math] Why") for r in rows)


def test_json_and_parquet_sources(tmp_path, tiny_gemma3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.json").write_text(json.dumps(GOOD))
    run(PreprocessConfig(
        input=str(tmp_path / "d.json"), output=str(tmp_path / "j"), base_model=str(tiny_gemma3)), tmp_path / "w")
    pq.write_table(pa.Table.from_pylist(GOOD), tmp_path / "d.parquet")
    run(PreprocessConfig(input=str(tmp_path / "d.parquet"), output=str(tmp_path / "p"), base_model=str(tiny_gemma3)), tmp_path / "w")
    for name in ("j", "p"):
        assert json.loads((tmp_path / name / "stats.json").read_text())["rows_out"] == 20


def test_non_utf8_csv_reports_offset(tmp_path, tiny_gemma3):
    (tmp_path / "d.csv").write_bytes(b"instruction,response\nok,fine\ncaf\xe9,bad\n")
    with pytest.raises(BadInputError, match=r"byte offset 32 \(line 3\).*not valid UTF-8"):
        run(_config(tmp_path, tiny_gemma3, tmp_path / "d.csv"), tmp_path / "w")


def test_no_rows_left_reports_reasons(tmp_path, tiny_gemma3):
    source = _jsonl(tmp_path / "d.jsonl", [{"instruction": "long " * 300, "response": "x"}, {"instruction": "", "response": "y"}])
    with pytest.raises(BadInputError, match="dropped per reason: .*'empty': 1.*'too_long': 1"):
        run(_config(tmp_path, tiny_gemma3, source, max_tokens=64), tmp_path / "w")


def test_cap_on_examples(tmp_path, tiny_gemma3):
    source = _jsonl(tmp_path / "d.jsonl", GOOD)
    run(_config(tmp_path, tiny_gemma3, source, max_examples=7), tmp_path / "w")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rows_out"] == 7 and stats["dropped"]["over_cap"] == 13


def test_demo_dataset_is_real_and_deterministic():
    rows = list(demo_rows())
    assert len(rows) > 500
    assert rows == list(demo_rows())
    by_source = {r["source"]: r for r in rows}
    assert "os.path.join" in by_source
    assert "Join" in by_source["os.path.join"]["response"]


def test_rerun_is_skipped_and_cli_errors(tmp_path, tiny_gemma3):
    source = _jsonl(tmp_path / "d.jsonl", GOOD)
    args = ["--input", str(source), "--output", str(tmp_path / "out"), "--base-model", str(tiny_gemma3)]
    first = run_module("jobs.preprocessing", *args)
    assert first.returncode == 0, first.stdout + first.stderr
    second = run_module("jobs.preprocessing", *args)
    assert second.returncode == 0 and "SKIPPED" in second.stdout
    unknown = run_module("jobs.preprocessing", *args, "--no-such-flag", "1")
    assert unknown.returncode == 2 and "unrecognized arguments: --no-such-flag" in unknown.stderr
    bad = run_module("jobs.preprocessing", *args, "--eval-fraction", "1.5")
    assert bad.returncode == 2 and "--eval-fraction: got 1.5; expected a number in [0, 1)" in bad.stdout


def test_gcs_in_and_out(gcs, tmp_path, tiny_gemma3):
    from jobs.common import storage

    source = _jsonl(tmp_path / "d.jsonl", GOOD)
    storage.write_bytes(f"{gcs}/raw/d.jsonl", source.read_bytes())
    cfg = PreprocessConfig(input=f"{gcs}/raw/d.jsonl", output=f"{gcs}/runs/r1/preprocess", base_model=str(tiny_gemma3))
    run(cfg, tmp_path / "w1")
    files = storage.list_files(f"{gcs}/runs/r1/preprocess")
    assert {"train.jsonl", "eval.jsonl", "stats.json", MANIFEST} <= set(files)


def test_demo_source_end_to_end(tmp_path, tiny_gemma3):
    run(PreprocessConfig(input=DEMO_URI, output=str(tmp_path / "out"), base_model=str(tiny_gemma3), max_tokens=160), tmp_path / "w")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rows_out"] > 100 and stats["eval_rows"] > 10


def test_hf_dataset_offline_gives_clear_error(tmp_path, tiny_gemma3, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Read at import: a suite that imported them before would otherwise try the network (20 s of timeouts here).
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="could not download hf://datasets/someorg/somedata.*network access"):
        run(_config(tmp_path, tiny_gemma3, "hf://datasets/someorg/somedata"), tmp_path / "w")
    with pytest.raises(BadInputError, match="hf://datasets/ORG/NAME"):
        run(_config(tmp_path, tiny_gemma3, "hf://datasets/"), tmp_path / "w")
