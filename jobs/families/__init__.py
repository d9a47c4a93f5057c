"""Model families behind one seam: what differs between Gemma (1 and 2), Gemma 3 and Gemma 4 lives in one module
per family (`gemma.py`, `gemma3.py`, `gemma4.py`), each defining `FAMILY`, an instance of `base.Family`: the
keras-hub classes, how a checkpoint's config names the family, the chat format and its stop token, the backbone's
inputs, how a text-only model loads, the layout map for model parallel, which layers take LoRA, and what the
Hugging Face export needs fixed. Everything else in the stages is family-blind.

Adding a family is one new module here with a `FAMILY` (found by `pkgutil`, no list to edit) plus its tests.
Importing this package imports no keras, jax or torch: the DAG, preprocessing's Beam workers and convert's image
(which has none of them) use it too.
"""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil
from pathlib import Path
from typing import Any

from jobs.contract.demo import DEMO_MODEL_URI
from jobs.contract.errors import BadInputError
from jobs.families.base import ChatFormat, Family

__all__ = ["ChatFormat", "Family", "all_families", "by_name", "end_of_turn_markers", "of_class", "of_config",
           "of_model", "of_source", "supported"]

DEMO_FAMILY = "gemma3"  # demo:gemma3-270m


@functools.cache
def all_families() -> tuple[Family, ...]:
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "FAMILY", None), Family):
            found.append(module.FAMILY)
    if not found:
        raise RuntimeError(f"no model family module under {__path__}")
    return tuple(found)


def supported() -> str:
    """The families, as error messages name them."""
    return ", ".join(f.title for f in all_families())


def by_name(name: str) -> Family:
    for family in all_families():
        if family.name == name:
            return family
    raise BadInputError("model family", name, f"one of {', '.join(f.name for f in all_families())}")


def of_class(class_name: str, field: str = "model class", value: Any = None) -> Family:
    """The family of a keras-hub causal LM, backbone, tokenizer or preprocessor class (by name)."""
    for family in all_families():
        if class_name in family.class_names:
            return family
    raise BadInputError(field, value if value is not None else class_name,
                        f"a text causal LM of a supported family ({supported()})", f"got {class_name}")


def of_model(model: Any) -> Family:
    backbone = getattr(model, "backbone", model)
    return of_class(type(backbone).__name__)


def of_tokenizer(tokenizer: Any) -> Family:
    return of_class(type(tokenizer).__name__, "tokenizer")


def of_config(config: dict[str, Any], where: str = "config.json", field: str = "--base-model") -> Family:
    """The family a checkpoint's config.json names: a keras-hub preset's class, or a Hugging Face `model_type`."""
    registered = str(config.get("registered_name") or config.get("class_name") or "")
    if registered:
        return of_class(registered.rsplit(">", 1)[-1], field, where)
    model_type = config.get("model_type")
    for family in all_families():
        if model_type in family.hf_model_types:
            return family
    raise BadInputError(field, where, f"a checkpoint of a supported family ({supported()})",
                        f"its config.json says model_type {model_type!r}, architectures {config.get('architectures')}")


def of_name(uri: str, field: str = "--base-model") -> Family | None:
    """The family of a model named without reading anything: the demo model or a keras-hub preset name (refused
    when it names no supported family); None for a directory, gs:// or hf:// URI (its config says; the stage reads
    it). What the DAG's `plan` checks before any Job runs."""
    if uri == DEMO_MODEL_URI:
        return by_name(DEMO_FAMILY)
    if "://" in uri and not uri.startswith("kaggle://") or uri.startswith(("/", ".", "~")) or Path(uri).exists():
        return None
    name = uri.rstrip("/").rsplit("/", 2)  # kaggle://keras/gemma4/keras/gemma4_2b/1 names the family too
    for family in all_families():
        if any(part.startswith(family.preset_prefixes) for part in name):
            return family
    raise BadInputError(field, uri, f"a model of a supported family ({supported()}): a preset named "
                        + ", ".join(p + "…" for f in all_families() for p in f.preset_prefixes))


def of_source(uri: str, field: str = "--base-model") -> Family:
    """The family of a model URI the stages accept, read from its config (no weights, no keras): the demo model,
    a keras-hub preset name (by its name), hf://ORG/NAME (its config.json), or a gs:// or local directory."""
    if (named := of_name(uri, field)) is not None:
        return named
    if uri.startswith("hf://"):
        return of_config(_hub_config(uri, field), uri, field)
    if uri.startswith("gs://"):
        from jobs.common import storage

        config = storage.join(uri, "config.json")
        if not storage.exists(config):
            raise BadInputError(field, uri, "a directory holding config.json (a keras-hub preset or HF checkpoint)")
        return of_config(json.loads(storage.read_bytes(config)), uri, field)
    path = Path(uri).expanduser() / "config.json"
    if not path.is_file():
        raise BadInputError(field, uri, "a directory holding config.json (a keras-hub preset or HF checkpoint)")
    return of_config(json.loads(path.read_text()), uri, field)


@functools.cache
def _hub_config(uri: str, field: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(uri.removeprefix("hf://").strip("/"), "config.json")
    except Exception as err:  # the hub's errors have no common base; the message says which
        raise BadInputError(field, uri, "a Hugging Face model with a config.json", str(err)) from err
    return json.loads(Path(path).read_text())


def end_of_turn_markers() -> tuple[str, ...]:
    """Every family's end-of-turn marker, longest first."""
    return tuple(sorted({f.chat.end_of_turn for f in all_families()}, key=len, reverse=True))
