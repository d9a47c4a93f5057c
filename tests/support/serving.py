"""A champion record with two candidates, the second promoted, as the serving tests (GKE and Vertex) read it."""

from __future__ import annotations

from jobs.contract.layout import RunLayout

RUN = "gs://bkt/runs/r1"
RECORD = {"champion": "lora-rank-8-abc", "candidates": [
    {"key": "default", "champion": False, "prefixes": RunLayout(RUN).stages()},
    {"key": "lora-rank-8-abc", "champion": True, "prefixes": RunLayout(RUN).stages("lora-rank-8-abc")}]}
EXPORT = RunLayout(RUN).stages("lora-rank-8-abc")["convert"]
BOTH = {**RECORD, "converted": ["default", "lora-rank-8-abc"]}  # convert_all: both converted
