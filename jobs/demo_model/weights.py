"""The demo model's weights: transformers dequantizes the Q4_K_M tensors of the GGUF file into a checkpoint
directory (safetensors + config.json + tokenizer) that keras-hub's `from_preset` loads offline. Needs torch."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from jobs.demo_model import COMPLETE, assemble_gguf, cache_key, cache_root, publish
from jobs.demo_model.tokenizer import sentencepiece_from_gguf

log = logging.getLogger(__name__)


def model_dir() -> Path:
    """The demo checkpoint directory with weights, built on first use (about a minute on 2 cores)."""
    return build_model_dir(cache_root() / cache_key())


def build_model_dir(target: Path) -> Path:
    if (target / COMPLETE).exists():
        return target
    gguf_path = assemble_gguf()
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
    publish(staging, target, model.config.to_dict(), sentencepiece_from_gguf(gguf_path), tokenizer)
    log.info("imported demo model to %s in %.0f s", target, time.time() - started)
    return target
