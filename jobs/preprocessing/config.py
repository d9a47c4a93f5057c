"""Typed, validated configuration of the preprocessing stage."""

from __future__ import annotations

import string
from dataclasses import dataclass

from jobs.common.errors import BadInputError
from jobs.convert.gguf_import import DEMO_MODEL_URI
from jobs.preprocessing.demo import DEMO_URI

CHAT_FORMATS = ("gemma", "none")
BAD_RECORD_POLICIES = ("fail", "skip")

HELP = {
    "input": f"dataset: a .jsonl/.json/.csv/.parquet file (local or gs://), hf://datasets/ID, or {DEMO_URI}",
    "output": "output prefix (gs:// or local directory)",
    "base_model": "model whose tokenizer measures lengths",
    "input_format": "auto (from the file name), jsonl, json, csv or parquet",
    "hf_split": "split to read from an hf://datasets/ source",
    "instruction_field": "column holding the instruction / question",
    "response_field": "column holding the response / answer",
    "context_field": "optional column appended to the instruction (empty: none)",
    "template": "prompt template with {column} placeholders; overrides the instruction/context fields",
    "chat_format": "gemma: wrap in Gemma chat turns (instruction-tuned models); none: raw text",
    "max_tokens": "drop rows whose prompt+response exceed this many tokens (with BOS/EOS)",
    "max_examples": "keep at most this many rows after cleaning (0: all)",
    "eval_fraction": "fraction of rows held out for evaluation",
    "seed": "seed of the deterministic shuffle and train/eval split",
    "on_bad_record": "fail: stop at the first unreadable row; skip: quarantine it and go on",
}


@dataclass(frozen=True)
class PreprocessConfig:
    output: str
    input: str = DEMO_URI
    base_model: str = DEMO_MODEL_URI
    input_format: str = "auto"
    hf_split: str = "train"
    instruction_field: str = "instruction"
    response_field: str = "response"
    context_field: str = ""
    template: str = ""
    chat_format: str = "gemma"
    max_tokens: int = 512
    max_examples: int = 0
    eval_fraction: float = 0.1
    seed: int = 0
    on_bad_record: str = "fail"

    def __post_init__(self) -> None:
        if not self.output:
            raise BadInputError("--output", self.output, "a gs:// prefix or local directory")
        if self.chat_format not in CHAT_FORMATS:
            raise BadInputError("--chat-format", self.chat_format, f"one of {', '.join(CHAT_FORMATS)}")
        if self.on_bad_record not in BAD_RECORD_POLICIES:
            raise BadInputError("--on-bad-record", self.on_bad_record, f"one of {', '.join(BAD_RECORD_POLICIES)}")
        if self.max_tokens < 8:
            raise BadInputError("--max-tokens", self.max_tokens, "an integer >= 8")
        if self.max_examples < 0:
            raise BadInputError("--max-examples", self.max_examples, "0 (no cap) or a positive integer")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise BadInputError("--eval-fraction", self.eval_fraction, "a number in [0, 1)")
        if not self.response_field:
            raise BadInputError("--response-field", self.response_field, "a column name")
        if not self.template and not self.instruction_field:
            raise BadInputError("--instruction-field", self.instruction_field, "a column name (or set --template)")
        try:
            names = self.placeholders()
        except ValueError as err:
            raise BadInputError("--template", self.template, "a template with {column} placeholders", str(err)) from err
        if self.template and (not names or any(not n.isidentifier() for n in names)):
            raise BadInputError("--template", self.template, "named {column} placeholders (no {} or {0})")

    def placeholders(self) -> list[str]:
        return [name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None]

    def required_columns(self) -> list[str]:
        prompt_columns = self.placeholders() if self.template else [self.instruction_field]
        if self.context_field and not self.template:
            prompt_columns.append(self.context_field)
        return [*prompt_columns, self.response_field]
