"""`python -m jobs.benchmark --data URI --finetune URI --output URI [options]`"""

from __future__ import annotations

import sys

from jobs.benchmark.config import HELP, BenchmarkConfig
from jobs.benchmark.core import run
from jobs.common.cli import main

if __name__ == "__main__":
    sys.exit(main(BenchmarkConfig, run, "Perplexity of the base and tuned models on the eval split.", HELP))
