"""The Beam engine against the single-machine stage: the same exit code and error line on every preprocessing case
of the bad-input catalogue, and on good inputs (the demo datasets; instruction, chat and text modes; JSONL, CSV,
Parquet and compressed files; folders of several files; quarantine, duplicates across files, caps) the same rows in
the same order, the same split, stats and quarantine. The Beam side runs in its own environment (`.venv-beam`, set
up by .ci/run; Beam cannot share this one), on the in-process runner, with tiny shards so that ordering across
shards is exercised."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from jobs.common.cli import main
from jobs.contract import splits
from tests.jobs.preprocessing.beam_cases import error_line
from tests.support import nonempty
from tests.support.bad_inputs import CASES, catalogue_files

ROOT = Path(__file__).resolve().parents[3]
BEAM_PYTHON = ROOT / ".venv-beam" / "bin" / "python"
if not BEAM_PYTHON.exists() and not os.environ.get("GEMMA_PIPELINE_REQUIRE_BEAM"):
    pytest.skip("no Beam environment: python3 -m venv .venv-beam && .venv-beam/bin/pip install -e '.[beam]'",
                allow_module_level=True)

# Cases whose messages differ on purpose; both engines still exit 2 naming the same thing.
SAME_SUBJECT_ONLY = {
    "P09": "--base-model: got 'not-a-real-preset'",  # Beam's image has no keras-hub to resolve preset names
    "P11": "--no-such-option",  # argparse refuses it in one, Beam's option check in the other
}


def good_inputs(files: Path) -> list[tuple[str, list[str]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = [{"instruction": f"Explain item {i}.", "context": None if i % 5 else f"ctx {i}", "response": f"Item {i} is {'x' * (i % 9)}."}
             for i in range(60)]
    mixed = [*pairs, pairs[4], {"instruction": "EXPLAIN   item 3.", "context": None, "response": "ITEM 3 is  xxx."},
             {"instruction": "n", "context": None, "response": 12.5}, {"instruction": "b", "context": None, "response": True},
             {"instruction": "", "context": None, "response": "empty prompt"}, {"instruction": "q", "response": None},
             {"instruction": "long " * 80, "context": None, "response": "too long"}]
    (files / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in mixed) + "\n{not json\n" + json.dumps({"other": 1}) + "\n")
    folder = files / "folder"
    (folder / "b").mkdir(parents=True)
    import gzip

    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs[:25]))
    (folder / "b" / "c.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in pairs[20:45]).encode()))
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*pairs[40:], pairs[0]]) + "{broken\n")
    (folder / "notes.md").write_text("not read")
    failing = files / "failing"
    failing.mkdir()
    (failing / "1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs[:10]))
    (failing / "2.jsonl").write_text(json.dumps(pairs[10]) + "\n" + json.dumps({"instruction": "no response"}) + "\n{x\n")
    (failing / "3.jsonl").write_text("{cut\n")
    turn = lambda role, content: {"role": role, "content": content}  # noqa: E731
    chats = [{"messages": [turn("system", "Be brief."), turn("user", f"Hi {i}?"), turn("assistant", f"Hello {i}."),
                           turn("user", "More?"), turn("assistant", "No.")]} for i in range(30)]
    chats += [{"messages": json.dumps([turn("user", "as text"), turn("assistant", "ok")])},
              {"messages": [turn("user", "only a question")]}, {"messages": [turn("robot", "x"), turn("assistant", "y")]}]
    (files / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    texts = files / "texts"
    texts.mkdir()
    for n in range(4):
        (texts / f"doc{n}.txt").write_text("\n\n".join(f"Paragraph {p} of document {n}. " * (1 + p % 4) for p in range(12)))
    (texts / "dupe.txt").write_text("Paragraph 1 of document 0. \n\nA paragraph of its own.\n")
    (files / "table.csv").write_text("question,answer\n" + "".join(f"What is {i}?,It is {i}.\n" for i in range(40)) + "bad,row,here\n")
    pq.write_table(pa.table({"instruction": [f"Q{i}" for i in range(40)], "response": [i * 1.5 if i % 3 else None for i in range(40)]}),
                   files / "table.parquet")
    return [
        ("demo", []),  # the embedded default: demo:stdlib-docs with demo:gemma3-270m's tokenizer
        ("demo-text", ["--input", "demo:python-docs", "--mode", "text", "--base-model", "{model}"]),
        ("mixed", ["--input", "{files}/mixed.jsonl", "--context-field", "context", "--on-bad-record", "skip",
                   "--max-tokens", "64", "--base-model", "{model}"]),
        ("folder", ["--input", "{files}/folder/", "--input-format", "jsonl", "--on-bad-record", "skip", "--max-examples", "40",
                    "--eval-fraction", "0.2", "--seed", "7", "--base-model", "{model}"]),
        ("folder-fail", ["--input", "{files}/failing/", "--input-format", "jsonl", "--base-model", "{model}"]),
        ("chat", ["--input", "{files}/chats.jsonl", "--mode", "chat", "--on-bad-record", "skip", "--base-model", "{model}"]),
        ("text", ["--input", "{files}/texts/", "--mode", "text", "--base-model", "{model}"]),
        ("text-lines", ["--input", "{files}/texts/", "--mode", "text", "--sample-by", "line", "--eval-fraction", "0",
                        "--base-model", "{model}"]),
        ("csv", ["--input", "{files}/table.csv", "--instruction-field", "question", "--response-field", "answer",
                 "--on-bad-record", "skip", "--chat-format", "none", "--base-model", "{model}"]),
        ("parquet", ["--input", "{files}/table.parquet", "--template", "Question: {{instruction}}", "--base-model", "{model}"]),
    ]


def single_machine(args: list[str]) -> dict:
    from jobs.contract.configs.preprocess import DESCRIPTION, PreprocessConfig
    from jobs.preprocessing.core import run

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        try:
            code = main(PreprocessConfig, run, DESCRIPTION, args)
        except SystemExit as exit_:
            code = exit_.code
    return {"code": code, "error": error_line(captured.getvalue()), "log": captured.getvalue()[-4000:]}


def split_bytes(prefix: Path, split: str) -> bytes | None:
    names = [p.name for p in prefix.iterdir()] if prefix.is_dir() else []
    parts = splits.files(names, split, str(prefix))
    return b"".join((prefix / name).read_bytes() for name in parts) if parts else None


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_gemma3, gcs_server):
    root = tmp_path_factory.mktemp("beam-parity")
    files = root / "files"
    catalogue_files(files)
    cases = [(c.id, c.args) for c in CASES if c.stage == "preprocess"] + good_inputs(files)
    context = {"files": str(files), "model": str(tiny_gemma3)}
    runs = {}
    for case_id, args in cases:
        args = [a.format(**context) for a in args]
        if case_id.startswith("P") and "--base-model" not in args:
            args += ["--base-model", str(tiny_gemma3)]
        outputs = {}
        for engine in ("single", "beam"):
            out = next((c.output for c in CASES if c.id == case_id and c.output.startswith("gs://")), str(root / engine / case_id))
            outputs[engine] = [*args, "--output", out]
        runs[case_id] = outputs
    (root / "cases.json").write_text(json.dumps([{"id": i, "args": o["beam"]} for i, o in runs.items()]))
    env = {**os.environ, "GEMMA_PIPELINE_SHARD_BYTES": "2048", "STORAGE_EMULATOR_HOST": gcs_server.url,
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(BEAM_PYTHON), "-m", "tests.jobs.preprocessing.beam_cases", str(root / "cases.json"),
                           str(root / "results.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    beam = {r["id"]: r for r in json.loads((root / "results.json").read_text())}
    from jobs.common import storage

    with pytest.MonkeyPatch.context() as patch:  # the catalogue's gs:// cases talk to the session's emulator
        patch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
        storage.client.cache_clear()
        single = {case_id: single_machine(o["single"]) for case_id, o in runs.items()}
    storage.client.cache_clear()
    return root, single, beam, [case_id for case_id, _ in cases]


def test_every_case_ends_alike(results):
    root, single, beam, ids = results
    assert len(ids) >= 35
    for case_id in ids:
        one, other = single[case_id], beam[case_id]
        assert one["code"] == other["code"], f"{case_id}: single {one['code']}, beam {other['code']}\n{other['log']}\n---\n{one['log']}"
        if case_id in SAME_SUBJECT_ONLY:
            assert SAME_SUBJECT_ONLY[case_id] in one["log"] and SAME_SUBJECT_ONLY[case_id] in other["log"], (one["log"], other["log"])
        else:
            assert one["error"] == other["error"], case_id


def test_good_inputs_give_the_same_rows_split_stats_and_quarantine(results):
    root, single, beam, ids = results
    good = [i for i in ids if not i.startswith("P") and single[i]["code"] == 0]
    assert set(good) == {"demo", "demo-text", "mixed", "folder", "chat", "text", "text-lines", "csv", "parquet"}
    sharded = 0
    for case_id in good:
        one, other = root / "single" / case_id, root / "beam" / case_id
        for split in ("train", "eval", "quarantine"):
            assert split_bytes(one, split) == split_bytes(other, split), f"{case_id}: {split} differs"
        assert json.loads((one / "stats.json").read_text()) == json.loads((other / "stats.json").read_text()), case_id
        manifest = json.loads((other / "_manifest.json").read_text())
        assert manifest["engine"] == "beam" and manifest["stage"] == "preprocess"
        for name, meta in nonempty(manifest["outputs"], "manifest outputs").items():  # the manifest lists every shard with its digest
            assert hashlib.sha256((other / name).read_bytes()).hexdigest() == meta["sha256"], name
        assert {n for n in manifest["outputs"]} == {p.name for p in other.iterdir()} - {"_manifest.json"}
        sharded += len(splits.files(manifest["outputs"], "train", case_id)) > 1
    assert sharded >= 5  # 2 KiB shards: most cases span several, so order across shards is checked
    stats = json.loads((root / "beam" / "mixed" / "stats.json").read_text())
    assert stats["dropped"]["duplicate"] == 2 and stats["dropped"]["bad_record"] == 1 and stats["coerced"]["number_to_text"] == 1
    assert stats["dropped"]["too_long"] == 1 and stats["dropped"]["missing_field"] == 2 and stats["dropped"]["wrong_type"] == 1
    folder = json.loads((root / "beam" / "folder" / "stats.json").read_text())
    assert folder["dropped"]["duplicate"] == 11 and folder["dropped"]["over_cap"] == 20 and folder["rows_out"] == 40


def test_readers_see_sharded_splits_as_one(results, tmp_path):
    from jobs.convert.answers import eval_prompts
    from jobs.finetuning import data as data_lib

    root, *_ = results
    one, other = root / "single" / "mixed", root / "beam" / "mixed"
    assert len(list(other.glob("train-*"))) > 1
    for split in ("train", "eval"):
        assert data_lib.read_split(other, split, "--data") == data_lib.read_split(one, split, "--data")
    assert eval_prompts(str(other), tmp_path, 5) == eval_prompts(str(one), tmp_path, 5)


def test_a_failed_case_leaves_no_manifest(results):
    root, single, beam, _ = results
    assert beam["folder-fail"]["code"] == 2 and "failing/2.jsonl:2" in beam["folder-fail"]["error"]
    assert not (root / "beam" / "folder-fail" / "_manifest.json").exists()
    # What the DAG reads to fail at once rather than retry (Dataflow's job state carries no exit code).
    left = json.loads((root / "beam" / "folder-fail" / "_error.json").read_text())
    assert left["exit_code"] == 2 and left["error"] in beam["folder-fail"]["error"]
