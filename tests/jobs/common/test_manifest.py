from __future__ import annotations

import json

import pytest

from jobs.common import manifest
from jobs.contract import artifacts, documents
from jobs.contract.errors import BadInputError


def _run(out, config=None, inputs=None):
    return manifest.StageRun("unit", str(out), config or {"a": 1}, inputs or [{"uri": "x", "sha256": "0"}],
                             code={"source_sha256": "unit-test"})


def test_manifest_records_outputs_and_rerun_is_skipped(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.txt").write_text("payload")
    stage = _run(out)
    assert not stage.already_done()
    written = stage.finish(out, {"rows": 3})
    on_disk = json.loads((out / artifacts.MANIFEST).read_text())
    assert on_disk == written
    assert on_disk["outputs"]["data.txt"]["bytes"] == 7
    assert on_disk["outputs"]["data.txt"]["sha256"] == manifest.sha256_file(out / "data.txt")
    assert on_disk["metrics"]["rows"] == 3 and set(on_disk["metrics"]["time_split"]) == set(documents.PHASES)
    assert on_disk["peak_rss_bytes"] > 0 and on_disk["wall_time_s"] >= 0
    assert _run(out).already_done()
    assert not _run(out, config={"a": 2}).already_done()
    assert not _run(out, inputs=[{"uri": "x", "sha256": "1"}]).already_done()


def test_a_rerun_names_only_the_options_that_changed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _run(out, config={"targets": ("query", "value"), "empty": (), "approval": "a"}).finish(out, {})
    existing = json.loads((out / artifacts.MANIFEST).read_text())
    again = _run(out, config={"targets": ("query", "value"), "empty": (), "approval": "b"})
    assert again.rerun_reasons(existing) == ["the config changed (approval)"]  # a tuple read back is a list


def test_invalidate_removes_manifest(tmp_path):
    (tmp_path / artifacts.MANIFEST).write_text("{}")
    _run(tmp_path).invalidate()
    assert not (tmp_path / artifacts.MANIFEST).exists()


def test_upstream_without_manifest_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="--data.*incomplete or wrong URI"):
        manifest.upstream_ref(str(tmp_path), "--data")
    (tmp_path / artifacts.MANIFEST).write_text("{not json")
    with pytest.raises(BadInputError, match="readable _manifest.json"):
        manifest.upstream_ref(str(tmp_path), "--data")


def test_upstream_digest_changes_with_manifest(tmp_path):
    (tmp_path / artifacts.MANIFEST).write_text(json.dumps({"stage": "a"}))
    first = manifest.upstream_ref(str(tmp_path), "--data")
    (tmp_path / artifacts.MANIFEST).write_text(json.dumps({"stage": "b"}))
    assert manifest.upstream_ref(str(tmp_path), "--data") != first


def test_a_tokenizer_only_model_ref_ignores_weights_but_not_the_tokenizer(tmp_path):
    from jobs.common.sources import model_ref

    (tmp_path / "tokenizer.json").write_text('{"v": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"w1")
    tok, full = model_ref("m", str(tmp_path), tokenizer_only=True), model_ref("m", str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"w2")
    assert model_ref("m", str(tmp_path), tokenizer_only=True) == tok and model_ref("m", str(tmp_path)) != full
    (tmp_path / "tokenizer.json").write_text('{"v": 2}')
    assert model_ref("m", str(tmp_path), tokenizer_only=True) != tok


def test_a_stage_reruns_when_its_code_changes_and_skips_when_it_does_not(tmp_path, tiny_gemma3, monkeypatch, caplog):
    """The skip key holds the code's identity, a digest of the source files the stage reaches: preprocessing
    runs, runs again (skipped), then a fix to a module it reaches (here in a copy of the package that the
    digest is computed over) makes the same config and inputs run again, and the log says why."""
    import json as json_
    import logging
    import shutil

    from jobs.common import code_identity
    from jobs.contract.configs.preprocess import PreprocessConfig
    from jobs.preprocessing.core import run as preprocess
    from tests.conftest import ROOT

    copy = tmp_path / "code"
    shutil.copytree(ROOT / "jobs", copy / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(code_identity, "_ROOT", copy)
    code_identity.source_digest.cache_clear()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json_.dumps({"instruction": f"q{i}", "response": f"a {i}"}) + "\n" for i in range(12)))
    config = PreprocessConfig(input=str(data), output=str(tmp_path / "out"), base_model=str(tiny_gemma3))

    def run() -> str:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="jobs.common.manifest"):
            preprocess(config, tmp_path / "w")
        return caplog.text

    assert "RUNNING preprocess: no manifest yet" in run()
    first = json_.loads((tmp_path / "out" / "_manifest.json").read_text())["code"]
    assert "SKIPPED" in run()  # unchanged code, config and inputs
    with (copy / "jobs" / "common" / "storage.py").open("a") as handle:
        handle.write("\n# a fix in a module the stage reaches\n")
    code_identity.source_digest.cache_clear()  # a new process would compute it afresh
    log = run()
    assert "RUNNING preprocess: the code changed" in log and "SKIPPED" not in log
    assert json_.loads((tmp_path / "out" / "_manifest.json").read_text())["code"] != first
    code_identity.source_digest.cache_clear()


def test_an_image_pinned_by_digest_is_the_code_identity(monkeypatch):
    from jobs.common.code_identity import IMAGE_ENV, code_identity, source_digest

    monkeypatch.setenv(IMAGE_ENV, "r/preprocess:1.0")  # a tag can move: the source digest decides
    assert code_identity("preprocess") == {"source_sha256": source_digest("jobs.preprocessing")}
    monkeypatch.setenv(IMAGE_ENV, "r/preprocess@sha256:" + "a" * 64)
    assert code_identity("preprocess") == {"image": "r/preprocess@sha256:" + "a" * 64}
    assert source_digest("jobs.preprocessing") != source_digest("jobs.convert")
