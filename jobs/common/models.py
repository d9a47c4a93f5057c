"""Load base models (weights included) from any source `jobs.common.sources` resolves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.common import sources
from jobs.common.sources import EXPECTED, model_ref
from jobs.contract import rows as rows_lib
from jobs.contract.errors import BadInputError
from jobs.demo_model.weights import model_dir

__all__ = ["EXPECTED", "SUPPORTED_CLASSES", "end_of_turn_id", "load_causal_lm", "load_with_adapter", "model_ref", "resolve"]

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




def load_with_adapter(base_uri: str, adapter_uri: str, rank: int, targets: list[str], workdir: Path,
                      field: str = "--adapter"):
    """The full-precision base with a keras-hub LoRA adapter enabled and loaded (the delta not merged): how a
    fine-tune on a quantized base is scored and exported."""
    from jobs.common import storage

    model = load_causal_lm(base_uri, workdir)
    model.backbone.enable_lora(rank, target_layer_names=targets)
    adapter = storage.stage_in(adapter_uri, workdir / "adapter")
    try:
        model.backbone.load_lora_weights(str(adapter))
    except (ValueError, OSError, KeyError) as err:
        raise BadInputError(field, adapter_uri, f"a LoRA adapter of rank {rank} on {targets} for {base_uri}", str(err)) from err
    return model


def adapter_only(finetune_settings: dict[str, Any]) -> bool:
    """True when a fine-tune's product is its adapter alone (it trained on a quantized base)."""
    return finetune_settings.get("base_quantization", "none") != "none"


def end_of_turn_id(tokenizer) -> int:
    """The id of the one token every loss segment ends with (`rows.END_OF_TURN`)."""
    try:
        return int(tokenizer.token_to_id(rows_lib.END_OF_TURN))
    except (KeyError, ValueError, TypeError, AttributeError):
        raise BadInputError("tokenizer", type(tokenizer).__name__, f"a tokenizer with {rows_lib.END_OF_TURN} as one "
                            "token (every Gemma has it: the model is trained to stop on it)") from None
