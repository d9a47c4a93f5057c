"""The export stops where the model was trained to: generation_config.json's eos_token_id, read back as
transformers reads it, holds both EOS and end of turn, or the export fails (exit 4)."""

from __future__ import annotations

import json

import pytest

from jobs.contract.errors import ExportMismatchError
from jobs.convert.core import check_stops


def test_the_generation_config_must_stop_on_eos_and_end_of_turn(tmp_path):
    config = tmp_path / "generation_config.json"
    config.write_text(json.dumps({"eos_token_id": [1, 106]}))
    check_stops(tmp_path, [1, 106])
    config.write_text(json.dumps({"eos_token_id": 1}))
    with pytest.raises(ExportMismatchError, match=r"eos_token_id \[1\]; expected \[1, 106\] \(EOS and end of turn"):
        check_stops(tmp_path, [1, 106])
