"""Preprocessing core: read, map fields, template, clean, filter by token length, split, write."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jobs.common import sources, storage
from jobs.common.cli import local_output_dir
from jobs.common.errors import BadInputError
from jobs.common.manifest import StageRun, source_ref
from jobs.preprocessing import archives, rows, spill
from jobs.preprocessing.config import PreprocessConfig
from jobs.preprocessing.demo import DEMO_TEXT_URI, DEMO_URI
from jobs.preprocessing.rows import COERCIONS, DROP_REASONS, REJECTS
from jobs.preprocessing.sources import Record, detect_format, read_records

log = logging.getLogger(__name__)

TOKENIZE_BATCH = 32768  # rows per tokenizer call: big enough to amortise the call, small enough to bound memory
DEMOS = (DEMO_URI, DEMO_TEXT_URI)
TokenCounter = Callable[[list[str]], list[int]]
USER_TURN = "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"
MODEL_TURN_END = "<end_of_turn>"


def _order_key(seed: int, prompt: str, response: str) -> bytes:
    # Hash order: deterministic for a seed, independent of input order and of the machine.
    return hashlib.sha256(f"{seed}\x00{prompt}\x00{response}".encode()).digest()


def token_counter(tokenizer: Any) -> TokenCounter:
    """Token counts of a batch of texts, as the stage needs them. keras-hub's SentencePiece tokenizers call the
    sentencepiece library; calling it on the same proto with the same BOS/EOS options gives the same ids without
    the Keras layer's input and output conversions (a third of the tokenizing time on 200k rows)."""
    proto = getattr(tokenizer, "proto", None)
    if not isinstance(proto, bytes):
        return lambda texts: [len(ids) for ids in tokenizer(texts)]
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    options = {"add_bos": bool(getattr(tokenizer, "add_bos", False)), "add_eos": bool(getattr(tokenizer, "add_eos", False))}
    return lambda texts: [len(ids) for ids in processor.Encode(texts, **options)]


def chat(config: PreprocessConfig, prompt: str, response: str) -> tuple[str, str]:
    if config.chat_format == "gemma":
        return USER_TURN.format(prompt=prompt), response + MODEL_TURN_END
    return prompt + "\n", response


def _identity(row: dict[str, Any]) -> tuple[str, str]:
    if "text" in row:
        return row["text"], ""
    if "segments" in row:
        return "".join(text for text, _ in row["segments"]), ""
    return row["prompt"], row["response"]


def _loss_tokens(row: dict[str, Any]) -> int:
    return row.get("loss_tokens", row.get("tokens", row.get("response_tokens", 0)))


def _instruction_rows(config: PreprocessConfig, items: list, count: TokenCounter, dropped: Counter) -> list[dict[str, Any]]:
    formatted = [chat(config, *pair) + (loc,) for pair, loc in items]
    prompt_counts = count([p for p, _, _ in formatted]) if formatted else []
    response_counts = count([r for _, r, _ in formatted]) if formatted else []
    kept = []
    for (prompt, response, location), p_count, r_count in zip(formatted, prompt_counts, response_counts):
        if p_count + r_count + 2 > config.max_tokens:  # with BOS and EOS
            dropped["too_long"] += 1
            continue
        kept.append({"prompt": prompt, "response": response, "prompt_tokens": p_count + 1,
                     "response_tokens": r_count + 1, "source": location})
    return kept


def _chat_rows(config: PreprocessConfig, items: list, count: TokenCounter, dropped: Counter) -> list[dict[str, Any]]:
    """Rendered conversations with their token counts; `prompt`/`response` (everything before the last assistant
    turn, and that turn) let the answers step and readers of the split see a conversation as a pair."""
    texts = [text for segments, _ in items for text, _ in segments]
    all_counts = iter(count(texts) if texts else [])
    kept = []
    for segments, location in items:
        counts = [next(all_counts) for _ in segments]
        total = sum(counts) + 2
        if total > config.max_tokens:
            dropped["too_long"] += 1
            continue
        last = max(i for i, (_, loss) in enumerate(segments) if loss)
        kept.append({"segments": segments, "prompt": "".join(t for t, _ in segments[:last]),
                     "response": segments[last][0], "tokens": total,
                     "loss_tokens": sum(c for c, (_, loss) in zip(counts, segments) if loss) + 1, "source": location})
    return kept


def _text_rows(config: PreprocessConfig, items: list, count: TokenCounter, dropped: Counter) -> list[dict[str, Any]]:
    """Documents are kept whole whatever their length: the fine-tune packs them into full sequences."""
    counts = count([doc for doc, _ in items]) if items else []
    return [{"text": doc, "tokens": count + 2, "source": location} for (doc, location), count in zip(items, counts)]


def _percentiles(counts: Counter[int]) -> dict[str, int]:
    """Percentiles as the nearest rank of the sorted values, from a histogram (bounded memory)."""
    total = sum(counts.values())
    if not total:
        return {}
    lengths = sorted(counts)
    result = {}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99)):
        rank, seen = min(total, max(1, math.ceil(q * total))), 0
        for length in lengths:
            seen += counts[length]
            if seen >= rank:
                result[name] = length
                break
    return {**result, "max": lengths[-1], "min": lengths[0]}


def _input_bytes(local: Path | None) -> int | None:
    if local is None:
        return None
    files = [local] if local.is_file() else [p for p in local.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    return size * 8 if any(archives.codec_of(p, p.name) for p in files[:1]) else size  # compressed: ~8x as text


def run(config: PreprocessConfig, workdir: Path) -> dict[str, Any]:
    fmt = "demo" if config.input in DEMOS else "hf" if config.input.startswith("hf://") else detect_format(config.input, config.input_format)
    local_input = None if fmt in ("demo", "hf") else storage.stage_in(config.input, workdir / "input")
    if fmt == "demo":
        input_ref = {"uri": config.input, "python": sys.version.split()[0]}
    else:
        input_ref = source_ref(config.input, local_input)
    model_handle = sources.resolve(config.base_model, workdir)
    stage = StageRun("preprocess", config.output, asdict(config), [input_ref, sources.model_ref(config.base_model, model_handle, tokenizer_only=True)])
    if (done := stage.already_done()) is not None:
        return done
    stage.invalidate()
    out = local_output_dir(config.output, workdir)

    dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
    coerced: Counter[str] = Counter({name: 0 for name in COERCIONS})
    rows_in = 0
    required = config.required_columns()
    columns_checked = False
    workdir.mkdir(parents=True, exist_ok=True)
    spill_dir = Path(tempfile.mkdtemp(prefix="spill-", dir=workdir))
    count = spill.bucket_count(_input_bytes(local_input))
    by_key = spill.Buckets(spill_dir / "dedup", count)

    def reject(record: Record, reason: str, detail: str) -> None:
        if config.on_bad_record == "fail":
            raise BadInputError("--input", record.location, "a readable row with the mapped fields", detail + " (use --on-bad-record skip to quarantine such rows)")
        dropped[reason] += 1
        quarantine.write(json.dumps({"location": record.location, "reason": detail,
                                     "raw": record.raw or json.dumps(record.data, default=str)}, ensure_ascii=False) + "\n")

    # 1. Stream the input: validate and render each row, spill it to a bucket by its dedup key.
    with (out / "quarantine.jsonl").open("w", encoding="utf-8") as quarantine:
        for record in read_records(config.input, local_input, fmt, config.hf_split, config.text_field, config.sample_by):
            rows_in += 1
            if record.error is not None:
                reject(record, "bad_record", record.error)
                continue
            assert record.data is not None
            missing = [c for c in required if c not in record.data]
            if missing and not columns_checked:
                fields = {"chat": "--messages-field", "text": "--text-field"}.get(
                    config.mode, "--instruction-field/--response-field/--context-field/--template")
                raise BadInputError(
                    fields, ", ".join(missing),
                    f"columns that exist in {config.input}: {', '.join(map(str, record.data)) or '(none)'}",
                )
            columns_checked = True
            if missing:
                reject(record, "missing_field", f"missing field(s) {', '.join(missing)}")
                continue
            try:
                key, item = rows.prepare(config, record.data, coerced)
            except rows.Drop as drop:
                if drop.reason in REJECTS:
                    reject(record, drop.reason, drop.detail)
                else:
                    dropped[drop.reason] += 1
                continue
            digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
            by_key.add(spill.hash_bucket(digest, count), (digest, item, record.location))

    # 2. Per bucket: keep each key's first row, tokenize, filter by length, spill to a bucket by the split's order.
    count_tokens = token_counter(sources.load_tokenizer(config.base_model, workdir))
    build = {"instruction": _instruction_rows, "chat": _chat_rows, "text": _text_rows}[config.mode]
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
            for row in build(config, items[offset:offset + TOKENIZE_BATCH], count_tokens, dropped):
                order = _order_key(config.seed, *_identity(row))
                by_order.add(spill.hash_bucket(order, count), (order, row))
    kept = by_order.items
    limit = min(kept, config.max_examples) if config.max_examples else kept
    dropped["over_cap"] += kept - limit
    if not limit:
        raise BadInputError("rows", 0, "at least one row left after cleaning", f"dropped per reason: {dict(dropped)}")
    n_eval = math.ceil(limit * config.eval_fraction) if config.eval_fraction > 0 else 0
    if config.eval_fraction > 0 and limit - n_eval < 1:
        raise BadInputError(
            "--eval-fraction", config.eval_fraction, "a split that leaves at least one eval row and one train row",
            f"{limit} row(s) left after cleaning (rows in {rows_in}, dropped per reason {dict(dropped)}); add data, "
            "or set --eval-fraction 0 to train without an eval split")

    # 3. Buckets in order, sorted within: the global hash order; the first n_eval rows are the eval split.
    lengths: Counter[int] = Counter()
    loss_lengths: Counter[int] = Counter()
    position = 0
    with (out / "train.jsonl").open("w", encoding="utf-8") as train, (out / "eval.jsonl").open("w", encoding="utf-8") as evals:
        for bucket in by_order.drain():
            for _, row in sorted(bucket, key=lambda pair: pair[0]):
                if position >= limit:
                    break
                (evals if position < n_eval else train).write(json.dumps(row, ensure_ascii=False) + "\n")
                lengths[row["tokens"] if "tokens" in row else row["prompt_tokens"] + row["response_tokens"]] += 1
                loss_lengths[_loss_tokens(row)] += 1
                position += 1
    shutil.rmtree(spill_dir, ignore_errors=True)
    if not dropped_rejects(dropped):
        (out / "quarantine.jsonl").unlink()
    stats = {
        "mode": config.mode,
        "rows_in": rows_in,
        "rows_out": limit,
        "train_rows": limit - n_eval,
        "eval_rows": n_eval,
        "dropped": dict(dropped),
        "coerced": dict(coerced),
        "quarantined": dropped_rejects(dropped),
        "token_length": _percentiles(lengths),
        "loss_token_length": _percentiles(loss_lengths),
        "total_tokens": sum(length * n for length, n in lengths.items()),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    log.info("rows in %d, out %d (train %d, eval %d), dropped %s, coerced %s", rows_in, limit, limit - n_eval, n_eval,
             {k: v for k, v in dropped.items() if v}, {k: v for k, v in coerced.items() if v})
    return stage.finish(out, stats)


def dropped_rejects(dropped: Counter[str]) -> int:
    return sum(dropped[reason] for reason in REJECTS)
