"""The Flex Template's metadata (docker/preprocess-beam.metadata.json), derived from the stage's options so the
two never drift: `python -m jobs.preprocessing.beam.template > docker/preprocess-beam.metadata.json`. Dataflow
passes template parameters as `--name=value`; the names use underscores (Dataflow's convention) and the CLI takes
them as the stage's dashed options."""

from __future__ import annotations

import json
from typing import Any

from jobs.contract import spec
from jobs.contract.configs.preprocess import DESCRIPTION, PreprocessConfig

# Beam's own options the DAG sets as template parameters (the rest come from the launch environment).
BEAM_PARAMETERS = {"sdk_location": "where workers get the Beam SDK: 'container' (this image's own)"}


def parameter_name(opt: Any) -> str:
    return opt.flag[2:].replace("-", "_")


def metadata() -> dict[str, Any]:
    parameters = [{"name": parameter_name(opt), "label": opt.name.replace("_", " "),
                   "helpText": opt.help + (f" ({'|'.join(opt.choices)})" if opt.choices else ""),
                   "isOptional": not opt.required} for opt in spec.options(PreprocessConfig)]
    parameters += [{"name": name, "label": name.replace("_", " "), "helpText": text, "isOptional": True}
                   for name, text in BEAM_PARAMETERS.items()]
    return {"name": "gemma-preprocess", "description": DESCRIPTION + " (Apache Beam engine)", "parameters": parameters}


def dashed(argv: list[str]) -> list[str]:
    """`--max_tokens=128` (a template parameter) as `--max-tokens=128`; Beam's own options are left as they are."""
    flags = {opt.flag for opt in spec.options(PreprocessConfig)}
    result = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        candidate = name.replace("_", "-")
        result.append(candidate + eq + value if arg.startswith("--") and candidate in flags else arg)
    return result


if __name__ == "__main__":
    print(json.dumps(metadata(), indent=2))
