"""Applies approval timeouts while `airflow dags test` runs a DAG: its loop resumes a task parked in
`awaiting_input` only when an answer arrives, and the sweep that applies a request's default on timeout is the
scheduler's (`SchedulerJobRunner.check_awaiting_input_timeouts`), which does not run there. `local_run` starts
this beside `dags test` when approval is required; it calls that same sweep over the run's metadata database.

    python -m gemma_pipeline.tools.approval_timeouts [--every SECONDS]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from gemma_pipeline import local


def sweep_forever(every_s: float) -> None:
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    runner = SchedulerJobRunner(job=Job())  # not started: only its sweep is used, on its own session
    parent = os.getppid()
    while os.getppid() == parent:  # a local_run killed outright leaves no sweep behind
        try:
            runner.check_awaiting_input_timeouts()
        except Exception:  # e.g. SQLite busy under three processes: the next sweep tries again
            traceback.print_exc()
        time.sleep(every_s)


@contextlib.contextmanager
def sweeping(env: dict[str, str], log_path: Path, every_s: float = 5.0) -> Iterator[subprocess.Popen]:
    """The sweep in a process of its own over `env`'s Airflow home, for the time of the block."""
    with open(log_path, "a") as log:
        process = subprocess.Popen([sys.executable, "-m", __name__, "--every", str(every_s)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)  # in the caller's process group
    try:
        yield process
    finally:
        local.stop(process, 30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=float, default=5.0, help="seconds between sweeps (default 5)")
    args = parser.parse_args(argv)
    if not args.every > 0:
        parser.error(f"--every: got {args.every}; expected a number of seconds above 0")
    sweep_forever(args.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
