"""Row-level logic of preprocessing, shared by every engine: the typed reading of a row's fields, rendering it as
an instruction pair, a conversation or a document, and its dedup key.

Type policy (docs/stages.md): a null in a required field drops the row (`null`); a number where text is expected
is written as text and counted (`coerced.number_to_text`); a boolean, list or object where text is expected is
rejected (`wrong_type`: quarantined with --on-bad-record skip, fatal with fail); a chat `messages` column stored as
a JSON string (CSV and many Parquet exports) is parsed and counted (`coerced.json_text_to_messages`); a null in
the optional context field counts as no context (`coerced.null_context_to_empty`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs import families
from jobs.contract import rows as contract_rows
from jobs.contract.configs.preprocess import PreprocessConfig
from jobs.contract.errors import BadInputError
from jobs.families import ChatFormat
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
            segments = render_chat(messages_of(row, config.messages_field, coerced), chat_format(config.base_model))
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


# ---- what every engine does with a row once it is read (single machine: jobs.preprocessing.core; Beam: .beam) ----


@functools.lru_cache(maxsize=8)
def chat_format(base_model: str) -> ChatFormat:
    """The chat turns of the base model's family (read once per process from its config; no weights)."""
    return families.of_source(base_model).chat

TokenCounter = Callable[[list[str]], list[int]]


@dataclass
class Outcome:
    """What becomes of one read record: kept (its dedup key and rendered item), dropped, or rejected."""

    kind: str  # "keep" | "drop" | "reject"
    reason: str = ""
    detail: str = ""
    key: str = ""
    item: Any = None
    missing: tuple[str, ...] = ()  # mapped columns a readable record lacks


def assess(config: PreprocessConfig, record: Any, coerced: Counter, required: tuple[str, ...]) -> Outcome:
    """The fate of a `sources.Record` (`required`: config.required_columns(), computed once by the caller);
    coercions are counted into `coerced`."""
    if record.error is not None:
        return Outcome("reject", "bad_record", record.error)
    missing = tuple(c for c in required if c not in record.data)
    if missing:
        return Outcome("reject", "missing_field", f"missing field(s) {', '.join(missing)}", missing=missing)
    try:
        key, item = prepare(config, record.data, coerced)
    except Drop as drop:
        return Outcome("reject" if drop.reason in REJECTS else "drop", drop.reason, drop.detail)
    return Outcome("keep", key=key, item=item)


def columns_error(config: PreprocessConfig, record: Any, missing: tuple[str, ...]) -> BadInputError:
    """The first readable record lacks a mapped column: the mapping is wrong, not the row."""
    fields = {"chat": "--messages-field", "text": "--text-field"}.get(
        config.mode, "--instruction-field/--response-field/--context-field/--template")
    return BadInputError(fields, ", ".join(missing),
                         f"columns that exist in {config.input}: {', '.join(map(str, record.data)) or '(none)'}")


def reject_error(record: Any, detail: str) -> BadInputError:
    return BadInputError("--input", record.location, "a readable row with the mapped fields",
                         detail + " (use --on-bad-record skip to quarantine such rows)")


def quarantine_line(record: Any, detail: str) -> str:
    return json.dumps({"location": record.location, "reason": detail,
                       "raw": record.raw or json.dumps(record.data, default=str)}, ensure_ascii=False) + "\n"


def dedup_digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def sentencepiece_counter(proto: bytes, add_bos: bool = False, add_eos: bool = False) -> TokenCounter:
    """Token counts of a batch of texts from a serialized SentencePiece model (both engines count this way)."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    return lambda texts: [len(ids) for ids in processor.Encode(texts, add_bos=add_bos, add_eos=add_eos)]


def chat(config: PreprocessConfig, prompt: str, response: str) -> tuple[str, str]:
    if config.chat_format == "gemma":
        turns = chat_format(config.base_model)
        return turns.user_turn(prompt), turns.model_turn(response)
    return prompt + "\n", response


def _instruction_rows(config: PreprocessConfig, items: list, count: TokenCounter, dropped: Counter) -> list[dict[str, Any]]:
    formatted = [chat(config, *pair) + (loc,) for pair, loc in items]
    prompt_counts = count([p for p, _, _ in formatted]) if formatted else []
    response_counts = count([r for _, r, _ in formatted]) if formatted else []
    kept = []
    for (prompt, response, location), p_count, r_count in zip(formatted, prompt_counts, response_counts):
        if p_count + r_count + 2 > config.max_tokens:  # with BOS and EOS
            dropped["too_long"] += 1
            continue
        kept.append(contract_rows.instruction(prompt, response, p_count + 1, r_count + 1, location))
    return kept


def _chat_rows(config: PreprocessConfig, items: list, count: TokenCounter, dropped: Counter) -> list[dict[str, Any]]:
    """Rendered conversations with their token counts; `prompt`/`response` (everything before the last assistant
    turn, and that turn) let the answers step and readers of the split see a conversation as a pair."""
    texts = [text for segments, _ in items for text, _ in segments]
    all_counts = iter(count(texts) if texts else [])
    kept = []
    for segments, location in items:
        counts = [next(all_counts) for _ in segments]
        total = sum(counts) + 2
        if total > config.max_tokens:
            dropped["too_long"] += 1
            continue
        loss_tokens = sum(c for c, (_, loss) in zip(counts, segments) if loss) + 1
        kept.append(contract_rows.chat(segments, total, loss_tokens, location))
    return kept


def _text_rows(config: PreprocessConfig, items: list, count: TokenCounter, dropped: Counter) -> list[dict[str, Any]]:
    """Documents are kept whole whatever their length: the fine-tune packs them into full sequences."""
    counts = count([doc for doc, _ in items]) if items else []
    return [contract_rows.text(doc, count + 2, location) for (doc, location), count in zip(items, counts)]


def build(config: PreprocessConfig, items: list, count: TokenCounter, dropped: Counter) -> list[dict[str, Any]]:
    """Output rows of deduplicated (item, location) pairs, measured with the tokenizer; too long ones counted."""
    return {"instruction": _instruction_rows, "chat": _chat_rows, "text": _text_rows}[config.mode](config, items, count, dropped)


identity = contract_rows.identity


def order_key(seed: int, row: dict[str, Any]) -> bytes:
    """The split's hash order: deterministic for a seed, independent of input order, engine and machine."""
    prompt, response = identity(row)
    return hashlib.sha256(f"{seed}\x00{prompt}\x00{response}".encode()).digest()


length, loss_length, line = contract_rows.length, contract_rows.loss_length, contract_rows.line


def percentiles(counts: Counter[int]) -> dict[str, int]:
    """Percentiles as the nearest rank of the sorted values, from a histogram (bounded memory)."""
    total = sum(counts.values())
    if not total:
        return {}
    lengths = sorted(counts)
    result = {}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99)):
        rank, seen = min(total, max(1, math.ceil(q * total))), 0
        for value in lengths:
            seen += counts[value]
            if seen >= rank:
                result[name] = value
                break
    return {**result, "max": lengths[-1], "min": lengths[0]}


def split_sizes(kept: int, config: PreprocessConfig, rows_in: int, dropped: Counter) -> tuple[int, int]:
    """(rows written, eval rows) from the rows left after cleaning, counting those over --max-examples into
    `dropped`; exit 2 when no usable split remains."""
    limit = min(kept, config.max_examples) if config.max_examples else kept
    dropped["over_cap"] += kept - limit
    if not limit:
        raise BadInputError("rows", 0, "at least one row left after cleaning", f"dropped per reason: {dict(dropped)}")
    n_eval = math.ceil(limit * config.eval_fraction) if config.eval_fraction > 0 else 0
    if config.eval_fraction > 0 and limit - n_eval < 1:
        raise BadInputError(
            "--eval-fraction", config.eval_fraction, "a split that leaves at least one eval row and one train row",
            f"{limit} row(s) left after cleaning (rows in {rows_in}, dropped per reason {dict(dropped)}); "
            "add data, or set --eval-fraction 0 to train without an eval split")
    return limit, n_eval


def rejected(dropped: Counter) -> int:
    """Rows quarantined (or, with --on-bad-record fail, that would have stopped the stage)."""
    return sum(dropped[reason] for reason in REJECTS)


def stats(config: PreprocessConfig, rows_in: int, limit: int, n_eval: int, dropped: Counter, coerced: Counter,
          lengths: Counter, loss_lengths: Counter) -> dict[str, Any]:
    return {
        "mode": config.mode,
        "rows_in": rows_in,
        "rows_out": limit,
        "train_rows": limit - n_eval,
        "eval_rows": n_eval,
        "dropped": dict(dropped),
        "coerced": dict(coerced),
        "quarantined": rejected(dropped),
        "token_length": percentiles(lengths),
        "loss_token_length": percentiles(loss_lengths),
        "total_tokens": sum(value * n for value, n in lengths.items()),
    }
