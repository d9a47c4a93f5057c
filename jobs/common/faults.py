"""Fault injection for the chaos test (tests/reliability/chaos.py): with GEMMA_PIPELINE_FAULT=POINT:N:STAGE:MARKER
(several separated by ';') set, a process of STAGE (the package under `jobs/`, e.g. `finetuning`) SIGKILLs itself
the N-th time it reaches POINT ("upload": after a file or a batch of files of an output is published;
"manifest": after every file is published, before the manifest is written), once per MARKER file (created just
before the kill, holding the stage's name), so a retry of the same stage goes through. Unset, as everywhere outside that
test, a point costs one environment lookup."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ENV = "GEMMA_PIPELINE_FAULT"
_hits: dict[str, int] = {}


def point(name: str) -> None:
    specs = os.environ.get(ENV)
    if not specs:
        return
    _hits[name] = _hits.get(name, 0) + 1
    stage = Path(sys.argv[0]).parent.name  # `python -m jobs.finetuning` runs jobs/finetuning/__main__.py
    for spec in specs.split(";"):
        where, count, target, marker = spec.split(":", 3)
        if where != name or _hits[name] != int(count) or target != stage:
            continue
        try:
            with Path(marker).open("x") as handle:  # one kill per marker
                handle.write(stage)
        except FileExistsError:
            continue
        os.kill(os.getpid(), signal.SIGKILL)
