"""Peak memory of preprocessing against input size: the stage streams its input through disk buckets, so its
peak RSS should not grow with the number of rows.

    .venv/bin/python bench/preprocess_memory.py --rows 1000000 5000000

Generates a JSONL of N instruction/response rows (about 480 bytes each, 1% exact duplicates) per size, runs the
real stage on each in a fresh process (the demo model's tokenizer, --max-tokens 512), and prints wall time,
rows/s and the process's peak RSS, then the ratio of the largest size's peak RSS to the smallest's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs.contract import artifacts, stages

WORDS = ("model data token layer weight value query train batch step learn rate loss eval split shard bucket "
         "stream memory python function return string number list index file path read write cache graph node").split()


def generate(path: Path, rows: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    with path.open("w") as handle:
        previous = ""
        for i in range(rows):
            if previous and rng.random() < 0.01:
                handle.write(previous)  # an exact duplicate: dedup has work to do
                continue
            instruction = f"Question {i}: what does " + " ".join(rng.choices(WORDS, k=18)) + " do?"
            response = " ".join(rng.choices(WORDS, k=60)) + "."
            previous = json.dumps({"instruction": instruction, "response": response}) + "\n"
            handle.write(previous)
    return path.stat().st_size


def run_stage(source: Path, output: Path) -> tuple[float, int, dict]:
    command = [sys.executable, "-m", stages.get("preprocess").module, "--input", str(source), "--output", str(output),
               "--max-tokens", "512", "--on-bad-record", "skip"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": "jax"})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    manifest = json.loads((output / artifacts.MANIFEST).read_text())  # the stage records its own peak RSS
    return seconds, manifest["peak_rss_bytes"], json.loads((output / artifacts.STATS).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-preprocess-memory-"))
    results = []
    for rows in sorted(args.rows):
        source = work / f"rows-{rows}.jsonl"
        size = generate(source, rows)
        seconds, peak, stats = run_stage(source, work / f"out-{rows}")
        results.append((rows, size, seconds, peak))
        print(f"{rows:>9} rows, {size / 2**30:.2f} GiB JSONL: {seconds:7.1f} s = {rows / seconds:8.0f} rows/s, "
              f"peak RSS {peak / 2**30:.2f} GiB; rows out {stats['rows_out']}, duplicates {stats['dropped']['duplicate']}",
              flush=True)
        source.unlink()
    if len(results) > 1:
        small, large = results[0], results[-1]
        print(f"input x{large[0] / small[0]:.1f} -> peak RSS x{large[3] / small[3]:.2f}")


if __name__ == "__main__":
    main()
