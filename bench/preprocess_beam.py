"""The Beam engine on its in-process runner against the single-machine stage, on the same N rows (the demo dataset
repeated with a row number, so none are duplicates; demo:gemma3-270m's tokenizer): rows/s of each and their
ratio, runs interleaved (A B, B A, ...), median and spread over the repeats; the engines' stats must agree. Each engine runs as its CLI would, in a fresh
process (Beam in `.venv-beam`), so interpreter start and imports are counted for both. No claim is made for
Dataflow's own speed: the in-process runner is one process on this machine.

Run: .venv/bin/python bench/preprocess_beam.py [--rows 200000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs.contract import artifacts, stages

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ENGINES = {"single": [sys.executable, "-m", stages.get("preprocess").module],
           "beam": [str(ROOT / ".venv-beam" / "bin" / "python"), "-m", stages.BEAM_MODULE]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from jobs.preprocessing.demo import demo_rows

    work = Path(tempfile.mkdtemp(prefix="bench-beam-"))
    base = list(demo_rows())
    source = work / "rows.jsonl"
    with source.open("w") as handle:
        for i in range(args.rows):
            row = base[i % len(base)]
            handle.write(json.dumps({"instruction": f"{row['instruction']} (variant {i})", "response": row["response"]}) + "\n")
    times: dict[str, list[float]] = {name: [] for name in ENGINES}
    outputs = {}
    for repeat in range(args.repeats + 1):  # the first round warms the model cache and the page cache; not counted
        for name, command in list(ENGINES.items())[:: 1 if repeat % 2 else -1]:  # A B, then B A
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            done = subprocess.run([*command, "--input", str(source), "--output", str(out), "--max-tokens", "1024"],
                                  cwd=ROOT, capture_output=True, text=True)
            elapsed = time.perf_counter() - started
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
            if repeat:
                times[name].append(elapsed)
                print(f"round {repeat} {name}: {elapsed:.1f} s", flush=True)
            outputs[name] = json.loads((out / artifacts.STATS).read_text())
    assert outputs["single"] == outputs["beam"], "the engines disagree on stats"
    rate = {name: args.rows / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:6s}: median {statistics.median(t):.1f} s (min {min(t):.1f}, max {max(t):.1f}) = {rate[name]:,.0f} rows/s")
    ratios = [s / b for s, b in zip(times["single"], times["beam"])]
    print(f"{args.rows} rows, rows out {outputs['beam']['rows_out']}; beam/single rows/s ratio: median "
          f"{statistics.median(ratios):.2f} (per round {', '.join(f'{r:.2f}' for r in ratios)})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
