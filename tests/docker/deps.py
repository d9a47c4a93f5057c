"""Does a stage's extra provide everything the stage imports? Checked without building an image: collect the
imports of every module the stage's entrypoint reaches inside the project (lazy imports in functions too), map
each third-party import to the distribution that installs it, and require that distribution in the dependency
closure of the extra (from the installed packages' metadata, markers evaluated)."""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from jobs.common.code_identity import imports_of

PROJECT_PACKAGES = ("jobs", "gemma_pipeline")


def _module_file(root: Path, module: str) -> Path | None:
    parts = module.split(".")
    base = root / "dags" if parts[0] == "gemma_pipeline" else root
    for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
        if candidate.exists():
            return candidate
    return None


def stage_imports(root: Path, entry_module: str) -> tuple[set[str], set[str]]:
    """(project modules reached from `entry_module`, top-level third-party imports among them)."""
    seen: set[str] = set()
    third_party: set[str] = set()
    pending = [entry_module]
    while pending:
        module = pending.pop()
        path = _module_file(root, module)
        if path is None or module in seen:
            continue
        seen.add(module)
        parents = module.split(".")
        for i in range(1, len(parents)):  # importing a.b.c runs a/__init__ and a/b/__init__
            pending.append(".".join(parents[:i]))
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in PROJECT_PACKAGES:
                pending.append(name)
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    return seen, third_party


def extra_requirements(root: Path, extra: str) -> list[Requirement]:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project.get("dependencies", []), *project["optional-dependencies"][extra]]]


def closure(requirements: list[Requirement]) -> set[str]:
    """Canonical names of the distributions these requirements install, transitively."""
    found: set[str] = set()
    pending = [(r, "") for r in requirements]
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        key = f"{name}[{','.join(sorted(requirement.extras))}]"
        if key in found:
            continue
        found.add(key)
        found.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for child in map(Requirement, requires):
            for wanted in ("", *requirement.extras):
                if not child.marker or child.marker.evaluate({"extra": wanted}):
                    pending.append((child, wanted))
                    break
    return {n for n in found if "[" not in n}


def missing_for_stage(root: Path, extra: str, entry_module: str) -> dict[str, list[str]]:
    """Third-party imports of the stage that no distribution in the extra's closure provides."""
    _, third_party = stage_imports(root, entry_module)
    providers = metadata.packages_distributions()
    available = closure(extra_requirements(root, extra))
    missing = {}
    for top in sorted(third_party):
        dists = [canonicalize_name(d) for d in providers.get(top, [])]
        if not any(d in available for d in dists):
            missing[top] = dists or ["(not installed here)"]
    return missing
