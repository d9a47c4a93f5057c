"""What code made a stage's output, for the skip decision: a finished stage reruns when its code changed.

The image digest when the Job pins its image by digest (`GEMMA_PIPELINE_IMAGE=...@sha256:...`, set by the Job
spec), else a digest of the stage's own source files: every project module its entry point reaches, found by
reading the imports (lazy ones inside functions too), so a fix anywhere the stage runs through counts.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
from pathlib import Path
from typing import Any

from jobs.contract import stages
from jobs.contract.env import IMAGE_ENV

_ROOT = Path(__file__).resolve().parent.parent.parent  # the directory holding the `jobs` package


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions (`from pkg import x` also as `pkg.x`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def source_files(entry: str, root: Path | None = None) -> dict[str, Path]:
    """Project source files reachable from module `entry` (its `__main__` included), by relative path."""
    root = root or _ROOT
    found: dict[str, Path] = {}
    pending = [entry, f"{entry}.__main__"]
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        pending += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a/__init__, a/b/__init__
        path = _module_file(module, root)
        if path is not None:
            found[str(path.relative_to(root))] = path
            pending += sorted(n for n in imports_of(path) if n.split(".")[0] == "jobs")
    return found


@functools.cache
def source_digest(entry: str, root: Path | None = None) -> str:
    root = root or _ROOT
    digest = hashlib.sha256()
    for name, path in sorted(source_files(entry, root).items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def code_identity(stage: str) -> dict[str, Any]:
    image = os.environ.get(IMAGE_ENV, "")
    if "@sha256:" in image:
        return {"image": image}
    return {"source_sha256": source_digest(stages.get(stage).module)}
