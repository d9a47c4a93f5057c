"""Row-level logic of the chat and raw-text modes (shared by every engine that preprocesses): rendering a
`messages` conversation into the model family's chat turns with a per-segment loss flag, and cleaning raw-text documents.

A rendered conversation is a list of segments `[text, loss]`: the fine-tune and the benchmark tokenize each
segment and put loss on the tokens of `loss` segments only, i.e. on every assistant turn (its content and its
end-of-turn marker), never on the system prompt, the user turns or the turn headers.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from jobs.families import ChatFormat

USER_ROLES = ("user",)
ASSISTANT_ROLES = ("assistant", "model")
SYSTEM_ROLES = ("system",)
ROLES = (*SYSTEM_ROLES, *USER_ROLES, *ASSISTANT_ROLES)


class ChatError(ValueError):
    """A conversation that cannot be trained on; the message is its per-row reason."""


def render_chat(messages: Any, chat: ChatFormat) -> list[list[Any]]:
    """The model family's chat template (`chat`) as segments. A system message (first only) is folded into the
    first user turn, as Gemma's templates do; roles must alternate user / assistant and the conversation must end with an
    assistant turn (otherwise its last user turn would train nothing)."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"messages: expected a non-empty list of {{role, content}} turns, got {_kind(messages)}")
    turns: list[tuple[str, str]] = []
    for index, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ChatError(f"messages[{index}]: expected an object with 'role' and 'content', got {_kind(turn)}")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise ChatError(f"messages[{index}].role: got {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"messages[{index}].content: expected text, got {_kind(content)}")
        if not content.strip():
            raise ChatError(f"messages[{index}]: empty {role} turn")
        turns.append(("assistant" if role in ASSISTANT_ROLES else role, content.strip()))
    system = ""
    if turns[0][0] == "system":
        system = turns.pop(0)[1]
        if not turns:
            raise ChatError("messages: only a system message; expected user and assistant turns after it")
    for index, (role, _) in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            where = index + (1 if system else 0)
            raise ChatError(f"messages[{where}].role: got {role!r}; expected {expected!r} (turns alternate user / "
                            "assistant after an optional first system message)")
    if turns[-1][0] != "assistant":
        raise ChatError("messages: the conversation ends with a user turn; expected it to end with an assistant turn")
    segments: list[list[Any]] = []
    for index, (role, content) in enumerate(turns):
        if role == "user":
            text = f"{system}\n\n{content}" if index == 0 and system else content
            segments.append([chat.user_turn(text, first=index == 0), False])
        else:
            segments.append([chat.model_turn(content), True])
    return segments


def clean_text(text: str) -> str:
    """A raw-text document as it is trained on: Unicode NFC, newlines normalised, control characters (other than
    newline and tab) removed, trailing spaces cut, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_text(text: str, sample_by: str) -> list[str]:
    """A text file's documents, as Hugging Face's `text` loader cuts them: the whole file, each paragraph
    (blank-line separated), or each line."""
    if sample_by == "document":
        return [text]
    if sample_by == "paragraph":
        return re.split(r"\n\s*\n", text)
    return text.splitlines()


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
