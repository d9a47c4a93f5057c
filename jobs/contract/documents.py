"""The JSON documents stages and the DAG write for each other, each with a schema version: the manifest, live
progress, the error document, the benchmark report, the export's parity and the run's champion record.

`Document.dump` stamps the version; `Document.load` refuses a document of an unknown version or one missing a
field its readers need, naming the file, so a reader never fails later on a missing key. The accessors below
are how the DAG side reads fields that are nested (no string paths into another stage's document elsewhere).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jobs.contract import artifacts

VERSION_KEY = "schema_version"
# A manifest's metrics say where the stage's wall time went: seconds per phase (summing to the process's wall
# time), and the persistent XLA compilation cache's {"hits", "misses"} where JAX ran.
TIME_SPLIT = "time_split"
COMPILE_CACHE = "compile_cache"
PHASES = ("imports", "model_load", "compilation", "compute", "staging", "publish", "other")


class DocumentError(ValueError):
    pass


@dataclass(frozen=True)
class Document:
    name: str  # the file name (jobs.contract.artifacts)
    version: int
    required: tuple[str, ...]
    accepts: tuple[int, ...] = ()  # older versions readers still understand

    def dump(self, body: dict[str, Any]) -> bytes:
        return json.dumps({VERSION_KEY: self.version, **body}, indent=2, default=str).encode()

    def load(self, data: bytes | str | dict[str, Any], where: str = "") -> dict[str, Any]:
        where = where or self.name
        try:
            doc = data if isinstance(data, dict) else json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DocumentError(f"{where}: not JSON ({err})") from err
        if not isinstance(doc, dict):
            raise DocumentError(f"{where}: got {type(doc).__name__}; expected a JSON object")
        version = doc.get(VERSION_KEY)
        if version not in (self.version, *self.accepts):
            raise DocumentError(f"{where}: {VERSION_KEY} {version!r}; this code reads version "
                                f"{', '.join(map(str, (self.version, *self.accepts)))} of {self.name}")
        missing = [k for k in self.required if k not in doc]
        if missing:
            raise DocumentError(f"{where}: missing {', '.join(missing)}; expected a complete {self.name}")
        return doc


MANIFEST = Document(artifacts.MANIFEST, 2, ("stage", "code", "config", "config_sha256", "inputs", "outputs", "metrics",
                                            "wall_time_s", "peak_rss_bytes", "finished_at"))
PROGRESS = Document(artifacts.PROGRESS, 1, ("stage", "step", "total_steps", "updated_at", "line"))
ERROR = Document(artifacts.ERROR, 1, ("error", "exit_code"))
# v2 adds generation metrics, lm-eval tasks and the champion metric; v1 reports (perplexity only) still read.
BENCHMARK = Document(artifacts.BENCHMARK_REPORT, 2, ("models", "relative_improvement"), accepts=(1,))
BASE_EVALUATION = Document(artifacts.BASE_EVALUATION, 1, ("key", "result"))
PARITY = Document(artifacts.PARITY, 1, ("passed", "tolerance"))
CHAMPION = Document(artifacts.CHAMPION, 1, ("champion", "index", "why", "candidates", "quality_gate", "run_prefix"))


# A promotion's decision, in champion.json's `approval` and in convert's `--approval` (the model card's record).
APPROVED, OVERRIDDEN, REJECTED, AUTOMATIC = "approved", "overridden", "rejected", "automatic"
NOT_APPROVED = "not approved"  # the card of a candidate converted beside the promoted one (convert_all)


def eval_split(report: dict[str, Any], model: str) -> dict[str, Any]:
    """A benchmark report's eval-split figures of one model ("base" or "tuned"): perplexity, ci95_low/high,
    tokens, tokens_sha256; {} when absent."""
    return (report.get("models") or {}).get(model, {}).get("splits", {}).get("eval", {})


def metric(report: dict[str, Any], model: str, name: str) -> dict[str, Any]:
    """One model's figure for a metric in a benchmark report: {"value", "ci95_low", "ci95_high"} ({} when absent).
    `name` is perplexity, a generation metric (exact_match, rouge_l, chrf, stop_rate, answer_tokens) or
    `task:metric` from lm-evaluation-harness."""
    result = (report.get("models") or {}).get(model, {})
    if name == "perplexity":
        split = eval_split(report, model)
        return {"value": split["perplexity"], "ci95_low": split.get("ci95_low"), "ci95_high": split.get("ci95_high")} if split else {}
    if ":" in name:
        task, _, key = name.partition(":")
        return ((result.get("tasks") or {}).get(task) or {}).get(key, {})
    return ((result.get("generation") or {}).get("metrics") or {}).get(name, {})


def metric_names(report: dict[str, Any], model: str) -> list[str]:
    """Every metric a benchmark report has for one model: perplexity, its generation metrics, its lm-eval
    `task:metric`s (each readable with `metric`)."""
    result = (report.get("models") or {}).get(model, {})
    names = ["perplexity", *((result.get("generation") or {}).get("metrics") or {})]
    return names + [f"{task}:{m}" for task, figures in (result.get("tasks") or {}).items() for m in figures]


def time_split(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """A stage manifest's wall-time split with its compilation cache counts: {"seconds": {phase: s}, "cache":
    {"hits", "misses"} or None}; {} for a manifest made before stages recorded it."""
    metrics = (manifest or {}).get("metrics") or {}
    split = metrics.get(TIME_SPLIT)
    return {"seconds": split, "cache": metrics.get(COMPILE_CACHE)} if split else {}


def champion_row(champion: dict[str, Any] | None) -> dict[str, Any] | None:
    return next((r for r in (champion or {}).get("candidates", []) if r.get("champion")), None)
