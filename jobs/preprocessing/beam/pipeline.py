"""The preprocessing stage as an Apache Beam pipeline: the same contract as `jobs.preprocessing.core` (sources,
modes, type policy, cleaning, global dedup, length filter, seeded hash split, quarantine, stats, manifest written
last), with the row-level logic imported from `jobs.preprocessing.rows`, not copied.

Where the single-machine stage relies on reading order, this pipeline carries each record's position (file index,
record index): a duplicate keeps the row of the lowest position (the one read first), and the errors that stop the
single-machine stage (a bad row with --on-bad-record fail, a mapping that the first readable row contradicts, an
unreadable file) are collected with their positions and the earliest is raised, so both engines fail on the same
row with the same message. Outputs are shards (`train-00000-of-00002.jsonl`, ...) that read in order equal the
single-machine files byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam import pvalue

from jobs.common import storage
from jobs.common.manifest import ConcurrentWriter, StageRun, read_manifest
from jobs.contract import artifacts, documents, splits
from jobs.contract.configs.preprocess import PreprocessConfig
from jobs.contract.errors import BadInputError
from jobs.preprocessing import rows
from jobs.preprocessing.beam.plan import SHARD_BYTES, Plan, prefix
from jobs.preprocessing.rows import COERCIONS, DROP_REASONS
from jobs.preprocessing.sources import read_file, read_records

log = logging.getLogger(__name__)

TOKENIZE_BATCH = 4096  # rows per tokenizer call in a worker (Beam's batching picks up to this many)
REJECTS_TAG, EVENTS_TAG = "rejects", "events"
Position = tuple[int, int]


def new_counts() -> dict[str, Any]:
    return {"rows_in": 0, "dropped": Counter({r: 0 for r in DROP_REASONS}),
            "coerced": Counter({c: 0 for c in COERCIONS}), "quarantine_bytes": 0}


class MergeCounts(beam.CombineFn):
    def create_accumulator(self) -> dict[str, Any]:
        return new_counts()

    def add_input(self, acc: dict[str, Any], counts: dict[str, Any]) -> dict[str, Any]:
        acc["rows_in"] += counts["rows_in"]
        acc["quarantine_bytes"] += counts["quarantine_bytes"]
        acc["dropped"].update(counts["dropped"])
        acc["coerced"].update(counts["coerced"])
        return acc

    def merge_accumulators(self, accs: Any) -> dict[str, Any]:
        merged = new_counts()
        for acc in accs:
            self.add_input(merged, acc)
        return merged

    def extract_output(self, acc: dict[str, Any]) -> dict[str, Any]:
        return acc


class ReadUnit(beam.DoFn):
    """One input unit (a file, or a whole demo / hub dataset): each record's fate. Kept rows go on by dedup digest;
    rejects to the quarantine; counts once per unit; the unit's first readable record and first fatal error as
    events, so the pipeline can tell which would have stopped a single-machine run first."""

    def __init__(self, config: PreprocessConfig, fmt: str) -> None:
        self.config, self.fmt = config, fmt

    def process(self, unit: tuple[int, str, str]) -> Iterator[Any]:
        ordinal, uri, name = unit
        counts = new_counts()
        with tempfile.TemporaryDirectory(prefix="unit-") as tmp:
            try:
                if self.fmt in ("demo", "hf"):
                    records = read_records(self.config.input, None, self.fmt, self.config.hf_split,
                                           self.config.text_field, self.config.sample_by)
                else:
                    local = storage.stage_in(uri, Path(tmp), name="input")
                    records = read_file(local, name, self.fmt, self.config.text_field, self.config.sample_by)
                yield from self._records(ordinal, records, counts)
            except BadInputError as err:  # the file is unreadable as a whole: fatal at the point it was reached
                yield pvalue.TaggedOutput(EVENTS_TAG, ("fatal", (ordinal, counts["rows_in"]), err))
        yield pvalue.TaggedOutput(EVENTS_TAG, ("counts", None, counts))

    def _records(self, ordinal: int, records: Iterator[Any], counts: dict[str, Any]) -> Iterator[Any]:
        config, first_seen, required = self.config, False, tuple(self.config.required_columns())
        for index, record in enumerate(records):
            counts["rows_in"] += 1
            position = (ordinal, index)
            outcome = rows.assess(config, record, counts["coerced"], required)
            if record.data is not None and not first_seen:
                first_seen = True
                yield pvalue.TaggedOutput(EVENTS_TAG, ("first", position, outcome.missing and rows.columns_error(config, record, outcome.missing)))
            if outcome.kind == "reject":
                if config.on_bad_record == "fail":
                    yield pvalue.TaggedOutput(EVENTS_TAG, ("fatal", position, rows.reject_error(record, outcome.detail)))
                    return  # nothing after this row can matter: the run fails at it or earlier
                counts["dropped"][outcome.reason] += 1
                line = rows.quarantine_line(record, outcome.detail)
                counts["quarantine_bytes"] += len(line.encode())
                yield pvalue.TaggedOutput(REJECTS_TAG, (position, line))
            elif outcome.kind == "drop":
                counts["dropped"][outcome.reason] += 1
            else:
                yield rows.dedup_digest(outcome.key), (position, outcome.item, record.location)


class FirstOfKey(beam.CombineFn):
    """A dedup key's row of the lowest position, and how many rows had the key."""

    def create_accumulator(self) -> tuple[Any, int]:
        return None, 0

    def add_input(self, acc: tuple[Any, int], value: Any) -> tuple[Any, int]:
        best, count = acc
        return (value if best is None or value[0] < best[0] else best), count + 1

    def merge_accumulators(self, accs: Any) -> tuple[Any, int]:
        best, total = None, 0
        for value, count in accs:
            if value is not None and (best is None or value[0] < best[0]):
                best = value
            total += count
        return best, total

    def extract_output(self, acc: tuple[Any, int]) -> tuple[Any, int]:
        return acc


class Measure(beam.DoFn):
    """Token counts with the model's SentencePiece model, loaded once per worker; rows too long are counted."""

    def __init__(self, config: PreprocessConfig, tokenizer_uri: str) -> None:
        self.config, self.tokenizer_uri = config, tokenizer_uri

    def setup(self) -> None:
        # keras-hub's Gemma tokenizers add no BOS/EOS themselves (the preprocessor does): plain Encode, as in core.
        self.count = rows.sentencepiece_counter(storage.read_bytes(self.tokenizer_uri))

    def process(self, batch: list[tuple[Any, str]]) -> Iterator[Any]:
        counts = new_counts()
        for row in rows.build(self.config, batch, self.count, counts["dropped"]):
            key = rows.order_key(self.config.seed, row)
            yield key, rows.line(row), rows.length(row), rows.loss_length(row)
        yield pvalue.TaggedOutput(EVENTS_TAG, ("counts", None, counts))


def earliest(events: list[tuple[Position, Any]]) -> tuple[Position, Any] | None:
    return min(events, key=lambda e: e[0]) if events else None


def decide(_: Any, config: PreprocessConfig, shard_bytes: int, counts: dict[str, Any], fatal: list, first: list,
           hist: dict[int, tuple[int, int]]) -> Plan:
    """What a single-machine run would have stopped at, in reading order; else the split's plan. A stop is also
    written to the output prefix (`_error.json`), so the DAG can tell a bad input (no retry) from a failure."""
    stops = list(fatal)
    if (head := earliest(first)) is not None and head[1]:
        stops.insert(0, head)  # the first readable record lacks a mapped column: that error comes first at its row
    try:
        if (stop := earliest(stops)) is not None:
            raise stop[1]
        kept = sum(count for count, _ in hist.values())
        limit, n_eval = rows.split_sizes(kept, config, counts["rows_in"], counts["dropped"])
    except BadInputError as err:
        record_error(config.output, err)
        raise
    return Plan.from_histogram(hist, limit, n_eval, shard_bytes)


def record_error(output: str, err: BadInputError) -> None:
    storage.write_bytes(storage.join(output, artifacts.ERROR), documents.ERROR.dump({"error": str(err), "exit_code": err.exit_code}),
                        "application/json")


def write_shard(element: tuple[tuple[str, int], list[tuple[Any, str, int, int]]], output: str, counts: dict[str, int]) -> dict[str, Any]:
    """One shard, sorted by key, written whole (idempotent: a retried bundle writes the same bytes)."""
    (split, index), items = element
    items = sorted(items, key=lambda item: item[0])
    data = "".join(item[1] for item in items).encode()
    name = splits.shard_name(split, index, counts[split])
    storage.write_bytes(storage.join(output, name), data, "application/jsonl")
    return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "lengths": Counter(item[2] for item in items), "loss_lengths": Counter(item[3] for item in items)}


def finish(_: Any, config: PreprocessConfig, stage: StageRun, plan: Plan, counts: dict[str, Any], written: list[dict],
           quarantine_shards: int) -> dict[str, Any]:
    """After every shard: the missing (empty) shards, stats.json, then the manifest over all of them."""
    files = {w["name"]: {"bytes": w["bytes"], "sha256": w["sha256"]} for w in written}
    counts["dropped"]["over_cap"] = plan.kept - plan.limit  # counted by `decide` into its own copy
    expected = {**plan.shards, **({artifacts.QUARANTINE: quarantine_shards} if rows.rejected(counts["dropped"]) else {})}
    empty = hashlib.sha256(b"").hexdigest()
    for split, count in expected.items():
        for index in range(count):
            name = splits.shard_name(split, index, count)
            if name not in files:
                storage.write_bytes(storage.join(config.output, name), b"", "application/jsonl")
                files[name] = {"bytes": 0, "sha256": empty}
    lengths, loss_lengths = Counter(), Counter()
    for w in written:
        if not w["name"].startswith(artifacts.QUARANTINE):
            lengths.update(w["lengths"])
            loss_lengths.update(w["loss_lengths"])
    stats = rows.stats(config, counts["rows_in"], plan.limit, plan.n_eval, counts["dropped"], counts["coerced"],
                       lengths, loss_lengths)
    data = json.dumps(stats, indent=2).encode()
    storage.write_bytes(storage.join(config.output, artifacts.STATS), data, "application/json")
    files[artifacts.STATS] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    try:
        stage.finish_files(dict(sorted(files.items())), stats, {"engine": "beam"})
    except ConcurrentWriter:
        done = read_manifest(config.output)  # a retried bundle after its own manifest write landed
        if not done or done.get("outputs") != dict(sorted(files.items())):
            raise
    return stats


def build(p: beam.Pipeline, config: PreprocessConfig, fmt: str, units: list[tuple[int, str, str]], tokenizer_uri: str,
          stage: StageRun, shard_bytes: int = SHARD_BYTES) -> beam.PCollection:
    """The pipeline's graph; returns the PCollection holding the stats once the manifest is written."""
    read = (p | "Units" >> beam.Create(units) | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(ReadUnit(config, fmt)).with_outputs(REJECTS_TAG, EVENTS_TAG, main="kept"))
    measured = (read.kept | "FirstOfKey" >> beam.CombinePerKey(FirstOfKey())
                | "CountDuplicates" >> beam.ParDo(_first_and_duplicates).with_outputs(EVENTS_TAG, main="items")
                )
    built = (measured["items"] | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=TOKENIZE_BATCH)
             | "Measure" >> beam.ParDo(Measure(config, tokenizer_uri)).with_outputs(EVENTS_TAG, main="rows"))
    kept_rows = built.rows
    events = (read[EVENTS_TAG], measured[EVENTS_TAG], built[EVENTS_TAG]) | "Events" >> beam.Flatten()
    counts = (events | "CountEvents" >> beam.FlatMap(lambda e: [e[2]] if e[0] == "counts" else [])
              | "Counts" >> beam.CombineGlobally(MergeCounts()))
    fatal = events | "Fatal" >> beam.FlatMap(lambda e: [(e[1], e[2])] if e[0] == "fatal" else [])
    first = events | "First" >> beam.FlatMap(lambda e: [(e[1], e[2])] if e[0] == "first" else [])
    hist = (kept_rows | "ByPrefix" >> beam.Map(lambda r: (prefix(r[0]), (1, len(r[1].encode()))))
            | "Histogram" >> beam.CombinePerKey(lambda pairs: tuple(map(sum, zip(*pairs)))))
    plan = (p | "Once" >> beam.Create([None])
            | "Decide" >> beam.Map(decide, config, shard_bytes, beam.pvalue.AsSingleton(counts), beam.pvalue.AsList(fatal),
                                   beam.pvalue.AsList(first), beam.pvalue.AsDict(hist)))
    cut_keys = (kept_rows | "InCutBuckets" >> beam.FlatMap(
                    lambda r, plan: [(prefix(r[0]), r[0])] if prefix(r[0]) in plan.cut_buckets() else [],
                    beam.pvalue.AsSingleton(plan))
                | "CutBuckets" >> beam.GroupByKey() | "Keys" >> beam.MapTuple(lambda bucket, keys: (bucket, list(keys))))
    settled = plan | "Settle" >> beam.Map(lambda plan, keys: plan.settle(keys), beam.pvalue.AsDict(cut_keys))
    assigned = kept_rows | "Assign" >> beam.FlatMap(_assign, beam.pvalue.AsSingleton(settled))
    quarantine_shards = counts | "QuarantineShards" >> beam.Map(
        lambda c: min(len(units), max(1, -(-c["quarantine_bytes"] // shard_bytes))))
    quarantined = read[REJECTS_TAG] | "QuarantineShard" >> beam.Map(
        lambda r, shards: ((artifacts.QUARANTINE, r[0][0] * shards // len(units)), (r[0], r[1], 0, 0)),
        beam.pvalue.AsSingleton(quarantine_shards))
    shard_counts = (settled | "ShardCounts" >> beam.Map(lambda plan, q: {**plan.shards, artifacts.QUARANTINE: q},
                                                       beam.pvalue.AsSingleton(quarantine_shards)))
    written = ((assigned, quarantined) | "ToWrite" >> beam.Flatten() | "Shards" >> beam.GroupByKey()
               | "Write" >> beam.Map(write_shard, config.output, beam.pvalue.AsSingleton(shard_counts)))
    return (p | "AtEnd" >> beam.Create([None])
            | "Finish" >> beam.Map(finish, config, stage, beam.pvalue.AsSingleton(settled), beam.pvalue.AsSingleton(counts),
                                   beam.pvalue.AsList(written), beam.pvalue.AsSingleton(quarantine_shards)))


def _first_and_duplicates(element: tuple[bytes, tuple[Any, int]]) -> Iterator[Any]:
    _, ((_, item, location), count) = element
    if count > 1:
        counts = new_counts()
        counts["dropped"]["duplicate"] = count - 1
        yield pvalue.TaggedOutput(EVENTS_TAG, ("counts", None, counts))
    yield item, location


def _assign(row: tuple[bytes, str, int, int], plan: Plan) -> Iterator[tuple[tuple[str, int], tuple[bytes, str, int, int]]]:
    split = plan.split_of(row[0])
    if split is not None:
        yield (split, plan.shard_of(split, row[0])), row


def stale_outputs(output: str) -> list[str]:
    """Split, quarantine and stats files a previous run of either engine left at the prefix."""
    names = storage.list_files(output)
    return [n for n in names if splits.SHARD.match(n) or n in (*map(artifacts.split_file, (artifacts.TRAIN, artifacts.EVAL, artifacts.QUARANTINE)),
                                                             artifacts.STATS, artifacts.ERROR)]
