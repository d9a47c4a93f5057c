"""The stage manifest, `_manifest.json`: written last, so a prefix without one is incomplete.

It records the stage, the code's identity (image digest or source digest, see `code_identity`), exact config,
inputs (with the digests of their own manifests), output files with sizes and checksums, metrics, wall time
and peak RSS. A rerun whose stage, code, config and input digests match an existing manifest is skipped; any
other rerun logs why it runs again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.common import faults, storage, timing
from jobs.common.code_identity import code_identity
from jobs.contract import artifacts, documents
from jobs.contract.errors import BadInputError

log = logging.getLogger(__name__)



def code_version() -> str:
    try:
        from importlib.metadata import version

        return version("gemma-lora-pipeline")
    except Exception:  # running from a checkout without installation
        return "0+unknown"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process and its waited-for children (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * 1024


def read_manifest(prefix: str) -> dict[str, Any] | None:
    uri = storage.join(prefix, artifacts.MANIFEST)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


def upstream_ref(prefix: str, field_name: str) -> dict[str, str]:
    """Reference to another stage's output; exit 2 if its manifest is missing or unreadable."""
    try:
        manifest = read_manifest(prefix)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(field_name, prefix, f"a prefix with a readable {artifacts.MANIFEST}", str(err)) from err
    if manifest is None:
        raise BadInputError(
            field_name, prefix, f"the output prefix of a finished stage (no {artifacts.MANIFEST} there: incomplete or wrong URI)"
        )
    return {"uri": prefix, "manifest_sha256": digest_json(manifest)}


class UpstreamChanged(RuntimeError):
    """An upstream prefix changed between the manifest check and the read (retriable: the retry sees it whole)."""


def stage_in_upstream(prefix: str, ref: dict[str, str], workdir: Path, name: str) -> Path:
    """Stage an upstream prefix and check every file its manifest lists against that manifest, which must be the
    one this stage recorded as its input (`ref`, from `upstream_ref`): a prefix rewritten while it was read is
    never trained or scored on."""
    manifest = read_manifest(prefix)
    if manifest is None or digest_json(manifest) != ref["manifest_sha256"]:
        raise UpstreamChanged(f"{prefix}: its {artifacts.MANIFEST} changed or went away after this stage started; retry")
    local = storage.stage_in(prefix, workdir, name=name)
    for rel, meta in manifest["outputs"].items():
        path = local / rel
        if not path.is_file() or sha256_file(path) != meta["sha256"]:
            raise UpstreamChanged(f"{prefix}/{rel} does not match its {artifacts.MANIFEST} (rewritten while read?); retry")
    return local


def source_ref(uri: str, local_path: Path | None = None, exclude_suffixes: tuple[str, ...] = ()) -> dict[str, str]:
    """Reference to raw input data (not produced by a stage): a content digest of the file or directory."""
    if local_path is None:
        return {"uri": uri}
    if local_path.is_file():
        return {"uri": uri, "sha256": sha256_file(local_path)}
    listing = {
        str(p.relative_to(local_path)): sha256_file(p) for p in sorted(local_path.rglob("*"))
        if p.is_file() and not p.name.endswith(exclude_suffixes)
    }
    return {"uri": uri, "sha256": digest_json(listing)}


class ConcurrentWriter(RuntimeError):
    """Another writer changed this stage's manifest while it ran; retrying sees (and may skip to) its result."""

    def __init__(self, output: str, err: Exception) -> None:
        super().__init__(f"another writer changed {storage.join(output, artifacts.MANIFEST)} while this stage ran ({err}); "
                         "this run stops without touching it. Two DAG runs with one run_name? The lease prevents that; "
                         "see docs/operations.md")


@dataclass
class StageRun:
    """Bookkeeping for one stage execution: skip check before, manifest after."""

    stage: str
    output: str
    config: dict[str, Any]
    inputs: list[dict[str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    code: dict[str, Any] = field(default_factory=dict)
    generation: int = 0  # of the manifest when this run looked at it (0: none)

    writer: bool = True  # this process publishes (False: another process of a multi-process stage does)
    manifest: dict[str, Any] | None = None  # the existing one, when `start` found the stage already done

    def __post_init__(self) -> None:
        self.code = self.code or code_identity(self.stage)

    def start(self, workdir: Path | None, out: Path | None = None, prepare: Callable[[], bool] | None = None) -> Path | None:
        """The stage's lifecycle before its work: None when a manifest for the same code, config and inputs is there
        (`self.manifest`: return it); else drop the old manifest and return the directory the work writes into,
        which `finish` publishes (`out`, or the output itself when local, or a scratch directory). `prepare` runs
        only when there is work to do and says whether this process is the one that publishes (a multi-process
        stage joins its group there)."""
        from jobs.common.cli import local_output_dir

        if (done := self.already_done()) is not None:
            self.manifest = done
            return None
        self.writer = prepare() if prepare else True
        if self.writer:
            self.invalidate()
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            return out
        return local_output_dir(self.output, workdir) if workdir is not None else None

    def rerun_reasons(self, existing: dict[str, Any] | None) -> list[str]:
        """Why the stage must run although its output prefix may hold a manifest (empty: it may be skipped)."""
        if not existing:
            return ["no manifest yet"]
        reasons = []
        if existing.get("stage") != self.stage:
            reasons.append(f"the prefix holds a {existing.get('stage')!r} manifest")
        if existing.get("code") != self.code:
            reasons.append(f"the code changed ({_short(existing.get('code'))} -> {_short(self.code)})")
        if existing.get("config_sha256") != digest_json(self.config):
            old = existing.get("config") or {}
            new = json.loads(json.dumps(self.config, default=str))  # as the manifest holds it: a tuple is a list there
            changed = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
            reasons.append(f"the config changed ({', '.join(changed) or 'format'})")
        if existing.get("inputs") != self.inputs:
            reasons.append("an input changed")
        return reasons

    def already_done(self) -> dict[str, Any] | None:
        """The existing manifest when it was made by this stage with the same code, config and inputs, else None
        (and the log says why the stage runs)."""
        self.generation = storage.generation(storage.join(self.output, artifacts.MANIFEST))
        try:
            existing = read_manifest(self.output)
        except (json.JSONDecodeError, UnicodeDecodeError):
            existing = {"stage": "(unreadable)"}
        reasons = self.rerun_reasons(existing)
        if reasons:
            log.info("RUNNING %s: %s", self.stage, "; ".join(reasons))
            return None
        log.info("SKIPPED: %s already has a manifest for the same code, config and inputs (%s); nothing to do",
                 self.output, storage.join(self.output, artifacts.MANIFEST))
        return existing

    def invalidate(self) -> None:
        """Drop an old manifest first, so a half-rewritten prefix never looks complete. Both this delete and the
        final write are conditional on the generation seen at the start: if another writer touched the manifest
        meanwhile (two runs on one prefix), this stage stops rather than overwrite or remove its work."""
        try:
            storage.delete(storage.join(self.output, artifacts.MANIFEST), if_generation_match=self.generation or None)
        except storage.Conflict as err:
            raise ConcurrentWriter(self.output, err) from err
        self.generation = 0

    def finish(self, local_dir: Path, metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Publish `local_dir` to the output prefix, then write the manifest last."""
        names = storage.publish_dir(local_dir, self.output, skip=artifacts.BOOKKEEPING)
        files = {name: {"bytes": (local_dir / name).stat().st_size, "sha256": sha256_file(local_dir / name)} for name in names}
        return self.finish_files(files, metrics, extra)

    def finish_files(self, files: dict[str, dict[str, Any]], metrics: dict[str, Any],
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the manifest over files already at the output prefix ({name: {bytes, sha256}}), last."""
        manifest = {
            documents.VERSION_KEY: documents.MANIFEST.version,
            "stage": self.stage,
            "code_version": code_version(),
            "code": self.code,
            "config": self.config,
            "config_sha256": digest_json(self.config),
            "inputs": self.inputs,
            "outputs": files,
            "metrics": {**metrics, **timing.clock().record()},
            "wall_time_s": round(time.time() - self.started, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        faults.point("manifest")
        try:
            storage.write_bytes(storage.join(self.output, artifacts.MANIFEST), json.dumps(manifest, indent=2).encode(),
                                "application/json", if_generation_match=self.generation)
        except storage.Conflict as err:
            raise ConcurrentWriter(self.output, err) from err
        log.info("wrote %s", storage.join(self.output, artifacts.MANIFEST))
        return manifest


def _short(code: Any) -> str:
    if not isinstance(code, dict) or not code:
        return "unrecorded"
    return ", ".join(f"{k} {str(v)[-12:] if k == 'image' else str(v)[:12]}" for k, v in sorted(code.items()))
