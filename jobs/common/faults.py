"""Fault injection for the chaos test (tests/reliability/chaos.py): with GEMMA_PIPELINE_FAULT=POINT:N:MARKER
(several separated by ';') set, the process SIGKILLs itself the N-th time it reaches POINT ("upload": after one file of an output is
published; "manifest": after every file is published, before the manifest is written), once per MARKER file
(created just before the kill), so a retry of the same stage goes through. Unset, as everywhere outside that
test, a point costs one environment lookup."""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "GEMMA_PIPELINE_FAULT"
_hits: dict[str, int] = {}


def point(name: str) -> None:
    specs = os.environ.get(ENV)
    if not specs:
        return
    _hits[name] = _hits.get(name, 0) + 1
    for spec in specs.split(";"):
        where, count, marker = spec.split(":", 2)
        if where != name or _hits[name] != int(count):
            continue
        try:
            Path(marker).open("x").close()  # one kill per marker, whichever process gets here first
        except FileExistsError:
            continue
        os.kill(os.getpid(), signal.SIGKILL)
