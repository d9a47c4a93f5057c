"""The training modes through the real DAG on the local backend (tiny model, two steps): raw text for continued
pre-training (the offline demo corpus, packed, scored in text mode) on an int8-quantized base (its adapter scored
and exported on the full-precision base), and chat conversations preprocessed by the Beam engine
(preprocess_engine=dataflow, in process, in small shards) that the later stages read as one split."""

from __future__ import annotations

import json

import pytest
from gemma_pipeline.operators import dataflow

from tests.support.local_run import BUCKET, _local_run


def _read(root, run: str, *parts: str) -> dict:
    return json.loads((root / "gcs" / BUCKET / "runs" / run / "/".join(parts)).read_text())


def _conf(tiny_gemma3, run: str, **overrides) -> dict:
    return {"base_model": str(tiny_gemma3), "max_steps": 2, "batch_size": 2, "sequence_length": 64, "run_name": run,
            **overrides}


@pytest.mark.slow  # a DAG run (~100 s); text packing and the int8 base have fast tests of their own
def test_raw_text_on_a_quantized_base_runs_end_to_end(tmp_path_factory, tiny_gemma3):
    """Packed raw text, the base quantized to int8: the adapter is the product; benchmark scores it on the
    full-precision base in text mode and convert exports base + adapter, checked by the parity test."""
    root = tmp_path_factory.mktemp("modes-text")
    result = _local_run(root, _conf(tiny_gemma3, "text", dataset="demo:python-docs", data_mode="text",
                                    base_quantization="int8"))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert _read(root, "text", "preprocess", "stats.json")["mode"] == "text"
    key = _read(root, "text", "champion.json")["champion"]
    metrics = _read(root, "text", "candidates", key, "finetune", "metrics.json")
    assert metrics["product"] == "adapter" and metrics["base_quantization"] == "int8"
    assert not (root / "gcs" / BUCKET / "runs" / "text" / "candidates" / key / "finetune" / "model").exists()
    report = _read(root, "text", "candidates", key, "benchmark", "report.json")
    assert report["mode"] == "text" and "full precision; trained on a int8 base" in report["models"]["tuned"]["uri"]
    convert = _read(root, "text", "candidates", key, "convert", "_manifest.json")["metrics"]
    assert convert["parity"]["passed"] and "with the adapter applied (trained on a int8 base)" in convert["exported_from"]


@pytest.mark.slow  # a DAG run (~100 s); chat data, its Beam preprocessing and the operator have fast tests of their own
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
                                    max_tokens=128, sequence_length=128,  # the tiny tokenizer spells turns out
                                    preprocess_engine="dataflow" if dataflow.beam_python().exists() else "gke"),
                        env={"GEMMA_PIPELINE_SHARD_BYTES": "2048"})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    if dataflow.beam_python().exists():
        outputs = _read(root, "chat", "preprocess", "_manifest.json")["outputs"]
        assert len([n for n in outputs if n.startswith("train-")]) > 1 and "train.jsonl" not in outputs
    stats = _read(root, "chat", "preprocess", "stats.json")
    assert stats["mode"] == "chat" and stats["dropped"]["bad_chat"] == 1 and stats["rows_out"] == 24
    champion = _read(root, "chat", "champion.json")
    report = _read(root, "chat", "candidates", champion["champion"], "benchmark", "report.json")
    assert report["mode"] == "response" and report["models"]["tuned"]["splits"]["eval"]["tokens"] > 0


