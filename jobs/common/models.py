"""Load base models (weights included) from any source `jobs.common.sources` resolves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.common import sources
from jobs.common.errors import BadInputError
from jobs.common.sources import EXPECTED, model_ref
from jobs.demo_model.weights import model_dir

__all__ = ["EXPECTED", "SUPPORTED_CLASSES", "load_causal_lm", "model_ref", "resolve"]

SUPPORTED_CLASSES = ("GemmaCausalLM", "Gemma3CausalLM")


def resolve(uri: str, workdir: Path, field: str = "--base-model") -> str:
    return sources.resolve(uri, workdir, field, demo_dir=model_dir)


def load_causal_lm(uri: str, workdir: Path, field: str = "--base-model", **kwargs: Any):
    import keras_hub

    handle = resolve(uri, workdir, field)
    try:
        model = keras_hub.models.CausalLM.from_preset(handle, **kwargs)
    except (ValueError, FileNotFoundError, OSError, KeyError) as err:
        raise BadInputError(field, uri, EXPECTED, f"loading failed: {err}") from err
    if type(model).__name__ not in SUPPORTED_CLASSES:
        raise BadInputError(field, uri, f"a model of class {' or '.join(SUPPORTED_CLASSES)}", f"got {type(model).__name__}")
    return model


