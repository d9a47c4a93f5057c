"""The preprocessing stage on Apache Beam: Dataflow for corpora past one machine, Beam's in-process runner locally.

`python -m jobs.preprocessing.beam` takes the stage's own options (same names, same validation) plus Beam's
pipeline options (`--runner`, `--project`, `--region`, `--temp_location`, ...); with no `--runner` it runs in
process (FnApiRunner: no runner binary to download). Lives in its own environment and image: Beam's pins
(protobuf, pyarrow, pillow) conflict with the stage and Airflow pins (docs/stages.md).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jobs import demo_model
from jobs.common import sources, storage
from jobs.common.manifest import StageRun, digest_json, read_manifest, source_ref
from jobs.contract.configs.preprocess import PreprocessConfig
from jobs.contract.errors import BadInputError
from jobs.preprocessing.demo import DEMO_TEXT_URI, DEMO_URI
from jobs.preprocessing.sources import SUFFIXES, detect_format, input_files, ordered

log = logging.getLogger(__name__)

SHARD_BYTES_ENV = "GEMMA_PIPELINE_SHARD_BYTES"  # target shard size (default 64 MiB); tests make it small
IN_PROCESS = "FnApiRunner"
DATAFLOW = "DataflowRunner"


def input_format(config: PreprocessConfig) -> str:
    if config.input in (DEMO_URI, DEMO_TEXT_URI):
        return "demo"
    return "hf" if config.input.startswith("hf://") else detect_format(config.input, config.input_format)


def input_units(config: PreprocessConfig, fmt: str) -> list[tuple[int, str, str]]:
    """(index, URI, name in locations) of each unit read by one worker: a file, or a whole demo / hub dataset. The
    order is the single-machine stage's reading order."""
    uri = config.input
    if fmt in ("demo", "hf"):
        return [(0, uri, uri)]
    if not storage.is_gcs(uri):
        local = Path(uri)
        if not local.exists():
            raise BadInputError("input", uri, "an existing file or directory")  # as storage.stage_in says it
        return [(i, str(path), name) for i, (path, name) in enumerate(input_files(uri, local, fmt))]
    if not uri.endswith("/") and storage.exists(uri):
        return [(0, uri, uri)]
    names = ordered(storage.list_files(uri), fmt)
    if not names:
        raise BadInputError("--input", uri, f"a .{fmt} object or a prefix holding {' or '.join(SUFFIXES[fmt])} objects")
    return [(i, storage.join(uri, name), f"{uri.rstrip('/')}/{name}") for i, name in enumerate(names)]


def input_reference(config: PreprocessConfig, fmt: str) -> dict[str, str]:
    """What the manifest records of the input; gs:// objects by their listed size and CRC32C, not downloaded."""
    if fmt == "demo":
        return {"uri": config.input, "python": sys.version.split()[0]}
    if fmt == "hf":
        return {"uri": config.input}
    if not storage.is_gcs(config.input):
        return source_ref(config.input, Path(config.input))
    return {"uri": config.input, "objects_sha256": digest_json(storage.fingerprints(config.input))}


def model_reference(config: PreprocessConfig, proto: bytes) -> dict[str, str]:
    if config.base_model == demo_model.DEMO_MODEL_URI:
        return demo_model.model_ref()
    import hashlib

    return {"uri": config.base_model, "tokenizer_sha256": hashlib.sha256(proto).hexdigest()}


def bad_input_in(err: BaseException) -> BadInputError | None:
    """The BadInputError behind a runner's wrapped failure (runners re-raise a worker's error as their own)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BadInputError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def run(config: PreprocessConfig, workdir: Path, options: Any) -> dict[str, Any]:
    """Run (or, on Dataflow, submit) the pipeline; returns the manifest, or the submitted job on Dataflow."""
    from apache_beam.options.pipeline_options import StandardOptions

    standard = options.view_as(StandardOptions)
    standard.runner = standard.runner or IN_PROCESS
    try:
        return _run(config, workdir, options, standard)
    except BadInputError as err:
        if standard.runner == DATAFLOW:  # the launcher's own refusals, as the workers' (jobs.preprocessing.beam.pipeline)
            from jobs.preprocessing.beam.pipeline import record_error

            record_error(config.output, err)
        raise


def _run(config: PreprocessConfig, workdir: Path, options: Any, standard: Any) -> dict[str, Any]:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    from jobs.preprocessing.beam.pipeline import build, stale_outputs
    from jobs.preprocessing.beam.plan import SHARD_BYTES

    fmt = input_format(config)
    units = input_units(config, fmt)
    proto = sources.tokenizer_proto(config.base_model, workdir)
    stage = StageRun("preprocess", config.output, asdict(config), [input_reference(config, fmt), model_reference(config, proto)])
    stage.start(None)  # no local directory: the pipeline writes its shards to the output itself
    if stage.manifest is not None:
        return stage.manifest
    for name in stale_outputs(config.output):
        storage.delete(storage.join(config.output, name))
    temp = options.view_as(GoogleCloudOptions).temp_location or str(workdir)
    tokenizer_uri = storage.join(temp, f"gemma-preprocess-{uuid.uuid4().hex[:12]}", "tokenizer.model")
    storage.write_bytes(tokenizer_uri, proto)
    log.info("%s: %d input unit(s), runner %s", config.input, len(units), standard.runner)
    pipeline = beam.Pipeline(options=options)
    build(pipeline, config, fmt, units, tokenizer_uri, stage, int(os.environ.get(SHARD_BYTES_ENV) or SHARD_BYTES))
    try:
        result = pipeline.run()
        if standard.runner == DATAFLOW:
            log.info("submitted Dataflow job %s; it writes %s/_manifest.json last", getattr(result, "job_id", lambda: "?")(), config.output)
            return {"submitted": True}
        result.wait_until_finish()
    except Exception as err:
        if (bad := bad_input_in(err)) is not None:
            raise bad from None
        raise
    manifest = read_manifest(config.output)
    assert manifest is not None, "the pipeline finished without writing its manifest"
    return manifest
