"""`python -m jobs.convert --finetune URI --output URI [options]`"""

from __future__ import annotations

import os
import sys

# The entry point picks the Keras backend (library modules never do). torch, not JAX: keras-hub's exporter
# writes safetensors one tensor at a time on torch but serializes the whole state dict in memory on JAX, and
# the parity check runs transformers on torch anyway.
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF only tokenizes: no cuInit error on CPU (docs/operations.md)

from jobs.common.cli import main  # noqa: E402
from jobs.contract.configs.convert import DESCRIPTION, ConvertConfig  # noqa: E402
from jobs.convert.core import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(ConvertConfig, run, DESCRIPTION))
