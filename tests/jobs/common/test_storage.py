from __future__ import annotations

import pytest

from jobs.common import storage
from jobs.contract.errors import BadInputError


def _tree(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    (root / "sub" / "deeper" / "c.json").write_text("{}")
    return {"a.txt", "sub/b.bin", "sub/deeper/c.json"}


def test_publish_and_stage_prefix_round_trip(gcs, tmp_path):
    names = _tree(tmp_path / "src")
    published = storage.publish_dir(tmp_path / "src", f"{gcs}/run/out")
    assert set(published) == names
    assert set(storage.list_files(f"{gcs}/run/out")) == names
    local = storage.stage_in(f"{gcs}/run/out", tmp_path / "stage")
    for name in names:
        assert (local / name).read_bytes() == (tmp_path / "src" / name).read_bytes()


def test_large_files_use_parallel_chunks(gcs, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "LARGE_FILE_BYTES", 1024)
    monkeypatch.setattr(storage, "CHUNK_BYTES", 1024 * 256)
    src = tmp_path / "src"
    src.mkdir()
    payload = bytes(range(256)) * 4096  # 1 MiB: several chunks
    (src / "big.bin").write_bytes(payload)
    storage.publish_dir(src, f"{gcs}/big")
    assert storage.stage_in(f"{gcs}/big/big.bin", tmp_path / "dl").read_bytes() == payload
    assert (storage.stage_in(f"{gcs}/big", tmp_path / "dl2") / "big.bin").read_bytes() == payload


def test_single_object_and_bytes(gcs, tmp_path):
    storage.write_bytes(f"{gcs}/x/y.txt", b"hello")
    assert storage.exists(f"{gcs}/x/y.txt")
    assert storage.read_bytes(f"{gcs}/x/y.txt") == b"hello"
    assert storage.stage_in(f"{gcs}/x/y.txt", tmp_path).read_text() == "hello"
    storage.delete(f"{gcs}/x/y.txt")
    assert not storage.exists(f"{gcs}/x/y.txt")


def test_missing_object_and_bucket_are_bad_input(gcs, tmp_path):
    with pytest.raises(BadInputError, match="existing object"):
        storage.stage_in(f"{gcs}/nothing/here", tmp_path)
    with pytest.raises(BadInputError, match="existing Cloud Storage bucket"):
        storage.stage_in("gs://no-such-bucket-anywhere/file.jsonl", tmp_path)


def test_local_paths_work_in_place(tmp_path):
    names = _tree(tmp_path / "src")
    assert storage.stage_in(str(tmp_path / "src"), tmp_path / "unused") == tmp_path / "src"
    storage.publish_dir(tmp_path / "src", str(tmp_path / "dest"))
    assert set(storage.list_files(str(tmp_path / "dest"))) == names
    with pytest.raises(BadInputError, match="existing file"):
        storage.stage_in(str(tmp_path / "missing.jsonl"), tmp_path)


@pytest.mark.parametrize("uri", ["gs://", "gs://bucket/../etc", "gs://bucket/a/../../b"])
def test_rejects_bad_gcs_uris(uri):
    with pytest.raises(BadInputError):
        storage.split_gcs(uri)


def test_object_names_cannot_escape_staging_dir(tmp_path):
    with pytest.raises(BadInputError, match="without '..'"):
        storage._safe_local(tmp_path, "../../etc/passwd")
