"""Preprocessing core: read, map fields, template, clean, filter by token length, split, write."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jobs.common import sources, storage
from jobs.common.cli import local_output_dir
from jobs.common.errors import BadInputError
from jobs.common.manifest import StageRun, source_ref
from jobs.preprocessing.config import PreprocessConfig
from jobs.preprocessing.demo import DEMO_TEXT_URI, DEMO_URI
from jobs.preprocessing.modes import ChatError, clean_text, render_chat
from jobs.preprocessing.sources import Record, detect_format, read_records

log = logging.getLogger(__name__)

DROP_REASONS = ("bad_record", "missing_field", "bad_chat", "empty", "duplicate", "too_long", "over_cap")
DEMOS = (DEMO_URI, DEMO_TEXT_URI)
USER_TURN = "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"
MODEL_TURN_END = "<end_of_turn>"


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _order_key(seed: int, prompt: str, response: str) -> str:
    # Hash order: deterministic for a seed, independent of input order and of the machine.
    return hashlib.sha256(f"{seed}\x00{prompt}\x00{response}".encode()).hexdigest()


def render(config: PreprocessConfig, row: dict[str, Any]) -> tuple[str, str]:
    """The (prompt, response) pair of one row, before chat formatting."""
    if config.template:
        prompt = config.template.format(**{k: "" if row.get(k) is None else str(row[k]) for k in config.placeholders()})
    else:
        prompt = str(row.get(config.instruction_field) or "").strip()
        context = str(row.get(config.context_field) or "").strip() if config.context_field else ""
        if context:
            prompt = f"{prompt}\n\n{context}"
    return prompt.strip(), str(row.get(config.response_field) or "").strip()


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


def _instruction_rows(config: PreprocessConfig, items: list, tokenizer, dropped: Counter) -> list[dict[str, Any]]:
    formatted = [chat(config, *pair) + (loc,) for pair, loc in items]
    prompt_ids = tokenizer([p for p, _, _ in formatted]) if formatted else []
    response_ids = tokenizer([r for _, r, _ in formatted]) if formatted else []
    kept = []
    for (prompt, response, location), p_ids, r_ids in zip(formatted, prompt_ids, response_ids):
        if len(p_ids) + len(r_ids) + 2 > config.max_tokens:  # with BOS and EOS
            dropped["too_long"] += 1
            continue
        kept.append({"prompt": prompt, "response": response, "prompt_tokens": len(p_ids) + 1,
                     "response_tokens": len(r_ids) + 1, "source": location})
    return kept


def _chat_rows(config: PreprocessConfig, items: list, tokenizer, dropped: Counter) -> list[dict[str, Any]]:
    """Rendered conversations with their token counts; `prompt`/`response` (everything before the last assistant
    turn, and that turn) let the answers step and readers of the split see a conversation as a pair."""
    texts = [text for segments, _ in items for text, _ in segments]
    ids = iter(tokenizer(texts) if texts else [])
    kept = []
    for segments, location in items:
        counts = [len(next(ids)) for _ in segments]
        total = sum(counts) + 2
        if total > config.max_tokens:
            dropped["too_long"] += 1
            continue
        last = max(i for i, (_, loss) in enumerate(segments) if loss)
        kept.append({"segments": segments, "prompt": "".join(t for t, _ in segments[:last]),
                     "response": segments[last][0], "tokens": total,
                     "loss_tokens": sum(c for c, (_, loss) in zip(counts, segments) if loss) + 1, "source": location})
    return kept


def _text_rows(config: PreprocessConfig, items: list, tokenizer, dropped: Counter) -> list[dict[str, Any]]:
    """Documents are kept whole whatever their length: the fine-tune packs them into full sequences."""
    ids = tokenizer([doc for doc, _ in items]) if items else []
    return [{"text": doc, "tokens": len(doc_ids) + 2, "source": location} for (doc, location), doc_ids in zip(items, ids)]


def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p95": pick(0.95), "p99": pick(0.99), "max": ordered[-1], "min": ordered[0]}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


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
    quarantine: list[dict[str, str]] = []
    candidates: dict[str, tuple[Any, str]] = {}  # normalised text -> (rendered row, location)
    rows_in = 0
    required = config.required_columns()
    columns_checked = False

    def reject(record: Record, reason: str, detail: str) -> None:
        if config.on_bad_record == "fail":
            raise BadInputError("--input", record.location, "a readable row with the mapped fields", detail + " (use --on-bad-record skip to quarantine such rows)")
        dropped[reason] += 1
        quarantine.append({"location": record.location, "reason": detail, "raw": record.raw or json.dumps(record.data, default=str)})

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
        if config.mode == "chat":
            try:
                item: Any = render_chat(record.data[config.messages_field])
            except ChatError as err:
                reject(record, "bad_chat", str(err))
                continue
            key = _normalise("".join(text for text, _ in item))
        elif config.mode == "text":
            item = clean_text("" if record.data[config.text_field] is None else str(record.data[config.text_field]))
            if not item:
                dropped["empty"] += 1
                continue
            key = _normalise(item)
        else:
            item = render(config, record.data)
            if not item[0] or not item[1]:
                dropped["empty"] += 1
                continue
            key = _normalise(item[0]) + "\x00" + _normalise(item[1])
        if key in candidates:
            dropped["duplicate"] += 1
            continue
        candidates[key] = (item, record.location)

    tokenizer = sources.load_tokenizer(config.base_model, workdir)
    build = {"instruction": _instruction_rows, "chat": _chat_rows, "text": _text_rows}[config.mode]
    kept = build(config, list(candidates.values()), tokenizer, dropped)
    kept.sort(key=lambda row: _order_key(config.seed, *_identity(row)))
    if config.max_examples and len(kept) > config.max_examples:
        dropped["over_cap"] += len(kept) - config.max_examples
        kept = kept[: config.max_examples]
    if not kept:
        raise BadInputError("rows", 0, "at least one row left after cleaning", f"dropped per reason: {dict(dropped)}")

    n_eval = min(len(kept) - 1, math.ceil(len(kept) * config.eval_fraction)) if config.eval_fraction > 0 else 0
    eval_rows, train_rows = kept[:n_eval], kept[n_eval:]
    _write_jsonl(out / "train.jsonl", train_rows)
    _write_jsonl(out / "eval.jsonl", eval_rows)
    if quarantine:
        _write_jsonl(out / "quarantine.jsonl", quarantine)
    lengths = [r["tokens"] if "tokens" in r else r["prompt_tokens"] + r["response_tokens"] for r in kept]
    stats = {
        "mode": config.mode,
        "rows_in": rows_in,
        "rows_out": len(kept),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "dropped": dict(dropped),
        "quarantined": len(quarantine),
        "token_length": _percentiles(lengths),
        "loss_token_length": _percentiles([_loss_tokens(r) for r in kept]),
        "total_tokens": sum(lengths),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    log.info("rows in %d, out %d (train %d, eval %d), dropped %s", rows_in, len(kept), len(train_rows), len(eval_rows), dict(dropped))
    return stage.finish(out, stats)
