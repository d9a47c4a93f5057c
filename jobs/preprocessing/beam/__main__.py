"""CLI: the preprocessing stage's options, then Apache Beam's pipeline options (see jobs.preprocessing.beam)."""

from __future__ import annotations

import sys

from jobs.common.cli import main
from jobs.contract.configs.preprocess import DESCRIPTION, PreprocessConfig
from jobs.preprocessing.beam.options import pipeline_options
from jobs.preprocessing.beam.template import dashed

if __name__ == "__main__":
    import logging

    from jobs.preprocessing.beam import run

    for chatty in ("apache_beam.typehints", "apache_beam.runners.worker", "apache_beam.transforms.util",
                   "apache_beam.runners.portability"):
        logging.getLogger(chatty).setLevel(logging.WARNING)

    sys.exit(main(PreprocessConfig, run, DESCRIPTION + " Apache Beam engine: Beam's pipeline options (--runner, "
                  "--project, --region, --temp_location, ...) are accepted too; without --runner it runs in process.",
                  argv=dashed(sys.argv[1:]), passthrough=pipeline_options))
