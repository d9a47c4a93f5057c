"""`python -m jobs.finetuning --data URI --output URI [options]`"""

from __future__ import annotations

import sys

from jobs.common.cli import main
from jobs.finetuning.config import HELP, FinetuneConfig
from jobs.finetuning.core import run

if __name__ == "__main__":
    sys.exit(main(FinetuneConfig, run, "LoRA fine-tuning of a Gemma / Gemma 3 causal LM with keras-hub on JAX.", HELP))
