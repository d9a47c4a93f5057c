"""Preprocessing core: read, map fields, template, clean, filter by token length, split, write."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jobs.common import sources, storage, timing
from jobs.common.manifest import StageRun, source_ref
from jobs.contract import artifacts
from jobs.contract.configs.preprocess import PreprocessConfig
from jobs.preprocessing import archives, rows, spill
from jobs.preprocessing.demo import DEMO_TEXT_URI, DEMO_URI
from jobs.preprocessing.rows import COERCIONS, DROP_REASONS
from jobs.preprocessing.sources import Record, detect_format, read_records

log = logging.getLogger(__name__)

TOKENIZE_BATCH = 32768  # rows per tokenizer call: big enough to amortise the call, small enough to bound memory
DEMOS = (DEMO_URI, DEMO_TEXT_URI)


def token_counter(tokenizer: Any) -> rows.TokenCounter:
    """Token counts of a batch of texts, as the stage needs them. keras-hub's SentencePiece tokenizers call the
    sentencepiece library; calling it on the same proto with the same BOS/EOS options gives the same ids without
    the Keras layer's input and output conversions (a third of the tokenizing time on 200k rows)."""
    proto = getattr(tokenizer, "proto", None)
    if not isinstance(proto, bytes):
        return lambda texts: [len(ids) for ids in tokenizer(texts)]
    return rows.sentencepiece_counter(proto, bool(getattr(tokenizer, "add_bos", False)),
                                      bool(getattr(tokenizer, "add_eos", False)))


def _input_bytes(local: Path | None) -> int | None:
    if local is None:
        return None
    files = [local] if local.is_file() else [p for p in local.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    # The first file stands for all; a name that lies about its codec is the reader's to report, with its full name.
    return size * 8 if files and archives.sniff(files[0]) else size  # compressed: ~8x as text


def run(config: PreprocessConfig, workdir: Path) -> dict[str, Any]:
    fmt = "demo" if config.input in DEMOS else "hf" if config.input.startswith("hf://") else detect_format(config.input, config.input_format)
    local_input = None if fmt in ("demo", "hf") else storage.stage_in(config.input, workdir / "input")
    if fmt == "demo":
        input_ref = {"uri": config.input, "python": sys.version.split()[0]}
    else:
        input_ref = source_ref(config.input, local_input)
    model_handle = sources.resolve(config.base_model, workdir)
    stage = StageRun("preprocess", config.output, asdict(config), [input_ref, sources.model_ref(config.base_model, model_handle, tokenizer_only=True)])
    if (out := stage.start(workdir)) is None:
        return stage.manifest

    timing.begin("compute")
    dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
    coerced: Counter[str] = Counter({name: 0 for name in COERCIONS})
    rows_in = 0
    columns_checked = False
    required = tuple(config.required_columns())
    workdir.mkdir(parents=True, exist_ok=True)
    spill_dir = Path(tempfile.mkdtemp(prefix="spill-", dir=workdir))
    count = spill.bucket_count(_input_bytes(local_input))
    by_key = spill.Buckets(spill_dir / "dedup", count)

    def reject(record: Record, reason: str, detail: str) -> None:
        if config.on_bad_record == "fail":
            raise rows.reject_error(record, detail)
        dropped[reason] += 1
        quarantine.write(rows.quarantine_line(record, detail))

    # 1. Stream the input: validate and render each row, spill it to a bucket by its dedup key.
    with (out / artifacts.split_file(artifacts.QUARANTINE)).open("w", encoding="utf-8") as quarantine:
        for record in read_records(config.input, local_input, fmt, config.hf_split, config.text_field, config.sample_by):
            rows_in += 1
            outcome = rows.assess(config, record, coerced, required)
            if outcome.missing and not columns_checked:
                raise rows.columns_error(config, record, outcome.missing)
            columns_checked = columns_checked or record.data is not None
            if outcome.kind == "reject":
                reject(record, outcome.reason, outcome.detail)
            elif outcome.kind == "drop":
                dropped[outcome.reason] += 1
            else:
                digest = rows.dedup_digest(outcome.key)
                by_key.add(spill.hash_bucket(digest, count), (digest, outcome.item, record.location))

    # 2. Per bucket: keep each key's first row, tokenize, filter by length, spill to a bucket by the split's order.
    count_tokens = token_counter(sources.load_tokenizer(config.base_model, workdir))
    by_order = spill.Buckets(spill_dir / "order", count)
    for bucket in by_key.drain():
        first: dict[bytes, tuple[Any, str]] = {}
        for digest, item, location in bucket:
            if digest in first:
                dropped["duplicate"] += 1
            else:
                first[digest] = (item, location)
        del bucket
        items = list(first.values())
        for offset in range(0, len(items), TOKENIZE_BATCH):
            for row in rows.build(config, items[offset:offset + TOKENIZE_BATCH], count_tokens, dropped):
                order = rows.order_key(config.seed, row)
                by_order.add(spill.hash_bucket(order, count), (order, row))
    limit, n_eval = rows.split_sizes(by_order.items, config, rows_in, dropped)

    # 3. Buckets in order, sorted within: the global hash order; the first n_eval rows are the eval split.
    lengths: Counter[int] = Counter()
    loss_lengths: Counter[int] = Counter()
    position = 0
    with (out / artifacts.split_file(artifacts.TRAIN)).open("w", encoding="utf-8") as train, (out / artifacts.split_file(artifacts.EVAL)).open("w", encoding="utf-8") as evals:
        for bucket in by_order.drain():
            for _, row in sorted(bucket, key=lambda pair: pair[0]):
                if position >= limit:
                    break
                (evals if position < n_eval else train).write(rows.line(row))
                lengths[rows.length(row)] += 1
                loss_lengths[rows.loss_length(row)] += 1
                position += 1
    shutil.rmtree(spill_dir, ignore_errors=True)
    if not rows.rejected(dropped):
        (out / artifacts.split_file(artifacts.QUARANTINE)).unlink()
    stats = rows.stats(config, rows_in, limit, n_eval, dropped, coerced, lengths, loss_lengths)
    (out / artifacts.STATS).write_text(json.dumps(stats, indent=2))
    log.info("rows in %d, out %d (train %d, eval %d), dropped %s, coerced %s", rows_in, limit, limit - n_eval, n_eval,
             {k: v for k, v in dropped.items() if v}, {k: v for k, v in coerced.items() if v})
    return stage.finish(out, stats)

