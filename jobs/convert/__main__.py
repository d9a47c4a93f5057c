"""`python -m jobs.convert --finetune URI --output URI [options]`"""

from __future__ import annotations

import sys

from jobs.common.cli import main
from jobs.convert.config import HELP, ConvertConfig
from jobs.convert.core import run

if __name__ == "__main__":
    sys.exit(main(ConvertConfig, run, "Merge LoRA, export to Hugging Face transformers format, and verify it.", HELP))
