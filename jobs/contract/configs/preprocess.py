"""Typed, validated configuration of the preprocessing stage: every option declared once (see jobs.contract.spec)."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Literal

from jobs.contract import spec
from jobs.contract.demo import DEMO_MODEL_URI, DEMO_TEXT_URI, DEMO_URI
from jobs.contract.errors import BadInputError
from jobs.contract.spec import option

DESCRIPTION = "Clean, template and split a dataset: instruction pairs, chat conversations or raw-text documents."


@dataclass(frozen=True)
class PreprocessConfig:
    output: str = option(help="output prefix (gs:// or local directory)", upstream="self")
    input: str = option(DEMO_URI, f"dataset: a .jsonl/.json/.csv/.parquet/.txt file or a folder ending in / of .txt "
                                  f"files (of another format: set --input-format) (local or gs://), hf://datasets/ID, {DEMO_URI} (instruction pairs) or "
                                  f"{DEMO_TEXT_URI} (raw text)", param="dataset")
    mode: Literal["instruction", "chat", "text"] = option(
        "instruction", "instruction: prompt/response pairs from the field options or a template; chat: a messages "
                       "list of {role, content} turns, loss on every assistant turn; text: raw documents for "
                       "continued pre-training, packed by the fine-tune, loss on every token", param="data_mode")
    messages_field: str = option("messages", "chat mode: column holding the list of {role, content} turns",
                                 param="messages_field")
    text_field: str = option("text", "text mode: column holding a document (.txt input: the documents themselves)",
                             param="text_field")
    sample_by: Literal["document", "paragraph", "line"] = option(
        "paragraph", ".txt input: one document per file, per blank-line separated paragraph, or per line")
    base_model: str = option(DEMO_MODEL_URI, "model whose tokenizer measures lengths: keras-hub preset, "
                                             "hf://ORG/NAME, gs:// or local model directory, or demo:gemma3-270m",
                             param="base_model")
    input_format: Literal["auto", "jsonl", "json", "csv", "parquet", "txt"] = option(
        "auto", "file format (auto: from the file name)")
    hf_split: str = option("train", "split to read from an hf://datasets/ source")
    instruction_field: str = option("instruction", "column holding the instruction / question (ignored with a template)",
                                    param="instruction_field")
    response_field: str = option("response", "column holding the response / answer", param="response_field")
    context_field: str = option("", "optional column appended to the instruction (empty: none)",
                                param="context_field", nullable=True)
    template: str = option("", "prompt template with {column} placeholders; overrides the instruction/context fields "
                               "(empty: none)", param="template", nullable=True)
    chat_format: Literal["gemma", "none"] = option(
        "gemma", "gemma: wrap in the base model family's chat turns (instruction-tuned models); none: raw text", param="chat_format")
    max_tokens: int = option(128, "drop rows whose prompt+response (a whole conversation in chat mode) exceed this "
                                  "many tokens with BOS/EOS; text mode keeps long documents (the fine-tune packs them)",
                             minimum=8, maximum=131072, param="max_tokens")
    max_examples: int = option(0, "keep at most this many rows after cleaning (0: all)", minimum=0, param="max_examples")
    eval_fraction: float = option(0.1, "fraction of rows held out for evaluation", minimum=0, exclusive_maximum=1,
                                  param="eval_fraction")
    seed: int = option(0, "seed of the deterministic split and of training", minimum=0, param="seed")
    on_bad_record: Literal["fail", "skip"] = option(
        "fail", "fail: stop at the first unreadable row; skip: quarantine it and go on", param="on_bad_record")

    def __post_init__(self) -> None:
        spec.validate(self)
        if self.mode == "instruction" and not self.template and not self.instruction_field:
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
        if self.mode == "chat":
            return [self.messages_field]
        if self.mode == "text":
            return [self.text_field]
        prompt_columns = self.placeholders() if self.template else [self.instruction_field]
        if self.context_field and not self.template:
            prompt_columns.append(self.context_field)
        return [*prompt_columns, self.response_field]
