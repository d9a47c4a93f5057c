"""The demo model's tokenizer alone, from the GGUF file's metadata: transformers reads the vocabulary with the
`gguf` package (numpy, no torch), keras-hub turns it into the SentencePiece model. What preprocessing needs."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from jobs.demo_model import COMPLETE, assemble_gguf, publish

log = logging.getLogger(__name__)


def build_tokenizer_dir(target: Path) -> Path:
    if (target / COMPLETE).exists():
        return target
    from transformers import AutoConfig, AutoTokenizer

    gguf_path = assemble_gguf()
    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).to_dict()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    staging = target.with_name(f"{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    publish(staging, target, config, tokenizer)
    gguf_path.unlink(missing_ok=True)
    log.info("built the demo tokenizer at %s", target)
    return target
