"""The training modes through the real DAG on the local backend (tiny model, two steps): raw text for continued
pre-training (the offline demo corpus, packed, scored in text mode) with a second candidate on an int8-quantized
base (its adapter scored and exported on the full-precision base), and chat conversations."""

from __future__ import annotations

import json

from tests.reliability.test_local_dag import BUCKET, _local_run


def _read(root, run: str, *parts: str) -> dict:
    return json.loads((root / "gcs" / BUCKET / "runs" / run / "/".join(parts)).read_text())


def _conf(tiny_gemma3, run: str, **overrides) -> dict:
    return {"base_model": str(tiny_gemma3), "max_steps": 2, "batch_size": 2, "sequence_length": 64, "run_name": run,
            **overrides}


def test_raw_text_with_a_quantized_candidate_runs_end_to_end(tmp_path_factory, tiny_gemma3):
    root = tmp_path_factory.mktemp("modes-text")
    candidates = [{}, {"base_quantization": "int8", "learning_rate": 0.001}]
    result = _local_run(root, _conf(tiny_gemma3, "text", dataset="demo:python-docs", data_mode="text", candidates=candidates))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert _read(root, "text", "preprocess", "stats.json")["mode"] == "text"
    champion = _read(root, "text", "champion.json")
    assert [c["status"] for c in champion["candidates"]] == ["finished", "finished"]
    keys = {c["key"]: c for c in champion["candidates"]}
    quantized = next(k for k in keys if k != "default")
    report = _read(root, "text", "candidates", quantized, "benchmark", "report.json")
    assert report["mode"] == "text" and "trained on a int8 base" in report["models"]["tuned"]["uri"]
    metrics = _read(root, "text", "candidates", quantized, "finetune", "metrics.json")
    assert metrics["product"] == "adapter" and metrics["base_quantization"] == "int8"
    convert = _read(root, "text", "candidates", champion["champion"], "convert", "_manifest.json")
    assert convert["metrics"]["parity"]["passed"]


def test_chat_conversations_run_end_to_end(tmp_path_factory, tiny_gemma3):
    root = tmp_path_factory.mktemp("modes-chat")
    source = root / "chat.jsonl"
    turn = lambda role, content: {"role": role, "content": content}  # noqa: E731
    rows = [{"messages": [turn("system", "Answer in one line."), turn("user", f"What is {i} + {i}?"),
                          turn("assistant", f"{2 * i}."), turn("user", "And doubled?"), turn("assistant", f"{4 * i}.")]}
            for i in range(24)]
    rows.append({"messages": [turn("user", "left without an answer")]})
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _local_run(root, _conf(tiny_gemma3, "chat", dataset=str(source), data_mode="chat", on_bad_record="skip",
                                    max_tokens=128, sequence_length=128))  # the tiny tokenizer spells turns out
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    stats = _read(root, "chat", "preprocess", "stats.json")
    assert stats["mode"] == "chat" and stats["dropped"]["bad_chat"] == 1 and stats["rows_out"] == 24
    champion = _read(root, "chat", "champion.json")
    report = _read(root, "chat", "candidates", champion["champion"], "benchmark", "report.json")
    assert report["mode"] == "response" and report["models"]["tuned"]["splits"]["eval"]["tokens"] > 0


