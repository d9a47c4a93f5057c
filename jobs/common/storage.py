"""Stage inputs to local disk and publish outputs, for `gs://` URIs and plain local paths alike.

google-cloud-storage honours `STORAGE_EMULATOR_HOST`, so the same code runs against a local emulator.
Large files go through the client's transfer manager (sliced parallel download / multipart upload).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
from pathlib import Path, PurePosixPath

from jobs.common import faults, timing
from jobs.contract.errors import BadInputError

log = logging.getLogger(__name__)

# Files at least this large are transferred in parallel slices.
LARGE_FILE_BYTES = 64 * 1024 * 1024
CHUNK_BYTES = 32 * 1024 * 1024
WORKERS = 8


def is_gcs(uri: str) -> bool:
    return uri.startswith("gs://")


_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")


def split_gcs(uri: str) -> tuple[str, str]:
    """`gs://bucket/a/b` -> (`bucket`, `a/b`); rejects empty buckets and `..` segments."""
    rest = uri[len("gs://") :]
    bucket, _, path = rest.partition("/")
    if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket or any(part == ".." for part in path.split("/")):
        raise BadInputError("uri", uri, "gs://BUCKET/PATH with a valid bucket name and no '..' segments")
    return bucket, path


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/' for gs:// and the OS separator for local paths."""
    if is_gcs(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


@functools.cache
def client():  # -> google.cloud.storage.Client
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "local"), credentials=AnonymousCredentials())
    return storage.Client()


def _bucket(name: str):
    from google.api_core import exceptions

    bucket = client().bucket(name)
    try:
        if not bucket.exists():
            raise BadInputError("bucket", f"gs://{name}", "an existing Cloud Storage bucket")
    except exceptions.Forbidden as err:
        raise BadInputError("bucket", f"gs://{name}", "a bucket this service account can read", str(err)) from err
    return bucket


def exists(uri: str) -> bool:
    if is_gcs(uri):
        bucket, path = split_gcs(uri)
        return _bucket(bucket).blob(path).exists()
    return Path(uri).exists()


def read_bytes(uri: str) -> bytes:
    if is_gcs(uri):
        bucket, path = split_gcs(uri)
        return _bucket(bucket).blob(path).download_as_bytes()
    return Path(uri).read_bytes()


class Conflict(RuntimeError):
    """A conditional write or delete found the object changed by another writer (HTTP 412 on Cloud Storage)."""


def _local_generation(path: Path) -> int:
    """A local file's stand-in for a generation: every write here makes a new file (inode), and mtime alone can
    repeat within the filesystem's clock tick."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    return hash((st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)) & ((1 << 62) - 1) or 1


def generation(uri: str) -> int:
    """The object's generation (0: absent): what a later conditional write or delete names."""
    if is_gcs(uri):
        bucket, path = split_gcs(uri)
        blob = _bucket(bucket).get_blob(path)
        return int(blob.generation) if blob is not None else 0
    return _local_generation(Path(uri))


def write_bytes(uri: str, data: bytes, content_type: str = "application/octet-stream",
                if_generation_match: int | None = None) -> None:
    """Write an object whole. With `if_generation_match` the write happens only if the object is still at that
    generation (0: only if absent), else Conflict: a stale writer never overwrites a newer object."""
    if is_gcs(uri):
        from google.api_core.exceptions import PreconditionFailed

        bucket, path = split_gcs(uri)
        try:
            _bucket(bucket).blob(path).upload_from_string(data, content_type=content_type, if_generation_match=if_generation_match)
        except PreconditionFailed as err:
            raise Conflict(f"{uri} was changed by another writer (expected generation {if_generation_match})") from err
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    if if_generation_match == 0:
        try:
            os.link(tmp, target)  # atomic create-only: fails if the file exists
        except FileExistsError as err:
            raise Conflict(f"{uri} was written by another writer meanwhile") from err
        finally:
            tmp.unlink(missing_ok=True)
        return
    if if_generation_match is not None and _local_generation(target) != if_generation_match:
        tmp.unlink(missing_ok=True)
        raise Conflict(f"{uri} was changed by another writer (expected generation {if_generation_match})")
    os.replace(tmp, target)  # atomic, so readers never see half a file


def delete(uri: str, if_generation_match: int | None = None) -> None:
    """Delete if present; with `if_generation_match`, only that generation of it (else Conflict)."""
    if is_gcs(uri):
        from google.api_core.exceptions import NotFound, PreconditionFailed

        bucket, path = split_gcs(uri)
        if if_generation_match is not None and generation(uri) not in (0, if_generation_match):
            # Also checked by reading first: fake-gcs-server ignores preconditions on delete (Cloud Storage does not).
            raise Conflict(f"{uri} was changed by another writer (expected generation {if_generation_match})")
        try:
            _bucket(bucket).blob(path).delete(if_generation_match=if_generation_match)
        except NotFound:
            pass
        except PreconditionFailed as err:
            raise Conflict(f"{uri} was changed by another writer (expected generation {if_generation_match})") from err
        return
    path = Path(uri)
    if if_generation_match is not None and _local_generation(path) not in (0, if_generation_match):
        raise Conflict(f"{uri} was changed by another writer (expected generation {if_generation_match})")
    path.unlink(missing_ok=True)


def list_files(uri: str) -> list[str]:
    """Relative names of every file under a prefix (recursively)."""
    if is_gcs(uri):
        return sorted(_list_blobs(uri))
    root = Path(uri)
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file())


def fingerprints(uri: str) -> dict[str, list]:
    """{relative name: [size, crc32c]} of a gs:// object or of the objects under a prefix, from one listing: how an
    input too big to download and hash is recorded."""
    bucket, path = split_gcs(uri)
    blob = _bucket(bucket).get_blob(path) if path and not path.endswith("/") else None
    blobs = {"": blob} if blob is not None else _list_blobs(uri)
    return {name: [b.size, b.crc32c] for name, b in sorted(blobs.items())}


def _list_blobs(uri: str) -> dict:  # -> {relative name: Blob}
    """The objects under a gs:// prefix, with the metadata (size, generation) the listing already returns."""
    bucket, path = split_gcs(uri)
    prefix = path.rstrip("/") + "/" if path else ""
    return {b.name[len(prefix):]: b for b in client().list_blobs(bucket, prefix=prefix) if not b.name.endswith("/")}


def _safe_local(root: Path, relative: str) -> Path:
    """Refuse object names that would land outside the staging directory."""
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise BadInputError("object name", relative, "a relative name without '..'")
    return root.joinpath(*rel.parts)


@timing.timed("staging")
def stage_in(uri: str, workdir: Path, name: str | None = None) -> Path:
    """Make `uri` (a file or a prefix) available on local disk and return the local path.

    Local paths are used in place; gs:// objects are downloaded under `workdir`.
    """
    if not is_gcs(uri):
        path = Path(uri)
        if not path.exists():
            raise BadInputError("input", uri, "an existing file or directory")
        return path
    from google.cloud.storage import transfer_manager

    bucket_name, path = split_gcs(uri)
    bucket = _bucket(bucket_name)
    blob = bucket.get_blob(path) if path and not path.endswith("/") else None
    if blob is not None:  # a single object
        target = workdir / (name or PurePosixPath(path).name)
        target.parent.mkdir(parents=True, exist_ok=True)
        _download_blob(blob, target)
        return target
    blobs = _list_blobs(uri)  # one listing gives every size: no metadata request per object
    if not blobs:
        raise BadInputError("input", uri, "an existing object or a prefix with objects under it")
    root = workdir / (name or PurePosixPath(path.rstrip("/")).name or bucket_name)
    small = []
    for rel, blob in sorted(blobs.items()):
        target = _safe_local(root, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        if blob.size and blob.size >= LARGE_FILE_BYTES:
            _download_blob(blob, target)
        else:
            small.append((blob, target))
    if small:
        results = transfer_manager.download_many(
            [(b, str(t)) for b, t in small], max_workers=WORKERS, worker_type=transfer_manager.THREAD
        )
        _raise_first(results)
    log.info("staged %s -> %s (%d files)", uri, root, len(blobs))
    return root


def _download_blob(blob, target: Path) -> None:
    from google.cloud.storage import transfer_manager

    if blob.size and blob.size >= LARGE_FILE_BYTES:
        transfer_manager.download_chunks_concurrently(
            blob, str(target), chunk_size=CHUNK_BYTES, max_workers=WORKERS, worker_type=transfer_manager.THREAD
        )
    else:
        blob.download_to_filename(str(target))


def _raise_first(results: list) -> None:
    for result in results:
        if isinstance(result, Exception):
            raise result


@timing.timed("publish")
def publish_dir(local_dir: Path, uri: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy every file under `local_dir` to `uri` and return the relative names copied."""
    names = [str(p.relative_to(local_dir).as_posix()) for p in sorted(local_dir.rglob("*")) if p.is_file()]
    names = [n for n in names if n not in skip]
    if not is_gcs(uri):
        dest = Path(uri)
        if dest.resolve() != local_dir.resolve():
            for rel in names:
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local_dir / rel, target)
                faults.point("upload")
        return names
    from google.cloud.storage import transfer_manager

    bucket_name, path = split_gcs(uri)
    bucket = _bucket(bucket_name)
    prefix = path.rstrip("/") + "/" if path else ""
    small = []
    for rel in names:
        source = local_dir / rel
        if source.stat().st_size >= LARGE_FILE_BYTES and os.environ.get("STORAGE_EMULATOR_HOST"):
            # fake-gcs-server lacks the XML multipart API behind parallel uploads; use a resumable upload.
            bucket.blob(prefix + rel, chunk_size=CHUNK_BYTES).upload_from_filename(str(source))
            faults.point("upload")
        elif source.stat().st_size >= LARGE_FILE_BYTES:
            transfer_manager.upload_chunks_concurrently(
                str(source), bucket.blob(prefix + rel), chunk_size=CHUNK_BYTES, max_workers=WORKERS,
                worker_type=transfer_manager.THREAD,
            )
            faults.point("upload")
        else:
            small.append(rel)
    if small:
        results = transfer_manager.upload_many_from_filenames(
            bucket, small, source_directory=str(local_dir), blob_name_prefix=prefix, max_workers=WORKERS,
            worker_type=transfer_manager.THREAD,
        )
        _raise_first(results)
        faults.point("upload")
    log.info("published %d files -> %s", len(names), uri)
    return names
