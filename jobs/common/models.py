"""Load base models (weights included) from any source `jobs.common.sources` resolves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jobs import families
from jobs.common import sources, timing
from jobs.common.sources import EXPECTED, model_ref
from jobs.contract.errors import BadInputError
from jobs.demo_model.weights import model_dir

__all__ = ["EXPECTED", "end_of_turn_id", "load_causal_lm", "load_with_adapter", "model_ref", "resolve"]


def resolve(uri: str, workdir: Path, field: str = "--base-model") -> str:
    return sources.resolve(uri, workdir, field, demo_dir=model_dir)


def load_causal_lm(uri: str, workdir: Path, field: str = "--base-model", **kwargs: Any):
    """The text causal LM of a supported family (`jobs.families`), loaded as its family loads it."""
    with timing.phase("imports"):
        import keras_hub  # noqa: F401 (its import is the time charged here)

    handle = resolve(uri, workdir, field)
    family = families.of_source(handle, field)
    try:
        with timing.phase("model_load"), _untracked_vocabulary(), _placeholder_initialization():
            model = family.load(handle, **kwargs)
    except (ValueError, FileNotFoundError, OSError, KeyError) as err:
        raise BadInputError(field, uri, EXPECTED, f"loading failed: {err}") from err
    if type(model).__name__ != family.causal_lm:
        raise BadInputError(field, uri, f"a {family.title} text causal LM ({family.causal_lm})", f"got {type(model).__name__}")
    return model




@contextlib.contextmanager
def _placeholder_initialization() -> Iterator[None]:
    """While a model loads, its variables start as zeros made on the host instead of being drawn by their
    initializers: keras builds every layer with its initializer and the checkpoint then overwrites every value, and
    on a CPU the initializers, run op by op, were half of a load (cProfile of the demo model's `from_preset`). A
    variable the load did not assign (an RNG state, say) gets its real initializer afterwards, so the model is the
    same, value for value (tests/jobs/common/test_models.py); only the time changes. Private API, so optional."""
    try:
        from keras.src.backend.common.variables import Variable as KerasVariable
    except ImportError:
        yield
        return
    initialize, assign = KerasVariable._initialize_with_initializer, KerasVariable.assign
    pending: dict[int, tuple[Any, Any]] = {}

    def placeholder(self: Any, initializer: Any) -> None:
        try:
            zeros = np.zeros(self._shape, dtype=np.dtype(self._dtype))
        except TypeError:  # a dtype numpy lacks (bfloat16): keras' own initializer, the slow way
            return initialize(self, initializer)
        pending[id(self)] = (self, initializer)
        self._initialize(self._convert_to_tensor(zeros))

    def assigned(self: Any, value: Any) -> Any:
        pending.pop(id(self), None)
        return assign(self, value)

    KerasVariable._initialize_with_initializer, KerasVariable.assign = placeholder, assigned
    try:
        yield
    finally:
        KerasVariable._initialize_with_initializer, KerasVariable.assign = initialize, assign
    for variable, initializer in pending.values():  # not in the checkpoint: its own initializer, as keras would
        initialize(variable, initializer)


@contextlib.contextmanager
def _untracked_vocabulary() -> Iterator[None]:
    """While a model loads, its SentencePiece vocabulary is set without keras' list tracking, as `load_tokenizer` does
    for the tokenizer alone (`sources._untracked`: tracking Gemma 3's 262k pieces is seconds per load, and they hold
    no variables). Private API, so optional."""
    try:
        from keras_hub.src.tokenizers.sentence_piece_tokenizer import SentencePieceTokenizer
    except ImportError:
        yield
        return
    original = SentencePieceTokenizer.set_proto

    def set_proto(self: Any, proto: Any) -> Any:
        with sources._untracked():
            return original(self, proto)

    SentencePieceTokenizer.set_proto = set_proto
    try:
        yield
    finally:
        SentencePieceTokenizer.set_proto = original


def load_with_adapter(base_uri: str, adapter_uri: str, rank: int, targets: list[str], workdir: Path,
                      field: str = "--adapter"):
    """The full-precision base with a keras-hub LoRA adapter enabled and loaded (the delta not merged): how a
    fine-tune on a quantized base is scored and exported."""
    from jobs.common import storage

    model = load_causal_lm(base_uri, workdir)
    model.backbone.enable_lora(rank, target_layer_names=targets)
    adapter = storage.stage_in(adapter_uri, workdir / "adapter")
    try:
        with timing.phase("model_load"):
            model.backbone.load_lora_weights(str(adapter))
    except (ValueError, OSError, KeyError) as err:
        raise BadInputError(field, adapter_uri, f"a LoRA adapter of rank {rank} on {targets} for {base_uri}", str(err)) from err
    return model


def merge_adapter(model, adapter_file: Path, field: str = "--finetune", uri: str = "") -> int:
    """Fold a keras-hub LoRA file into an already-loaded model's kernels, in place: `kernel += A @ B` per layer
    (keras' LoRA with its default alpha = rank, as the fine-tune trains it). The same sum `save_to_preset` stores
    for a LoRA-enabled model, without loading a second model: the variables keep their structure, so functions
    already compiled for the base (scoring, keras-hub's generate) run the tuned model as they are. Returns how
    many kernels changed. Read with h5py (keras-hub's `save_lora_weights` layout: `lora/<index>/vars/…`, the index
    into the backbone's layers that have weights, in keras' flattening order)."""
    import h5py

    layers = [layer for layer in model.backbone._flatten_layers(include_self=False) if layer.weights]
    expected = f"a keras-hub LoRA file (.lora.h5) saved from a {type(model.backbone).__name__} like {uri or 'this base'}"
    try:
        with h5py.File(adapter_file, "r") as handle, timing.phase("model_load"):
            factors = {int(k): (handle[f"lora/{k}/vars/lora_kernel_a"][()], handle[f"lora/{k}/vars/lora_kernel_b"][()])
                       for k in handle["lora"] if k != "vars"}
            for index, (a, b) in factors.items():
                kernel = layers[index]._kernel
                delta = np.matmul(a.astype(np.float32), b.astype(np.float32))
                if delta.shape != tuple(kernel.shape):
                    raise ValueError(f"layer {index} ({layers[index].path}): A @ B is {delta.shape}, its kernel {tuple(kernel.shape)}")
                kernel.assign((np.asarray(kernel.value, np.float32) + delta).astype(kernel.dtype))
    except (OSError, KeyError, IndexError, AttributeError, ValueError) as err:
        raise BadInputError(field, uri or str(adapter_file), expected, str(err)) from err
    if not factors:
        raise BadInputError(field, uri or str(adapter_file), expected, "it holds no LoRA factors")
    return len(factors)


def adapter_only(finetune_settings: dict[str, Any]) -> bool:
    """True when a fine-tune's product is its adapter alone (it trained on a quantized base)."""
    return finetune_settings.get("base_quantization", "none") != "none"


def end_of_turn_id(tokenizer) -> int:
    """The id of the one token every loss segment ends with: its family's end-of-turn marker."""
    marker = families.of_tokenizer(tokenizer).chat.end_of_turn
    try:
        return int(tokenizer.token_to_id(marker))
    except (KeyError, ValueError, TypeError, AttributeError):
        raise BadInputError("tokenizer", type(tokenizer).__name__, f"a tokenizer with {marker} as one token (every "
                            "model of its family has it: the model is trained to stop on it)") from None
