from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.pipeline import ROWS


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_gemma3) -> Path:
    """A preprocessed split of the tiny pipeline's rows, for the fine-tune tests of a module."""
    from jobs.contract.configs.preprocess import PreprocessConfig
    from jobs.preprocessing.core import run as preprocess

    root = tmp_path_factory.mktemp("ft")
    source = root / "d.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    preprocess(PreprocessConfig(input=str(source), output=str(root / "pre"), base_model=str(tiny_gemma3), eval_fraction=0.2), root / "w")
    return root / "pre"
