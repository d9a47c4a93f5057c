from __future__ import annotations

import json

import pytest

from jobs.common import manifest
from jobs.common.errors import BadInputError


def _run(out, config=None, inputs=None):
    return manifest.StageRun("unit", str(out), config or {"a": 1}, inputs or [{"uri": "x", "sha256": "0"}])


def test_manifest_records_outputs_and_rerun_is_skipped(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.txt").write_text("payload")
    stage = _run(out)
    assert not stage.already_done()
    written = stage.finish(out, {"rows": 3})
    on_disk = json.loads((out / manifest.MANIFEST).read_text())
    assert on_disk == written
    assert on_disk["outputs"]["data.txt"]["bytes"] == 7
    assert on_disk["outputs"]["data.txt"]["sha256"] == manifest.sha256_file(out / "data.txt")
    assert on_disk["metrics"] == {"rows": 3}
    assert on_disk["peak_rss_bytes"] > 0 and on_disk["wall_time_s"] >= 0
    assert _run(out).already_done()
    assert not _run(out, config={"a": 2}).already_done()
    assert not _run(out, inputs=[{"uri": "x", "sha256": "1"}]).already_done()


def test_invalidate_removes_manifest(tmp_path):
    (tmp_path / manifest.MANIFEST).write_text("{}")
    _run(tmp_path).invalidate()
    assert not (tmp_path / manifest.MANIFEST).exists()


def test_upstream_without_manifest_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="--data.*incomplete or wrong URI"):
        manifest.upstream_ref(str(tmp_path), "--data")
    (tmp_path / manifest.MANIFEST).write_text("{not json")
    with pytest.raises(BadInputError, match="readable _manifest.json"):
        manifest.upstream_ref(str(tmp_path), "--data")


def test_upstream_digest_changes_with_manifest(tmp_path):
    (tmp_path / manifest.MANIFEST).write_text(json.dumps({"stage": "a"}))
    first = manifest.upstream_ref(str(tmp_path), "--data")
    (tmp_path / manifest.MANIFEST).write_text(json.dumps({"stage": "b"}))
    assert manifest.upstream_ref(str(tmp_path), "--data") != first


def test_a_tokenizer_only_model_ref_ignores_weights_but_not_the_tokenizer(tmp_path):
    from jobs.common.models import model_ref

    (tmp_path / "tokenizer.json").write_text('{"v": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"w1")
    tok, full = model_ref("m", str(tmp_path), tokenizer_only=True), model_ref("m", str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"w2")
    assert model_ref("m", str(tmp_path), tokenizer_only=True) == tok and model_ref("m", str(tmp_path)) != full
    (tmp_path / "tokenizer.json").write_text('{"v": 2}')
    assert model_ref("m", str(tmp_path), tokenizer_only=True) != tok
