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

import shutil
from pathlib import Path

import pytest

from jobs.common.cli import main
from jobs.contract import stages
from jobs.contract.artifacts import MANIFEST
from jobs.contract.errors import EXIT_BAD_INPUT
from tests.support.bad_inputs import CASES, catalogue_files


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_gemma3, tiny_run, gcs_server):
    root = tmp_path_factory.mktemp("bad-input")
    files = root / "files"
    catalogue_files(files)
    paths = tiny_run
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
    stage = stages.get(case.stage)
    config_cls, run = stage.config, importlib.import_module(f"{stage.module}.core").run
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
    from gemma_pipeline.plan import candidates, form

    params = {**{name: default for name, (default, _) in form.specs().items()}, "bucket": "b",
              "finetune_profile": "cpu", "benchmark_profile": "cpu", "candidates": value}
    with pytest.raises(ValueError) as error:
        candidates.plan(params, "r")
    assert message in str(error.value)


PARAM_CASES = [("lora_rank", 0), ("lora_rank", -3), ("finetune_profile", "tpu-v9-64"), ("require_improvement", 1.5),
               ("queue", "Not_A_Queue"), ("bucket", "x"), ("run_name", "../x"), ("dataset", ""), ("learning_rate", 0)]


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
    from gemma_pipeline.tools import preflight

    from tests.conftest import ROOT

    if not shutil.which("kubectl"):
        pytest.skip("kubectl (with kustomize) is needed to build the overlay")
    code = preflight.main(["--profile", "cpu", "--namespace", "team-a", "--queue", "no-such-queue",
                           "--kueue", str(ROOT / "k8s" / "kueue" / "overlays" / "dev")])
    out = capsys.readouterr()
    assert code == 2 and "no-such-queue" in out.out + out.err
