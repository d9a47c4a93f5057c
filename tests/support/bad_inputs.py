"""The bad-input catalogue's cases and input files (docs in tests/reliability/test_bad_input.py), shared with the Beam
engine's parity test."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from jobs.contract.artifacts import MANIFEST


@dataclass
class Case:
    id: str
    stage: str
    args: list[str]
    expect: list[str]
    output: str = "out"
    setup: list[str] = field(default_factory=list)


CASES = [
    Case("P01", "preprocess", ["--input", "{files}/bad.jsonl"], ["--input", "bad.jsonl:2"]),
    Case("P02", "preprocess", ["--input", "{files}/latin1.jsonl"], ["--input", "byte"]),
    Case("P03", "preprocess", ["--input", "{files}/good.jsonl", "--response-field", "answer"], ["--response-field", "'answer'", "instruction"]),
    Case("P04", "preprocess", ["--input", "{files}/good.jsonl", "--template", "Q: {{question}}"], ["question"]),
    Case("P05", "preprocess", ["--input", "{files}/good.jsonl", "--max-tokens", "8"], ["rows: got 0", "too_long"]),
    Case("P06", "preprocess", ["--input", "{files}/notes.docx"], ["--input", ".jsonl, .json, .csv, .parquet or .txt"]),
    Case("P07", "preprocess", ["--input", "{files}/missing.jsonl"], ["missing.jsonl", "an existing file"]),
    Case("P08", "preprocess", ["--input", "gs://no-such-bucket-42/d.jsonl"], ["gs://no-such-bucket-42", "an existing Cloud Storage bucket"]),
    Case("P09", "preprocess", ["--input", "{files}/good.jsonl", "--base-model", "not-a-real-preset"], ["--base-model", "not-a-real-preset"]),
    Case("P10", "preprocess", ["--input", "{files}/good.jsonl", "--eval-fraction", "1.0"], ["--eval-fraction", "1.0", "[0, 1)"]),
    Case("P11", "preprocess", ["--input", "{files}/good.jsonl", "--no-such-option", "1"], ["--no-such-option"]),
    Case("P12", "preprocess", ["--input", "{files}/good.jsonl", "--chat-format", "llama"], ["--chat-format", "'llama'", "gemma"]),
    Case("P13", "preprocess", ["--input", "{files}/good.jsonl"], ["gs://"], output="gs://"),
    Case("P14", "preprocess", ["--input", "{files}/good.jsonl", "--on-bad-record", "ignore"], ["--on-bad-record", "'ignore'", "skip"]),
    Case("P15", "preprocess", ["--input", "gs://bucket/../etc/passwd.jsonl"], ["'..'"]),
    Case("P16", "preprocess", ["--input", "{files}/chat.jsonl", "--mode", "chat"], ["--input", "chat.jsonl:2", "ends with a user turn"]),
    Case("P17", "preprocess", ["--input", "{files}/chat_robot.jsonl", "--mode", "chat"],
         ["chat_robot.jsonl:1", "messages[1].role: got 'robot'", "system, user, assistant, model"]),
    Case("P18", "preprocess", ["--input", "{files}/chat_empty.jsonl", "--mode", "chat"], ["chat_empty.jsonl:1", "messages[1]: empty assistant turn"]),
    Case("P19", "preprocess", ["--input", "{files}/good.jsonl", "--mode", "chat"], ["--messages-field", "'messages'", "instruction"]),
    Case("P20", "preprocess", ["--input", "{files}/good.jsonl", "--mode", "text"], ["--text-field", "'text'", "instruction"]),
    Case("P21", "preprocess", ["--input", "{files}/cut.jsonl.gz"], ["--input", "cut.jsonl.gz", "complete, valid gzip archive", "corrupt or truncated"]),
    Case("P22", "preprocess", ["--input", "{files}/flipped.jsonl.xz"], ["--input", "flipped.jsonl.xz", "valid xz archive"]),
    Case("P23", "preprocess", ["--input", "{files}/plain.jsonl.gz"], ["--input", "a gzip archive", "magic bytes"]),
    Case("P24", "preprocess", ["--input", "{files}/typed.jsonl"], ["typed.jsonl:2", "field 'response' holds a list", "expected text"]),
    Case("P25", "preprocess", ["--input", "{files}/dupes.jsonl"], ["--eval-fraction", "1 row(s) left", "'duplicate': 4", "--eval-fraction 0"]),
    Case("P26", "preprocess", ["--input", "{files}/nulls.jsonl"], ["rows: got 0", "'null': 3"]),
    Case("P27", "preprocess", ["--input", "{files}/chat_text.jsonl", "--mode", "chat"], ["chat_text.jsonl:1", "not a JSON list of turns"]),
    Case("F01", "finetune", ["--data", "{pre}", "--lora-rank", "0"], ["--lora-rank", "got 0", "an integer in [1, 512]"]),
    Case("F02", "finetune", ["--data", "{pre}", "--lora-rank", "-3"], ["--lora-rank", "got -3", "an integer in [1, 512]"]),
    Case("F03", "finetune", ["--data", "{files}"], ["--data", MANIFEST]),
    Case("F04", "finetune", ["--data", "{pre}"], ["--output", "readable checkpoint", "--no-resume"], setup=["corrupt_checkpoint"]),
    Case("F05", "finetune", ["--data", "{pre}", "--sequence-length", "8"], ["--sequence-length", "got 8", "response token"]),
    Case("F06", "finetune", ["--data", "{pre}", "--lora-targets", "nothing"], ["--lora-targets", "'nothing'"]),
    Case("F07", "finetune", ["--data", "{pre}", "--batch-size", "0"], ["--batch-size", "got 0"]),
    Case("F08", "finetune", ["--data", "{pre}", "--learning-rate", "0"], ["--learning-rate", "got 0", "(0, 1)"]),
    Case("F09", "finetune", ["--data", "{pre}", "--distribution", "data", "--model-parallel", "2"], ["--model-parallel", "got 2", "--distribution model"]),
    Case("F10", "finetune", ["--data", "{pre}", "--base-model", "not-a-real-preset"], ["--base-model", "not-a-real-preset"]),
    Case("F14", "finetune", ["--data", "{pre}", "--base-quantization", "float8"], ["--base-quantization", "got 'float8'", "none, int8, int4"]),
    Case("F15", "finetune", ["--data", "{pre}", "--base-quantization", "int4", "--model-parallel", "2"], ["--model-parallel", "int4"]),
    Case("B01", "benchmark", ["--data", "{pre}", "--finetune", "{ft}", "--require-improvement", "1.5"], ["--require-improvement", "1.5", "[0, 1)"]),
    Case("B02", "benchmark", ["--data", "{pre}", "--finetune", "{files}"], ["--finetune", MANIFEST]),
    Case("B03", "benchmark", ["--data", "{pre}", "--mode", "words"], ["--mode", "'words'", "response"]),
    Case("B04", "benchmark", ["--data", "{pre}", "--max-length", "64", "--stride", "500"], ["--stride", "500"]),
    Case("B05", "benchmark", ["--data", "{text_pre}", "--mode", "response"], ["--mode", "'response'", "text or auto"]),
    Case("C01", "convert", ["--finetune", "{files}"], ["--finetune", MANIFEST]),
    Case("C02", "convert", ["--finetune", "{ft}", "--dtype", "float16"], ["--dtype", "'float16'", "bfloat16"]),
    Case("C03", "convert", ["--base-model", "{model}", "--adapter", "{files}/weights.bin"], ["--adapter", ".lora.h5"]),
]


def catalogue_files(files: Path) -> None:
    """The catalogue's input files (also read by the Beam engine's parity test)."""
    files.mkdir(parents=True, exist_ok=True)
    good = [{"instruction": f"What does helper {i} return?", "response": f"The number {i}."} for i in range(12)]
    (files / "good.jsonl").write_text("\n".join(json.dumps(r) for r in good) + "\n")
    (files / "bad.jsonl").write_text(json.dumps(good[0]) + '\n{"instruction": "cut short", \n')
    (files / "latin1.jsonl").write_bytes(json.dumps(good[0]).encode() + b'\n{"instruction": "caf\xe9", "response": "x"}\n')
    (files / "notes.docx").write_bytes(b"PK\x03\x04 not a dataset")
    turn = lambda role, content: {"role": role, "content": content}  # noqa: E731
    ok = [turn("user", "Hi?"), turn("assistant", "Hello.")]
    (files / "chat.jsonl").write_text(json.dumps({"messages": ok}) + "\n" + json.dumps({"messages": [turn("user", "Hi?")]}) + "\n")
    (files / "chat_robot.jsonl").write_text(json.dumps({"messages": [turn("user", "a"), turn("robot", "b")]}) + "\n")
    (files / "chat_empty.jsonl").write_text(json.dumps({"messages": [turn("user", "a"), turn("assistant", " ")]}) + "\n")
    (files / "weights.bin").write_bytes(b"\0")
    import gzip
    import lzma

    packed = gzip.compress((files / "good.jsonl").read_bytes() * 50)
    (files / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    packed = bytearray(lzma.compress((files / "good.jsonl").read_bytes() * 50))
    packed[len(packed) // 2: len(packed) // 2 + 16] = bytes(16)
    (files / "flipped.jsonl.xz").write_bytes(bytes(packed))
    (files / "plain.jsonl.gz").write_bytes((files / "good.jsonl").read_bytes())
    (files / "typed.jsonl").write_text(json.dumps(good[0]) + "\n" + json.dumps({"instruction": "q", "response": ["a", "b"]}) + "\n")
    (files / "dupes.jsonl").write_text((json.dumps(good[0]) + "\n") * 5)
    (files / "nulls.jsonl").write_text("".join(json.dumps({"instruction": f"q{i}", "response": None}) + "\n" for i in range(3)))
    (files / "chat_text.jsonl").write_text(json.dumps({"messages": "user: hi / assistant: hello"}) + "\n")
