"""The one Cloud Storage layout of a run:

    gs://BUCKET/runs/RUN/preprocess/                    shared by every candidate
    gs://BUCKET/runs/RUN/candidates/<key>/<stage>/      finetune, benchmark, convert of one candidate
    gs://BUCKET/runs/RUN/shared/<stage>/                what one stage shares across candidates (the base's evaluation)
    gs://BUCKET/runs/RUN/{champion.json, report.*, _lease.json}

RUN is the `run_name` param, or the Airflow run id made safe for object names and labels."""

from __future__ import annotations

import re
from dataclasses import dataclass

from jobs.contract import artifacts, stages
from jobs.contract.spec import SHARED

__all__ = ["CANDIDATES", "DEFAULT_CANDIDATE", "RUNS", "SHARED", "RunLayout", "join", "run_key", "safe_run_id"]

RUNS = "runs"
CANDIDATES = "candidates"
DEFAULT_CANDIDATE = "default"  # the key of a candidate with no overrides


def safe_run_id(run_id: str) -> str:
    """A run id usable in object names and Kubernetes labels: [a-z0-9-], at most 63 characters."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")
    return cleaned[:63].rstrip("-") or "run"


def run_key(run_name: str | None, run_id: str) -> str:
    """The run's folder: the `run_name` param when given (a new DAG run with the same name resumes that run,
    skipping finished stages), else the Airflow run id."""
    return safe_run_id(run_name or run_id)


@dataclass(frozen=True)
class RunLayout:
    prefix: str  # gs://BUCKET/runs/RUN (no trailing slash)

    @classmethod
    def of(cls, bucket: str, key: str) -> RunLayout:
        return cls(f"gs://{bucket}/{RUNS}/{key}")

    def stage(self, stage: str, candidate: str = DEFAULT_CANDIDATE) -> str:
        if not stages.get(stage).per_candidate:
            return f"{self.prefix}/{stage}"
        return f"{self.prefix}/{CANDIDATES}/{candidate}/{stage}"

    def shared(self, stage: str) -> str:
        """What one stage computes once per run for every candidate (the benchmark's base-model evaluation)."""
        return f"{self.prefix}/{SHARED}/{stages.get(stage).name}"

    def stages(self, candidate: str = DEFAULT_CANDIDATE) -> dict[str, str]:
        """Every stage's prefix for one candidate (the shared ones included), and under SHARED the run's shared
        folder (each stage's own is `shared(stage)`)."""
        return {**{name: self.stage(name, candidate) for name in stages.NAMES}, SHARED: f"{self.prefix}/{SHARED}"}

    @classmethod
    def containing(cls, stage_prefix: str) -> RunLayout | None:
        """The run a candidate stage's prefix belongs to (`.../runs/RUN/candidates/KEY/STAGE`), or None for a
        prefix laid out otherwise (a stage run by hand)."""
        parts = stage_prefix.rstrip("/").split("/")
        if len(parts) >= 5 and parts[-3] == CANDIDATES and parts[-5] == RUNS:
            return cls("/".join(parts[:-3]))
        return None

    def file(self, name: str) -> str:
        """One of the run's own files (`artifacts.CHAMPION`, the report, the lease)."""
        return f"{self.prefix}/{name}"

    @property
    def champion(self) -> str:
        return self.file(artifacts.CHAMPION)

    @property
    def lease(self) -> str:
        return self.file(artifacts.LEASE)


def join(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if name else prefix.rstrip("/")
