"""The thin CLI shared by every stage: parse, validate, run, and turn exceptions into exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from jobs.common import storage
from jobs.common.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    BadInputError,
    ExportMismatchError,
    PreemptedError,
    QualityGateError,
)

C = TypeVar("C")


def configure_logging() -> None:
    # Plain timestamped lines read well in an Airflow task log and in `kubectl logs`.
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )
    for noisy in ("absl", "jax._src", "urllib3", "google", "h5py", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parser_for(config_cls: type, description: str, help_text: dict[str, str]) -> argparse.ArgumentParser:
    """An argparse parser with one `--flag` per dataclass field; unknown options are errors (exit 2)."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        text = help_text.get(f.name, "")
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif kind in ("int", "float"):
            parser.add_argument(flag, type=int if kind == "int" else float, default=default, required=required,
                                help=f"{text} (default: {default})")
        elif kind.startswith("tuple"):
            parser.add_argument(flag, default=",".join(default or ()), required=required,
                                help=f"{text}, comma-separated (default: {','.join(default or ())})")
        else:
            parser.add_argument(flag, default=default, required=required, help=f"{text} (default: {default})")
    return parser


def config_from_args(config_cls: type[C], args: argparse.Namespace) -> C:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        value = getattr(args, f.name)
        kind = f.type if isinstance(f.type, str) else str(f.type)
        if kind.startswith("tuple") and isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        values[f.name] = value
    return config_cls(**values)


def local_output_dir(output: str, workdir: Path) -> Path:
    """Where a stage writes before publishing: the output itself when it is local, else a scratch dir."""
    path = Path(output) if not storage.is_gcs(output) else workdir / "output"
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(
    config_cls: type[C],
    run: Callable[[C, Path], Any],
    description: str,
    help_text: dict[str, str],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse `argv` into `config_cls`, call `run(config, workdir)` and map the outcome to an exit code."""
    configure_logging()
    log = logging.getLogger(config_cls.__module__.rsplit(".", 1)[0])  # e.g. jobs.preprocessing
    args = parser_for(config_cls, description, help_text).parse_args(argv)
    try:
        config = config_from_args(config_cls, args)
        with tempfile.TemporaryDirectory(prefix="stage-", dir=os.environ.get("STAGE_WORKDIR")) as tmp:
            run(config, Path(tmp))
        return EXIT_OK
    except (BadInputError, QualityGateError, ExportMismatchError, PreemptedError) as err:
        log.error("%s (exit %d)", err, err.exit_code)
        return err.exit_code
    except Exception:
        log.error("unexpected failure (retriable):\n%s", traceback.format_exc())
        return EXIT_FAILURE
