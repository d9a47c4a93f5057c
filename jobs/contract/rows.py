"""The row format of a preprocessing output (`train.jsonl`, `eval.jsonl` or their shards): one JSON object per
line, of one of three kinds. Preprocessing builds rows with the constructors; the fine-tune, the benchmark and
convert's answers read them with `kind_of`, `segments_of`, `document_of`, `prompt_and_reference` and `parse`.

- instruction: {"prompt", "response", "prompt_tokens", "response_tokens", "source"}
- chat: {"segments": [[text, loss], ...], "prompt", "response", "tokens", "loss_tokens", "source"}; `prompt` is
  everything before the last assistant turn and `response` that turn, so a conversation also reads as a pair
- text: {"text", "tokens", "source"} (raw documents for continued pre-training)

Token counts include BOS and EOS as the fine-tune adds them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from jobs.contract.errors import BadInputError

INSTRUCTION, CHAT, TEXT = "instruction", "chat", "text"
# Every loss segment (a response, an assistant turn) ends with the model family's end-of-turn marker
# (`jobs.families`: `<end_of_turn>` for Gemma 1-3, `<turn|>` for Gemma 4): what the model learns to stop on, and what
# the export's generation config stops on.
KINDS = (INSTRUCTION, CHAT, TEXT)
TEXT_PROMPT_WORDS = 24  # a raw-text row as a prompt: its opening words; the reference: the words after


def instruction(prompt: str, response: str, prompt_tokens: int, response_tokens: int, source: str) -> dict[str, Any]:
    return {"prompt": prompt, "response": response, "prompt_tokens": prompt_tokens,
            "response_tokens": response_tokens, "source": source}


def chat(segments: list[list[Any]], tokens: int, loss_tokens: int, source: str) -> dict[str, Any]:
    last = max(i for i, (_, loss) in enumerate(segments) if loss)
    return {"segments": segments, "prompt": "".join(t for t, _ in segments[:last]), "response": segments[last][0],
            "tokens": tokens, "loss_tokens": loss_tokens, "source": source}


def text(document: str, tokens: int, source: str) -> dict[str, Any]:
    return {"text": document, "tokens": tokens, "source": source}


def kind_of(row: dict[str, Any]) -> str:
    """The row's kind, or "" when it is none of them."""
    if isinstance(row.get("text"), str):
        return TEXT
    if isinstance(row.get("segments"), list):
        return CHAT
    if isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        return INSTRUCTION
    return ""


def segments_of(row: dict[str, Any]) -> list[list[Any]]:
    """A row as [text, loss] segments: a pair is [[prompt, no loss], [response, loss]]."""
    if kind_of(row) == CHAT:
        return row["segments"]
    return [[row["prompt"], False], [row["response"], True]]


def document_of(row: dict[str, Any]) -> str:
    """The whole text of a row, as perplexity over full documents reads it."""
    return row["text"] if kind_of(row) == TEXT else "".join(t for t, _ in segments_of(row))


def identity(row: dict[str, Any]) -> tuple[str, str]:
    """What makes two rows the same (dedup and the split's order)."""
    kind = kind_of(row)
    if kind == TEXT:
        return row["text"], ""
    if kind == CHAT:
        return "".join(t for t, _ in row["segments"]), ""
    return row["prompt"], row["response"]


def prompt_and_reference(row: dict[str, Any], reference_chars: int = 200) -> dict[str, str]:
    """A row as a prompt to generate from and the reference answer."""
    if kind_of(row) == TEXT:
        words = row["text"].split(" ")
        return {"prompt": " ".join(words[:TEXT_PROMPT_WORDS]),
                "reference": " ".join(words[TEXT_PROMPT_WORDS:])[:reference_chars]}
    return {"prompt": row["prompt"], "reference": row["response"]}


def length(row: dict[str, Any]) -> int:
    return row["tokens"] if "tokens" in row else row["prompt_tokens"] + row["response_tokens"]


def loss_length(row: dict[str, Any]) -> int:
    return row.get("loss_tokens", row.get("tokens", row.get("response_tokens", 0)))


def line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def parse(lines: Iterable[tuple[str, str]], field: str) -> list[dict[str, Any]]:
    """Rows from (where, line) pairs, checked: every row of a known kind, all of one kind (exit 2 otherwise)."""
    rows, where = [], []
    for location, raw in lines:
        if raw.strip():
            rows.append(json.loads(raw))
            where.append(location)
    kinds = set()
    for index, row in enumerate(rows):
        kind = kind_of(row)
        if not kind:
            raise BadInputError(field, where[index], "rows with string 'prompt' and 'response' fields, a "
                                "'segments' list (chat) or a string 'text' (raw text)")
        kinds.add(kind)
    if len(kinds) > 1:
        raise BadInputError(field, where[0], "rows of one mode", f"found {', '.join(sorted(kinds))} rows")
    return rows
