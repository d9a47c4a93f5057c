"""Beam's pipeline options from the arguments the stage's own parser left, with unknown ones refused: Beam itself
only logs and drops them, and a mistyped `--temp_locaton` must not run a job with defaults."""

from __future__ import annotations

from typing import Any

from jobs.contract.errors import BadInputError


def pipeline_options(args: list[str]) -> Any:
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(args)
    known = set(options.get_all_options(retain_unknown_options=False))
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - known)
    if unknown:
        raise BadInputError("options", " ".join(args), "options of the stage or of Apache Beam's PipelineOptions",
                            f"unknown: {', '.join('--' + name for name in unknown)}")
    return options
