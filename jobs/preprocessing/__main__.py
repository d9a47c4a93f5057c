"""`python -m jobs.preprocessing --output URI [options]`"""

from __future__ import annotations

import sys

from jobs.common.cli import main
from jobs.preprocessing.config import HELP, PreprocessConfig
from jobs.preprocessing.core import run

if __name__ == "__main__":
    sys.exit(main(PreprocessConfig, run, "Clean, template and split an instruction dataset.", HELP))
