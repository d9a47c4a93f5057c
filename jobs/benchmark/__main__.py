"""`python -m jobs.benchmark --data URI --finetune URI --output URI [options]`"""

from __future__ import annotations

import os
import sys

# The entry point picks the Keras backend (library modules never do): JAX, as in the stage's image.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF only tokenizes: no cuInit error on CPU (docs/operations.md)

from jobs.common import quiet  # noqa: E402

quiet.import_tensorflow()  # before keras-hub imports it: no CUDA-driver notices on a CPU node

from jobs.benchmark.core import run  # noqa: E402
from jobs.common.cli import main  # noqa: E402
from jobs.contract.configs.benchmark import DESCRIPTION, BenchmarkConfig  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(BenchmarkConfig, run, DESCRIPTION))
