"""The bad-input catalogue: every case fails at once with a non-retriable exit code (2) or a Param validation
error, a message naming the field, the value and what was expected, and no output that looks complete.

| id | stage / form | input | expected message names |
|---|---|---|---|
| P01 | preprocess | a JSON line cut short | `--input`, `bad.jsonl:2`, malformed JSON |
| P02 | preprocess | bytes that are not UTF-8 | `--input`, the byte offset |
| P03 | preprocess | `--response-field answer` on data without it | `--response-field`, `answer`, the columns present |
| P04 | preprocess | `--template` with `{question}` absent from the data | `--template`/`question` |
| P05 | preprocess | `--max-tokens 8`: zero rows left after filtering | rows, 0, the drop counts |
| P06 | preprocess | a `.docx` dataset | `--input`, the supported formats |
| P07 | preprocess | a dataset file that does not exist | `--input`/`input`, the path |
| P08 | preprocess | a bucket that does not exist | `gs://no-such-bucket-42`, existing bucket |
| P09 | preprocess | an unknown base model | `--base-model`, the name |
| P10 | preprocess | `--eval-fraction 1.0` | `--eval-fraction`, `[0, 1)` |
| P11 | preprocess | an unknown option | `--no-such-option` |
| P12 | preprocess | `--chat-format llama` | `--chat-format`, `gemma` |
| P13 | preprocess | `--output gs://` | `--output`/`uri`, `gs://` |
| P14 | preprocess | `--on-bad-record ignore` | `--on-bad-record`, `skip` |
| P15 | preprocess | `--input gs://bucket/../etc/passwd` | `..` |
| P16 | preprocess | `--mode chat`: a conversation that ends with a user turn | `--input`, the row, ends with a user turn |
| P17 | preprocess | `--mode chat`: a turn with role `robot` | the row, `messages[1].role`, `'robot'`, the roles |
| P18 | preprocess | `--mode chat`: an empty assistant turn | the row, empty assistant turn |
| P19 | preprocess | `--mode chat` on data without a `messages` column | `--messages-field`, `messages`, the columns present |
| P20 | preprocess | `--mode text` on data without a `text` column | `--text-field`, `text`, the columns present |
| P21 | preprocess | a truncated `.jsonl.gz` | `--input`, the file, `complete, valid gzip archive`, corrupt or truncated |
| P22 | preprocess | a `.jsonl.xz` with corrupted bytes | `--input`, the file, `valid xz archive` |
| P23 | preprocess | `data.jsonl.gz` that is plain text | `a gzip archive`, magic bytes |
| P24 | preprocess | a list where the response text should be (fail mode) | the row, `field 'response' holds a list`, expected text |
| P25 | preprocess | dedup leaves 1 row; `--eval-fraction 0.1` asks for an eval split | `--eval-fraction`, `1 row(s) left`, the drop counts, `--eval-fraction 0` |
| P26 | preprocess | every response null | `rows: got 0`, `'null': 3` |
| P27 | preprocess | `--mode chat`: `messages` holds text that is not JSON | the row, `not a JSON list of turns` |
| F01 | finetune | `--lora-rank 0` | `--lora-rank`, `[1, 512]` |
| F02 | finetune | `--lora-rank -3` | `--lora-rank`, `[1, 512]` |
| F03 | finetune | `--data` prefix without a manifest | `--data`, `_manifest.json` |
| F04 | finetune | an unreadable (corrupt) checkpoint marked complete | `--output`, readable checkpoint, `--no-resume` |
| F05 | finetune | `--sequence-length 8`, shorter than the prompts | `--sequence-length`, `8`, response token |
| F06 | finetune | `--lora-targets nothing` | `--lora-targets`, `nothing` |
| F07 | finetune | `--batch-size 0` | `--batch-size` |
| F08 | finetune | `--learning-rate 0` | `--learning-rate`, `(0, 1)` |
| F09 | finetune | `--model-parallel 2` with `--distribution data` | `--model-parallel` |
| F10 | finetune | an unknown base model | `--base-model` |
| F14 | finetune | `--base-quantization float8` (Keras cannot train LoRA on it) | `--base-quantization`, `none, int8, int4` |
| F15 | finetune | `--base-quantization int4 --model-parallel 2` | `--model-parallel`, `int4` |
| B01 | benchmark | `--require-improvement 1.5` | `--require-improvement`, `[0, 1)` |
| B02 | benchmark | `--finetune` prefix without a manifest | `--finetune`, `_manifest.json` |
| B03 | benchmark | `--mode words` | `--mode`, `response` |
| B04 | benchmark | `--stride 500 --max-length 64` | `--stride` |
| B05 | benchmark | `--mode response` on raw-text data | `--mode`, `text or auto` |
| C01 | convert | `--finetune` prefix without a manifest | `--finetune`, `_manifest.json` |
| C02 | convert | `--dtype float16` | `--dtype`, `bfloat16` |
| C03 | convert | `--adapter weights.bin` | `--adapter`, `.lora.h5` |
| D01-D09 | trigger form | `lora_rank` 0 / -3, unknown profile, quality gate 1.5, queue `Not_A_Queue`, bucket `x`, `run_name` `../x`, empty dataset, `learning_rate` 0 | `Invalid input for param <name>:`, the value, the schema rule |
| D10 | trigger conf | a key that is not a param (`lora_rnak`) | the key, the closest param `lora_rank` |
| D11 | trigger form | `candidates` `[{"lora_rank": 0}]`, `[{"lora_rnak": 8}]` | `Invalid input for param candidates:`, the schema rule |
| D12 | plan task | a candidate list the form did not see (CLI conf): bad field, bad value, duplicate | `candidates[i].field`, the value, what was expected |
| K01 | preflight | a LocalQueue that does not exist | the queue name, exit 2 |
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jobs.common.cli import main
from jobs.contract.artifacts import MANIFEST
from jobs.contract.errors import EXIT_BAD_INPUT
from tests.pipeline import tiny_pipeline


@dataclass
class Case:
    id: str
    stage: str
    args: list[str]
    expect: list[str]
    output: str = "out"
    setup: list[str] = field(default_factory=list)


STAGES = {
    "preprocess": ("jobs.contract.configs.preprocess", "PreprocessConfig", "jobs.preprocessing.core"),
    "finetune": ("jobs.contract.configs.finetune", "FinetuneConfig", "jobs.finetuning.core"),
    "benchmark": ("jobs.contract.configs.benchmark", "BenchmarkConfig", "jobs.benchmark.core"),
    "convert": ("jobs.contract.configs.convert", "ConvertConfig", "jobs.convert.core"),
}

CASES = [
    Case("P01", "preprocess", ["--input", "{files}/bad.jsonl"], ["--input", "bad.jsonl:2"]),
    Case("P02", "preprocess", ["--input", "{files}/latin1.jsonl"], ["--input", "byte"]),
    Case("P03", "preprocess", ["--input", "{files}/good.jsonl", "--response-field", "answer"], ["--response-field", "'answer'", "instruction"]),
    Case("P04", "preprocess", ["--input", "{files}/good.jsonl", "--template", "Q: {{question}}"], ["question"]),
    Case("P05", "preprocess", ["--input", "{files}/good.jsonl", "--max-tokens", "8"], ["rows: got 0", "too_long"]),
    Case("P06", "preprocess", ["--input", "{files}/notes.docx"], ["--input", ".jsonl, .json, .csv, .parquet or .txt"]),
    Case("P07", "preprocess", ["--input", "{files}/missing.jsonl"], ["missing.jsonl", "an existing file"]),
    Case("P08", "preprocess", ["--input", "gs://no-such-bucket-42/d.jsonl"], ["gs://no-such-bucket-42", "an existing Cloud Storage bucket"]),
    Case("P09", "preprocess", ["--input", "{files}/good.jsonl", "--base-model", "not-a-real-preset"], ["--base-model", "not-a-real-preset"]),
    Case("P10", "preprocess", ["--input", "{files}/good.jsonl", "--eval-fraction", "1.0"], ["--eval-fraction", "1.0", "[0, 1)"]),
    Case("P11", "preprocess", ["--input", "{files}/good.jsonl", "--no-such-option", "1"], ["--no-such-option"]),
    Case("P12", "preprocess", ["--input", "{files}/good.jsonl", "--chat-format", "llama"], ["--chat-format", "'llama'", "gemma"]),
    Case("P13", "preprocess", ["--input", "{files}/good.jsonl"], ["gs://"], output="gs://"),
    Case("P14", "preprocess", ["--input", "{files}/good.jsonl", "--on-bad-record", "ignore"], ["--on-bad-record", "'ignore'", "skip"]),
    Case("P15", "preprocess", ["--input", "gs://bucket/../etc/passwd.jsonl"], ["'..'"]),
    Case("P16", "preprocess", ["--input", "{files}/chat.jsonl", "--mode", "chat"], ["--input", "chat.jsonl:2", "ends with a user turn"]),
    Case("P17", "preprocess", ["--input", "{files}/chat_robot.jsonl", "--mode", "chat"],
         ["chat_robot.jsonl:1", "messages[1].role: got 'robot'", "system, user, assistant, model"]),
    Case("P18", "preprocess", ["--input", "{files}/chat_empty.jsonl", "--mode", "chat"], ["chat_empty.jsonl:1", "messages[1]: empty assistant turn"]),
    Case("P19", "preprocess", ["--input", "{files}/good.jsonl", "--mode", "chat"], ["--messages-field", "'messages'", "instruction"]),
    Case("P20", "preprocess", ["--input", "{files}/good.jsonl", "--mode", "text"], ["--text-field", "'text'", "instruction"]),
    Case("P21", "preprocess", ["--input", "{files}/cut.jsonl.gz"], ["--input", "cut.jsonl.gz", "complete, valid gzip archive", "corrupt or truncated"]),
    Case("P22", "preprocess", ["--input", "{files}/flipped.jsonl.xz"], ["--input", "flipped.jsonl.xz", "valid xz archive"]),
    Case("P23", "preprocess", ["--input", "{files}/plain.jsonl.gz"], ["--input", "a gzip archive", "magic bytes"]),
    Case("P24", "preprocess", ["--input", "{files}/typed.jsonl"], ["typed.jsonl:2", "field 'response' holds a list", "expected text"]),
    Case("P25", "preprocess", ["--input", "{files}/dupes.jsonl"], ["--eval-fraction", "1 row(s) left", "'duplicate': 4", "--eval-fraction 0"]),
    Case("P26", "preprocess", ["--input", "{files}/nulls.jsonl"], ["rows: got 0", "'null': 3"]),
    Case("P27", "preprocess", ["--input", "{files}/chat_text.jsonl", "--mode", "chat"], ["chat_text.jsonl:1", "not a JSON list of turns"]),
    Case("F01", "finetune", ["--data", "{pre}", "--lora-rank", "0"], ["--lora-rank", "got 0", "an integer in [1, 512]"]),
    Case("F02", "finetune", ["--data", "{pre}", "--lora-rank", "-3"], ["--lora-rank", "got -3", "an integer in [1, 512]"]),
    Case("F03", "finetune", ["--data", "{files}"], ["--data", MANIFEST]),
    Case("F04", "finetune", ["--data", "{pre}"], ["--output", "readable checkpoint", "--no-resume"], setup=["corrupt_checkpoint"]),
    Case("F05", "finetune", ["--data", "{pre}", "--sequence-length", "8"], ["--sequence-length", "got 8", "response token"]),
    Case("F06", "finetune", ["--data", "{pre}", "--lora-targets", "nothing"], ["--lora-targets", "'nothing'"]),
    Case("F07", "finetune", ["--data", "{pre}", "--batch-size", "0"], ["--batch-size", "got 0"]),
    Case("F08", "finetune", ["--data", "{pre}", "--learning-rate", "0"], ["--learning-rate", "got 0", "(0, 1)"]),
    Case("F09", "finetune", ["--data", "{pre}", "--distribution", "data", "--model-parallel", "2"], ["--model-parallel", "got 2", "--distribution model"]),
    Case("F10", "finetune", ["--data", "{pre}", "--base-model", "not-a-real-preset"], ["--base-model", "not-a-real-preset"]),
    Case("F14", "finetune", ["--data", "{pre}", "--base-quantization", "float8"], ["--base-quantization", "got 'float8'", "none, int8, int4"]),
    Case("F15", "finetune", ["--data", "{pre}", "--base-quantization", "int4", "--model-parallel", "2"], ["--model-parallel", "int4"]),
    Case("B01", "benchmark", ["--data", "{pre}", "--finetune", "{ft}", "--require-improvement", "1.5"], ["--require-improvement", "1.5", "[0, 1)"]),
    Case("B02", "benchmark", ["--data", "{pre}", "--finetune", "{files}"], ["--finetune", MANIFEST]),
    Case("B03", "benchmark", ["--data", "{pre}", "--mode", "words"], ["--mode", "'words'", "response"]),
    Case("B04", "benchmark", ["--data", "{pre}", "--max-length", "64", "--stride", "500"], ["--stride", "500"]),
    Case("B05", "benchmark", ["--data", "{text_pre}", "--mode", "response"], ["--mode", "'response'", "text or auto"]),
    Case("C01", "convert", ["--finetune", "{files}"], ["--finetune", MANIFEST]),
    Case("C02", "convert", ["--finetune", "{ft}", "--dtype", "float16"], ["--dtype", "'float16'", "bfloat16"]),
    Case("C03", "convert", ["--base-model", "{model}", "--adapter", "{files}/weights.bin"], ["--adapter", ".lora.h5"]),
]


def catalogue_files(files: Path) -> None:
    """The catalogue's input files (also read by the Beam engine's parity test)."""
    files.mkdir(parents=True, exist_ok=True)
    good = [{"instruction": f"What does helper {i} return?", "response": f"The number {i}."} for i in range(12)]
    (files / "good.jsonl").write_text("\n".join(json.dumps(r) for r in good) + "\n")
    (files / "bad.jsonl").write_text(json.dumps(good[0]) + '\n{"instruction": "cut short", \n')
    (files / "latin1.jsonl").write_bytes(json.dumps(good[0]).encode() + b'\n{"instruction": "caf\xe9", "response": "x"}\n')
    (files / "notes.docx").write_bytes(b"PK\x03\x04 not a dataset")
    turn = lambda role, content: {"role": role, "content": content}  # noqa: E731
    ok = [turn("user", "Hi?"), turn("assistant", "Hello.")]
    (files / "chat.jsonl").write_text(json.dumps({"messages": ok}) + "\n" + json.dumps({"messages": [turn("user", "Hi?")]}) + "\n")
    (files / "chat_robot.jsonl").write_text(json.dumps({"messages": [turn("user", "a"), turn("robot", "b")]}) + "\n")
    (files / "chat_empty.jsonl").write_text(json.dumps({"messages": [turn("user", "a"), turn("assistant", " ")]}) + "\n")
    (files / "weights.bin").write_bytes(b"\0")
    import gzip
    import lzma

    packed = gzip.compress((files / "good.jsonl").read_bytes() * 50)
    (files / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    packed = bytearray(lzma.compress((files / "good.jsonl").read_bytes() * 50))
    packed[len(packed) // 2: len(packed) // 2 + 16] = bytes(16)
    (files / "flipped.jsonl.xz").write_bytes(bytes(packed))
    (files / "plain.jsonl.gz").write_bytes((files / "good.jsonl").read_bytes())
    (files / "typed.jsonl").write_text(json.dumps(good[0]) + "\n" + json.dumps({"instruction": "q", "response": ["a", "b"]}) + "\n")
    (files / "dupes.jsonl").write_text((json.dumps(good[0]) + "\n") * 5)
    (files / "nulls.jsonl").write_text("".join(json.dumps({"instruction": f"q{i}", "response": None}) + "\n" for i in range(3)))
    (files / "chat_text.jsonl").write_text(json.dumps({"messages": "user: hi / assistant: hello"}) + "\n")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_gemma3, gcs_server):
    root = tmp_path_factory.mktemp("bad-input")
    files = root / "files"
    catalogue_files(files)
    paths = tiny_pipeline(root, tiny_gemma3, steps=2)
    from jobs.contract.configs.preprocess import PreprocessConfig
    from jobs.preprocessing.core import run as preprocess

    (files / "doc.txt").write_text("A short document.\n\nAnother paragraph of it.\n\nAnd a third.\n")
    preprocess(PreprocessConfig(input=str(files / "doc.txt"), output=str(root / "text-pre"), base_model=str(tiny_gemma3),
                                mode="text", eval_fraction=0.3), root / "w")
    return {"files": str(files), "pre": str(paths["preprocess"]), "text_pre": str(root / "text-pre"), "ft": str(paths["finetune"]), "model": str(tiny_gemma3),
            "root": root, "emulator": gcs_server.url}


def _corrupt_checkpoint(output: Path) -> None:
    step = output / "checkpoints" / "step-00000001"
    step.mkdir(parents=True)
    (step / "state.npz").write_bytes(b"this is not a zip archive")
    (step / "meta.json").write_text('{"step": 1}')
    (step / "_COMPLETE").touch()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_rejected_plainly(case, ctx, capfd, monkeypatch):
    import importlib

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", ctx["emulator"])
    from jobs.common import storage

    storage.client.cache_clear()
    output = case.output if case.output.startswith("gs://") else str(ctx["root"] / f"out-{case.id}")
    if "corrupt_checkpoint" in case.setup:
        _corrupt_checkpoint(Path(output))
    args = [a.format(**ctx) for a in case.args]
    if case.stage != "convert" and "--base-model" not in args:
        args += ["--base-model", ctx["model"]]
    config_module, config_name, core_module = STAGES[case.stage]
    config_cls = getattr(importlib.import_module(config_module), config_name)
    run = importlib.import_module(core_module).run
    try:
        code = main(config_cls, run, case.stage, [*args, "--output", output])
    except SystemExit as exit_:  # argparse rejects unknown options and malformed values itself
        code = exit_.code
    text = capfd.readouterr()
    message = text.out + text.err
    assert code == EXIT_BAD_INPUT, message[-3000:]
    for fragment in case.expect:
        assert fragment in message, f"{case.id}: {fragment!r} not in:\n{message[-3000:]}"
    if not output.startswith("gs://"):
        assert not (Path(output) / MANIFEST).exists()  # nothing that looks complete
    storage.client.cache_clear()


def test_the_documented_catalogue_is_the_tested_one():
    """The table above is what users read; every row is a test here and every test a row."""
    import re

    documented = set(re.findall(r"^\| ([A-Z]\d\d)(?:-[A-Z]\d\d)? \|", __doc__, re.M))
    tested = {c.id for c in CASES} | {"D01", "D10", "D11", "D12", "K01"}
    assert len({c.id for c in CASES}) == len(CASES)
    assert documented == tested
    assert len(PARAM_CASES) == 9  # D01-D09


# D10 (a conf key that is not a param) is proven in a real run: tests/reliability/test_local_dag.py.


@pytest.mark.parametrize("value", [[{"lora_rank": 0}], [{"lora_rnak": 8}], [], [{"finetune_profile": "tpu-v9"}]])
def test_D11_the_trigger_form_rejects_a_bad_candidate_list(dag, value):
    import copy

    from airflow.sdk.exceptions import ParamValidationError

    params = copy.deepcopy(dag.params)
    with pytest.raises(ParamValidationError, match="Invalid input for param candidates:"):
        params["candidates"] = value


@pytest.mark.parametrize("value,message", [
    ([{}, {"lora_rnak": 8}], "candidates[1].lora_rnak: not a field a candidate can override (did you mean 'lora_rank'?)"),
    ([{"learning_rate": 0}], "candidates[0].learning_rate: got 0; expected"),
    ([{}, {}], "candidates[1]: the same overrides as candidates[0]"),
])
def test_D12_the_plan_names_the_candidate_and_the_field_before_any_job(value, message):
    from gemma_pipeline import candidates, jobspec

    params = {**jobspec.param_defaults(), "bucket": "b", "finetune_profile": "cpu", "benchmark_profile": "cpu",
              "convert_profile": "cpu", "candidates": value}
    with pytest.raises(ValueError) as error:
        candidates.plan(params, "r")
    assert message in str(error.value)


PARAM_CASES = [("lora_rank", 0), ("lora_rank", -3), ("finetune_profile", "tpu-v9-64"), ("require_improvement", 1.5),
               ("queue", "Not_A_Queue"), ("bucket", "x"), ("run_name", "../x"), ("dataset", ""), ("learning_rate", 0)]


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    from tests.conftest import ROOT

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["gemma_lora_finetune"]


@pytest.mark.parametrize("name,value", PARAM_CASES, ids=[f"D{i + 1:02d}-{n}" for i, (n, _) in enumerate(PARAM_CASES)])
def test_the_trigger_form_rejects_bad_params(dag, name, value):
    import copy

    from airflow.sdk.exceptions import ParamValidationError

    params = copy.deepcopy(dag.params)  # what the trigger form and `dags test -c` validate against
    with pytest.raises(ParamValidationError) as error:
        params[name] = value
    message = str(error.value)
    assert f"Invalid input for param {name}:" in message and repr(value) in message.replace('"', "'")


def test_K01_preflight_names_a_missing_queue(capsys):
    from gemma_pipeline import preflight

    from tests.conftest import ROOT

    if not shutil.which("kubectl"):
        pytest.skip("kubectl (with kustomize) is needed to build the overlay")
    code = preflight.main(["--profile", "cpu", "--namespace", "team-a", "--queue", "no-such-queue",
                           "--kueue", str(ROOT / "k8s" / "kueue" / "overlays" / "dev")])
    out = capsys.readouterr()
    assert code == 2 and "no-such-queue" in out.out + out.err
