"""The contract is defined once: no artifact name, exit code, prefix layout or default profile is spelled outside
`jobs/contract/` (and generated or documentation files). A restated one fails here, naming the file and line."""

from __future__ import annotations

import re

import pytest

from jobs.contract import artifacts, documents, stages
from jobs.contract.errors import NON_RETRIABLE_EXIT_CODES
from jobs.contract.layout import SHARED
from tests.conftest import ROOT
from tests.support import nonempty

CODE = ("dags", "jobs", "bench")
NAMES = nonempty(sorted({v for k, v in vars(artifacts).items() if k.isupper() and isinstance(v, str) and "." in v}),
                 "artifact file names")


def _sources() -> list:
    return nonempty([p for d in CODE for p in (ROOT / d).rglob("*.py")
                     if "contract" not in p.relative_to(ROOT).parts], "source files")


def _literals(pattern: str) -> list[str]:
    found = []
    for path in _sources():
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if re.search(pattern, code):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return found


@pytest.mark.parametrize("name", NAMES)
def test_artifact_names_are_spelled_only_in_the_contract(name):
    assert _literals(r"[\"']" + re.escape(name) + r"[\"'/]") == []


def test_exit_codes_and_the_layout_are_spelled_only_in_the_contract():
    codes = r",\s*".join(map(str, NON_RETRIABLE_EXIT_CODES))
    assert _literals(r"\(\s*" + codes + r"\s*\)|EXIT_\w+\s*=\s*\d") == []
    assert _literals(r"/runs/\{|/candidates/\{|[\"']candidates/") == []  # a prefix built outside RunLayout


def test_default_profiles_and_stage_modules_are_declared_once():
    for stage in stages.REGISTRY.values():
        assert _literals(rf"[\"']{re.escape(stage.module)}[\"']") == [], stage.module
    assert _literals(r"DEFAULT_PROFILES\s*=|BASE_PROFILES\s*=") == []


def test_each_stage_reads_from_the_upstream_stages_its_config_points_at():
    from jobs.contract import spec

    for stage in stages.REGISTRY.values():
        upstream = {opt.upstream for opt in spec.options(stage.config) if opt.upstream not in (None, "self", SHARED)}
        assert upstream == set(stage.reads), stage.name


def test_every_document_has_a_schema_version():
    docs = nonempty([d for d in vars(documents).values() if isinstance(d, documents.Document)], "documents")
    for doc in docs:
        assert doc.version >= 1 and doc.name in vars(artifacts).values()
        assert doc.load(doc.dump({k: 0 for k in doc.required}))[documents.VERSION_KEY] == doc.version
        with pytest.raises(documents.DocumentError, match="schema_version"):
            doc.load({k: 0 for k in doc.required})


def test_the_contract_is_standard_library_only():
    import ast
    import sys

    files = nonempty(sorted((ROOT / "jobs" / "contract").rglob("*.py")), "contract modules")
    outside = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            outside += [f"{path.relative_to(ROOT)}: {n}" for n in names
                        if n.split(".")[0] not in sys.stdlib_module_names and not n.startswith("jobs.contract")]
    assert outside == []


def test_the_model_families_import_the_standard_library_only():
    """Composer gets `jobs/families/` too (the plan checks a base model's family): importing it needs nothing
    else; what loads or exports a model imports keras-hub or transformers inside the method that does."""
    import ast
    import sys

    files = nonempty(sorted((ROOT / "jobs" / "families").glob("*.py")), "family modules")
    outside = []
    for path in files:
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            outside += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] not in sys.stdlib_module_names
                        and not n.startswith(("jobs.contract", "jobs.families")) and n != "jobs"]
    assert outside == []


def test_the_dag_needs_only_the_contract_of_the_stages():
    """What Composer gets of `jobs/` is `jobs/contract/` and `jobs/families/`: parsing the DAG imports nothing else
    of it."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, 'dags'); import gemma_lora_finetune; "
            "print(sorted(m for m in sys.modules if m.startswith('jobs.') and not m.startswith(('jobs.contract', 'jobs.families'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
