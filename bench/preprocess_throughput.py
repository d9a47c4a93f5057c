"""Preprocessing throughput vs its ceiling: the whole stage (read JSONL, validate, template, dedup, tokenize,
filter, split, write) on N rows, against the same tokenizer alone on the same texts in one batched call,
measured in this run. Rows are the demo dataset repeated with a row number, so none are duplicates.

Run: .venv/bin/python bench/preprocess_throughput.py [--rows 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from jobs.contract import artifacts

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--base-model", default="demo:gemma3-270m")
    args = parser.parse_args()

    from jobs.common import sources
    from jobs.contract.configs.preprocess import PreprocessConfig
    from jobs.preprocessing.core import run
    from jobs.preprocessing.demo import demo_rows

    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    base = list(demo_rows())
    rows = [{"instruction": f"{r['instruction']} (variant {i})", "response": r["response"]}
            for i, r in zip(range(args.rows), (base[i % len(base)] for i in range(args.rows)))]
    source = work / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = sources.load_tokenizer(args.base_model, work / "w0")  # also warms the model cache

    config = PreprocessConfig(input=str(source), output=str(work / "out"), base_model=args.base_model, max_tokens=1024)
    started = time.perf_counter()
    run(config, work / "w1")
    stage_s = time.perf_counter() - started
    stats = json.loads((work / "out" / artifacts.STATS).read_text())

    from collections import Counter

    from jobs.preprocessing.rows import (
        chat,
        render,  # the same texts the stage tokenizes
    )

    pairs = [chat(config, *render(config, r, Counter())) for r in rows]
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    started = time.perf_counter()
    prompt_ids, response_ids = tokenizer(prompts), tokenizer(responses)
    ceiling_s = time.perf_counter() - started
    tokens = sum(len(ids) for ids in prompt_ids) + sum(len(ids) for ids in response_ids)

    print(f"{args.rows} rows, {tokens} tokens; rows out {stats.get('rows_out')}")
    print(f"stage:     {stage_s:.1f} s = {args.rows / stage_s:.0f} rows/s, {tokens / stage_s:.0f} tokens/s")
    print(f"tokenizer: {ceiling_s:.1f} s = {args.rows / ceiling_s:.0f} rows/s, {tokens / ceiling_s:.0f} tokens/s (ceiling)")
    print(f"ratio stage/ceiling: {ceiling_s / stage_s:.2f} (goal >= 0.50)")


if __name__ == "__main__":
    main()
