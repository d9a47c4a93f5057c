"""The thin CLI shared by every stage: parse, validate, run, and turn exceptions into exit codes."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from jobs.common import storage, timing
from jobs.contract import spec
from jobs.contract.errors import (
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


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"got {text!r}; expected true or false")


def parser_for(config_cls: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one `--flag` per config option; unknown options are errors (exit 2)."""
    from jobs.contract import stages

    module = next((s.module for s in stages.REGISTRY.values() if s.config is config_cls), config_cls.__module__)
    prog = "python -m " + module
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    for opt in spec.options(config_cls):
        text = opt.help.replace("%", "%%")  # argparse %-formats help strings
        if opt.choices:
            text += f" ({'|'.join(opt.choices)})"
        if opt.kind == "bool":
            # `--flag`, `--flag true|false` (what a Job renders from a DAG Param) and `--no-flag` all work.
            parser.add_argument(opt.flag, nargs="?", const=True, type=parse_bool, default=opt.default,
                                metavar="true|false", help=f"{text} (default: {str(opt.default).lower()})")
            parser.add_argument("--no-" + opt.flag[2:], dest=opt.name, action="store_false", help=argparse.SUPPRESS)
        elif opt.kind == "tuple":
            joined = ",".join(opt.default or ())
            parser.add_argument(opt.flag, default=joined, required=opt.required,
                                help=f"{text}, comma-separated (default: {joined!r})")
        else:
            convert = {"int": int, "float": float}.get(opt.kind, str)
            parser.add_argument(opt.flag, type=convert, default=opt.default, required=opt.required,
                                help=text if opt.required else f"{text} (default: {opt.default!r})")
    return parser


def config_from_args(config_cls: type[C], args: argparse.Namespace) -> C:
    values: dict[str, Any] = {}
    for opt in spec.options(config_cls):
        value = getattr(args, opt.name)
        if opt.kind == "tuple" and isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        values[opt.name] = value
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
    argv: Sequence[str] | None = None,
    passthrough: Callable[[list[str]], Any] | None = None,
) -> int:
    """Parse `argv` into `config_cls`, call `run(config, workdir)` and map the outcome to an exit code. With
    `passthrough`, the arguments the stage does not know go to it (it validates them: an engine's own options) and
    what it returns is `run`'s third argument."""
    configure_logging()
    timing.clock()  # what ran before this line (the interpreter, the entry point's imports) counts as imports
    log = logging.getLogger(config_cls.__module__.rsplit(".", 1)[0])  # e.g. jobs.preprocessing
    parser = parser_for(config_cls, description)
    args, rest = parser.parse_known_args(argv) if passthrough else (parser.parse_args(argv), [])
    try:
        config = config_from_args(config_cls, args)
        if passthrough is not None:
            run = functools.partial(run, options=passthrough(rest))
        with tempfile.TemporaryDirectory(prefix="stage-", dir=os.environ.get("STAGE_WORKDIR")) as tmp:
            run(config, Path(tmp))
        return EXIT_OK
    except (BadInputError, QualityGateError, ExportMismatchError, PreemptedError) as err:
        log.error("%s (exit %d)", err, err.exit_code)
        return err.exit_code
    except Exception:
        log.error("unexpected failure (retriable):\n%s", traceback.format_exc())
        return EXIT_FAILURE
