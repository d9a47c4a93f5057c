"""The stage manifest, `_manifest.json`: written last, so a prefix without one is incomplete.

It records the stage, code version, exact config, inputs (with the digests of their own manifests),
output files with sizes and checksums, metrics, wall time and peak RSS. A rerun whose stage, config and
input digests match an existing manifest is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.common import storage
from jobs.common.errors import BadInputError

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
PROGRESS = "_progress.json"
SCHEMA_VERSION = 1


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
    uri = storage.join(prefix, MANIFEST)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


def upstream_ref(prefix: str, field_name: str) -> dict[str, str]:
    """Reference to another stage's output; exit 2 if its manifest is missing or unreadable."""
    try:
        manifest = read_manifest(prefix)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(field_name, prefix, f"a prefix with a readable {MANIFEST}", str(err)) from err
    if manifest is None:
        raise BadInputError(
            field_name, prefix, f"the output prefix of a finished stage (no {MANIFEST} there: incomplete or wrong URI)"
        )
    return {"uri": prefix, "manifest_sha256": digest_json(manifest)}


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


@dataclass
class StageRun:
    """Bookkeeping for one stage execution: skip check before, manifest after."""

    stage: str
    output: str
    config: dict[str, Any]
    inputs: list[dict[str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def already_done(self) -> dict[str, Any] | None:
        """The existing manifest when it was made by this stage with the same config and inputs, else None."""
        try:
            existing = read_manifest(self.output)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not existing or existing.get("stage") != self.stage or existing.get("config_sha256") != digest_json(self.config) \
                or existing.get("inputs") != self.inputs:
            return None
        log.info("SKIPPED: %s already has a manifest for the same config and inputs (%s); nothing to do",
                 self.output, storage.join(self.output, MANIFEST))
        return existing

    def invalidate(self) -> None:
        """Drop an old manifest first, so a half-rewritten prefix never looks complete."""
        storage.delete(storage.join(self.output, MANIFEST))

    def finish(self, local_dir: Path, metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Publish `local_dir` to the output prefix, then write the manifest last."""
        names = storage.publish_dir(local_dir, self.output, skip=(MANIFEST, PROGRESS))
        files = {name: {"bytes": (local_dir / name).stat().st_size, "sha256": sha256_file(local_dir / name)} for name in names}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "stage": self.stage,
            "code_version": code_version(),
            "config": self.config,
            "config_sha256": digest_json(self.config),
            "inputs": self.inputs,
            "outputs": files,
            "metrics": metrics,
            "wall_time_s": round(time.time() - self.started, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        storage.write_bytes(
            storage.join(self.output, MANIFEST), json.dumps(manifest, indent=2).encode(), "application/json"
        )
        log.info("wrote %s", storage.join(self.output, MANIFEST))
        return manifest
