"""Runs preprocessing cases on the Beam engine, in the Beam environment (`.venv-beam`), for test_beam_parity:
`python -m tests.jobs.preprocessing.beam_cases CASES.json RESULTS.json`; each case is {id, args}, each result
{id, code, error} where error is the stage's final error line (empty on success)."""

from __future__ import annotations

import contextlib
import io
import json
import sys


def error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if " ERROR " in line]
    return lines[-1].split(": ", 1)[1] if lines else ""


def main(cases_path: str, results_path: str) -> None:
    from jobs.common.cli import main as stage_main
    from jobs.contract.configs.preprocess import DESCRIPTION, PreprocessConfig
    from jobs.preprocessing.beam import run
    from jobs.preprocessing.beam.options import pipeline_options

    results = []
    for case in json.loads(open(cases_path).read()):
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            try:
                code = stage_main(PreprocessConfig, run, DESCRIPTION, case["args"], passthrough=pipeline_options)
            except SystemExit as exit_:  # argparse's own refusals
                code = exit_.code
        results.append({"id": case["id"], "code": code, "error": error_line(captured.getvalue()), "log": captured.getvalue()[-4000:]})
    with open(results_path, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
