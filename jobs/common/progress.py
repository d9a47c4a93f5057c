"""Progress reporting: readable log lines, plus a small `_progress.json` under the output prefix that the
DAG polls so a running task shows step, loss, tokens/s and ETA before the Job finishes."""

from __future__ import annotations

import logging
import time
from typing import Any

from jobs.common import storage
from jobs.contract import artifacts, documents

log = logging.getLogger("progress")


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, output: str, stage: str, total_steps: int, publish_every_s: float = 30.0, publish: bool = True) -> None:
        self.uri = storage.join(output, artifacts.PROGRESS)
        self.publish = publish  # False on all but one of several processes: they log, one writes
        self.stage, self.total = stage, total_steps
        self.publish_every_s = publish_every_s
        self._last_publish = 0.0
        self._start = time.time()

    def update(self, step: int, steps_this_run: int, force: bool = False, **metrics: Any) -> str:
        elapsed = time.time() - self._start
        rate = steps_this_run / elapsed if elapsed > 0 and steps_this_run else 0.0
        eta = (self.total - step) / rate if rate else float("nan")
        parts = [f"step {step}/{self.total}"]
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
        parts.append(f"eta={format_eta(eta) if rate else '?'}")
        line = " ".join(parts)
        log.info(line)
        now = time.time()
        if self.publish and (force or now - self._last_publish >= self.publish_every_s):
            self._last_publish = now
            record = {"stage": self.stage, "step": step, "total_steps": self.total, "eta_s": eta if rate else None,
                      "updated_at": now, "line": line, **metrics}
            try:
                storage.write_bytes(self.uri, documents.PROGRESS.dump(record), "application/json")
            except Exception as err:  # progress is best effort; never fail training over it
                log.warning("could not publish progress to %s: %s", self.uri, err)
        return line
