"""Model load time: keras-hub's own `from_preset` against the stages' `models.load_causal_lm` (variables start as
host zeros while the checkpoint fills them; the vocabulary untracked), each in a fresh process (imports excluded:
the load alone is timed), interleaved over --rounds rounds. Default model: the demo's Gemma 3 270M.

Run: .venv/bin/python bench/model_load.py [--model demo:gemma3-270m] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """
import json, sys, time
from pathlib import Path
import keras_hub
from jobs.common import models
handle = models.resolve(sys.argv[2], Path(sys.argv[3]))
started = time.perf_counter()
if sys.argv[1] == "keras-hub":
    keras_hub.models.CausalLM.from_preset(handle)
else:
    models.load_causal_lm(sys.argv[2], Path(sys.argv[3]))
print(json.dumps(time.perf_counter() - started))
"""


def load(kind: str, model: str) -> float:
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as work:
        result = subprocess.run([sys.executable, "-c", PROGRAM, kind, model, work], cwd=ROOT, env=env,
                                capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return float(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:gemma3-270m")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    kinds = ("keras-hub", "stages")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            times[kind].append(load(kind, args.model))
            print(f"round {r + 1} {kind}: {times[kind][-1]:.1f} s", flush=True)
    for kind in kinds:
        print(f"{kind:10s} load: median {statistics.median(times[kind]):.1f} s (range {min(times[kind]):.1f}-{max(times[kind]):.1f})")
    ratios = sorted(a / b for a, b in zip(times["keras-hub"], times["stages"], strict=True))
    print(f"keras-hub / stages: median {statistics.median(ratios):.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x")


if __name__ == "__main__":
    main()
