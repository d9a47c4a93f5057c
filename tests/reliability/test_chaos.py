"""The chaos run (tests/reliability/chaos.py) as a slow test: SIGKILLs of stage processes from outside and at
uploads and manifest writes, one emulator kill, re-triggers until the DAG finishes; the products must equal an
uninterrupted run's and every manifest must be consistent."""

from __future__ import annotations

import json

import pytest

from tests.reliability import chaos


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1])
def test_the_dag_survives_kills_anywhere_and_ends_where_an_uninterrupted_run_ends(tmp_path, seed):
    assert chaos.main(["--kills", "8", "--seed", str(seed), "--root", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "chaos-result.json").read_text())
    assert len(result["kills"]) >= 6, result  # a kill planned for a stage that already finished cannot land
    assert any(k["kind"] == "emulator" for k in result["kills"])
