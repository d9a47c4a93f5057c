"""Chat conversations and raw-text documents: rendering, per-row reasons, cleaning, dedup and split."""

from __future__ import annotations

import json
import re

import pytest

from jobs import families
from jobs.contract.configs.preprocess import PreprocessConfig
from jobs.contract.errors import BadInputError
from jobs.preprocessing.core import run
from jobs.preprocessing.modes import ChatError, clean_text, render_chat

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And 2+2?"},
        {"role": "model", "content": "4."}]


def test_gemma_turns_fold_the_system_prompt_and_flag_every_assistant_turn():
    assert render_chat(CHAT, families.by_name("gemma3").chat) == [
        ["<start_of_turn>user\nBe brief.\n\nHi?<end_of_turn>\n<start_of_turn>model\n", False],
        ["Hello.<end_of_turn>", True],
        ["\n<start_of_turn>user\nAnd 2+2?<end_of_turn>\n<start_of_turn>model\n", False],
        ["4.<end_of_turn>", True],
    ]


def test_gemma4_turns_use_its_own_markers():
    assert render_chat(CHAT, families.by_name("gemma4").chat) == [
        ["<|turn>user\nBe brief.\n\nHi?<turn|>\n<|turn>model\n", False],
        ["Hello.<turn|>", True],
        ["\n<|turn>user\nAnd 2+2?<turn|>\n<|turn>model\n", False],
        ["4.<turn|>", True],
    ]


@pytest.mark.parametrize("messages, reason", [
    ("hello", "expected a non-empty list of {role, content} turns, got str"),
    ([], "expected a non-empty list"),
    ([{"role": "robot", "content": "x"}], "messages[0].role: got 'robot'; expected one of system, user, assistant, model"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], "messages[0]: empty user turn"),
    ([{"role": "user", "content": "a"}], "ends with a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     "messages[1].role: got 'user'; expected 'assistant'"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "c"}], "messages[0].content: expected text, got int"),
    ([{"role": "system", "content": "s"}], "only a system message"),
    ([{"content": "a"}], "expected an object with 'role' and 'content'"),
])
def test_a_bad_conversation_gets_its_own_reason(messages, reason):
    with pytest.raises(ChatError, match=re.escape(reason)):
        render_chat(messages, families.by_name("gemma3").chat)


def _chat_source(tmp_path, rows):
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return source


def test_chat_rows_are_written_as_segments_and_bad_ones_quarantined(tmp_path, tiny_gemma3):
    good = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}] for i in range(8)]
    bad = [[{"role": "user", "content": "dangling"}], [{"role": "bot", "content": "x"}]]
    source = _chat_source(tmp_path, [CHAT, *good, good[0], *bad])
    config = PreprocessConfig(input=str(source), output=str(tmp_path / "out"), base_model=str(tiny_gemma3), mode="chat",
                              on_bad_record="skip", eval_fraction=0.25)
    run(config, tmp_path / "w")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["mode"] == "chat" and stats["rows_out"] == 9 and stats["dropped"]["duplicate"] == 1
    assert stats["dropped"]["bad_chat"] == 2 and stats["loss_token_length"]["min"] >= 2
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert reasons == ["messages: the conversation ends with a user turn; expected it to end with an assistant turn",
                       "messages[0].role: got 'bot'; expected one of system, user, assistant, model"]
    rows = [json.loads(line) for name in ("train", "eval") for line in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
    multi = next(r for r in rows if len(r["segments"]) == 4)
    assert multi["response"] == "4.<end_of_turn>" and multi["prompt"].endswith("And 2+2?<end_of_turn>\n<start_of_turn>model\n")

    with pytest.raises(BadInputError, match="ends with a user turn"):  # fail mode: exit 2 with the row's reason
        run(PreprocessConfig(**{**config.__dict__, "on_bad_record": "fail", "output": str(tmp_path / "o2")}), tmp_path / "w")


def test_raw_text_documents_are_cleaned_deduplicated_and_split(tmp_path, tiny_gemma3):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("First  paragraph.\r\nStill first.\x07\n\n\n\nSecond paragraph.   \n")
    (folder / "b.txt").write_text("Second paragraph.\n\nThird one, long enough " + "word " * 200 + "\n")
    config = PreprocessConfig(input=str(folder) + "/", output=str(tmp_path / "out"), base_model=str(tiny_gemma3), mode="text",
                              eval_fraction=0.3, max_tokens=16)
    run(config, tmp_path / "w")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["mode"] == "text" and stats["rows_out"] == 3 and stats["dropped"]["duplicate"] == 1
    assert stats["dropped"]["too_long"] == 0  # documents are packed, not dropped, whatever their length
    docs = [json.loads(line)["text"] for name in ("train", "eval") for line in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
    assert "First  paragraph.\nStill first." in docs and stats["eval_rows"] == 1
    assert clean_text("a \t\nb\r\n\n\n\nc\x00") == "a\nb\n\nc"


def test_the_raw_text_demo_ships_offline(tmp_path, tiny_gemma3):
    config = PreprocessConfig(input="demo:python-docs", output=str(tmp_path / "out"), base_model=str(tiny_gemma3), mode="text")
    run(config, tmp_path / "w")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rows_out"] > 50 and stats["total_tokens"] > 100_000
