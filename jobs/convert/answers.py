"""What the model now says: greedy answers to a few eval prompts from the base and from the exported champion,
both through transformers (the way vLLM or a user loads them), side by side in `answers.json` and the run
report. A perplexity says how much better; this says what changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jobs.common import storage
from jobs.contract import artifacts, splits
from jobs.contract import rows as rows_lib


def eval_prompts(data: str, workdir: Path, count: int) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for name in splits.files(storage.list_files(data), artifacts.EVAL, data):  # the first shards suffice
        if len(rows) == count:
            break
        path = storage.stage_in(storage.join(data, name), workdir / "answers-data")
        for line in path.read_text(encoding="utf-8").splitlines():
            if len(rows) == count:
                break
            if not line.strip():
                continue
            rows.append(rows_lib.prompt_and_reference(json.loads(line)))
    return rows


def generate(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def write(rows: list[dict[str, str]], base_dir: Path | None, export_dir: Path, out: Path, max_new_tokens: int = 48) -> list[dict[str, Any]]:
    prompts = [r["prompt"] for r in rows]
    before = generate(base_dir, prompts, max_new_tokens) if base_dir else [None] * len(rows)
    after = generate(export_dir, prompts, max_new_tokens)
    answers = [{**row, "before": b, "after": a} for row, b, a in zip(rows, before, after, strict=True)]
    out.write_text(json.dumps(answers, indent=2, ensure_ascii=False))
    return answers
