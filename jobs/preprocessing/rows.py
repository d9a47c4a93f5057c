"""Row-level logic of preprocessing, shared by every engine: the typed reading of a row's fields, rendering it as
an instruction pair, a conversation or a document, and its dedup key.

Type policy (docs/stages.md): a null in a required field drops the row (`null`); a number where text is expected
is written as text and counted (`coerced.number_to_text`); a boolean, list or object where text is expected is
rejected (`wrong_type`: quarantined with --on-bad-record skip, fatal with fail); a chat `messages` column stored as
a JSON string (CSV and many Parquet exports) is parsed and counted (`coerced.json_text_to_messages`); a null in
the optional context field counts as no context (`coerced.null_context_to_empty`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from jobs.preprocessing.config import PreprocessConfig
from jobs.preprocessing.modes import ChatError, clean_text, render_chat

# Rejects are quarantined (skip) or fatal (fail); the others are counted drops of rows that are well formed.
REJECTS = ("bad_record", "missing_field", "bad_chat", "wrong_type")
DROP_REASONS = (*REJECTS, "null", "empty", "duplicate", "too_long", "over_cap")
COERCIONS = ("number_to_text", "json_text_to_messages", "null_context_to_empty")


class Drop(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _kind(value: Any) -> str:
    return {bool: "a boolean", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def text_of(row: dict[str, Any], field: str, coerced: Counter) -> str:
    value = row[field]
    if _is_null(value):
        raise Drop("null", f"field {field!r} is null")
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        coerced["number_to_text"] += 1
        return str(value)
    raise Drop("wrong_type", f"field {field!r} holds {_kind(value)} ({json.dumps(value, default=str)[:80]}); expected text")


def render(config: PreprocessConfig, row: dict[str, Any], coerced: Counter) -> tuple[str, str]:
    """The (prompt, response) pair of one row, before chat formatting."""
    if config.template:
        prompt = config.template.format(**{name: text_of(row, name, coerced) for name in config.placeholders()})
    else:
        prompt = text_of(row, config.instruction_field, coerced).strip()
        if config.context_field:
            if _is_null(row[config.context_field]):
                coerced["null_context_to_empty"] += 1
                context = ""
            else:
                context = text_of(row, config.context_field, coerced).strip()
            if context:
                prompt = f"{prompt}\n\n{context}"
    return prompt.strip(), text_of(row, config.response_field, coerced).strip()


def messages_of(row: dict[str, Any], field: str, coerced: Counter) -> Any:
    value = row[field]
    if _is_null(value):
        raise Drop("null", f"field {field!r} is null")
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise Drop("wrong_type", f"field {field!r} holds text that is not a JSON list of turns ({err.msg})") from err
        coerced["json_text_to_messages"] += 1
        return parsed
    return value


def normalise(text: str) -> str:
    """The dedup key's text: whitespace runs collapsed (str.split's whitespace is re's Unicode \\s), casefolded."""
    return " ".join(text.split()).casefold()


def prepare(config: PreprocessConfig, row: dict[str, Any], coerced: Counter) -> tuple[str, Any]:
    """(dedup key, rendered item) of a row that has the mapped columns, or Drop with its reason."""
    if config.mode == "chat":
        try:
            segments = render_chat(messages_of(row, config.messages_field, coerced))
        except ChatError as err:
            raise Drop("bad_chat", str(err)) from err
        return normalise("".join(text for text, _ in segments)), segments
    if config.mode == "text":
        document = clean_text(text_of(row, config.text_field, coerced))
        if not document:
            raise Drop("empty", f"field {config.text_field!r} is empty after cleaning")
        return normalise(document), document
    prompt, response = render(config, row, coerced)
    if not prompt or not response:
        raise Drop("empty", "empty prompt or response")
    return normalise(prompt) + "\x00" + normalise(response), (prompt, response)
