"""The persistent XLA compilation cache: one stage run cold (an empty cache) against the same run warm (the cache
a cold run just filled), same inputs, interleaved over --rounds rounds so a slow moment of the machine lands on
both. Each run is the stage's own CLI in its own process, with its output in a fresh directory (no skip), and
reads its wall time split and cache hits/misses from the manifest it wrote.

Run after the main command (it needs a preprocess and a fine-tune output; the defaults point at the demo's):
  .venv/bin/python bench/compile_cache.py [--stage benchmark|finetune] [--rounds 2]
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
sys.path.insert(0, str(ROOT))

from jobs.contract import artifacts, documents, stages  # noqa: E402
from jobs.contract.env import COMPILATION_CACHE_ENV  # noqa: E402
from jobs.contract.layout import RunLayout  # noqa: E402


def demo(stage: str) -> Path:
    """Where the main command's demo run left a stage's output (the emulator keeps gs:// objects as files)."""
    return ROOT / "runs/local/gcs" / RunLayout.of("local-gemma-bucket", "demo").stage(stage).removeprefix("gs://")


def command(stage: str, args: argparse.Namespace, output: Path) -> list[str]:
    if stage == "benchmark":
        return [sys.executable, "-m", stages.get("benchmark").module, "--data", str(args.data), "--finetune", str(args.finetune),
                "--output", str(output), "--max-examples", str(args.examples), "--max-new-tokens", str(args.new_tokens)]
    return [sys.executable, "-m", stages.get("finetune").module, "--data", str(args.data), "--output", str(output),
            "--max-steps", str(args.steps), "--checkpoint-every", "0"]


def run(stage: str, args: argparse.Namespace, cache: Path, work: Path) -> dict:
    output = Path(tempfile.mkdtemp(prefix="out-", dir=work))
    env = {**os.environ, COMPILATION_CACHE_ENV: str(cache), "STAGE_WORKDIR": str(work), "PYTHONPATH": str(ROOT)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    result = subprocess.run(command(stage, args, output), cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{stage} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    manifest = json.loads((output / artifacts.MANIFEST).read_text())
    split = manifest["metrics"][documents.TIME_SPLIT]
    return {"wall": sum(split.values()), "compilation": split["compilation"], "compute": split["compute"],
            **manifest["metrics"].get(documents.COMPILE_CACHE, {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("benchmark", "finetune"), default="benchmark")
    parser.add_argument("--data", type=Path, default=demo("preprocess"))
    parser.add_argument("--finetune", type=Path, default=demo("finetune"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--examples", type=int, default=32, help="benchmark: eval rows scored and answered")
    parser.add_argument("--new-tokens", type=int, default=16, help="benchmark: answer length")
    parser.add_argument("--steps", type=int, default=4, help="finetune: steps")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    results: dict[str, list[dict]] = {"cold": [], "warm": []}
    for r in range(args.rounds):
        cache = work / f"cache-{r}"
        for kind in ("cold", "warm") if r % 2 == 0 else ("warm", "cold"):
            if kind == "warm" and not cache.exists():  # a warm run needs its round's cold run's cache: fill it first
                run(args.stage, args, cache, work)
            target = cache if kind == "warm" else work / f"empty-{r}"
            results[kind].append(run(args.stage, args, target, work))
            print(f"round {r + 1} {kind}: {json.dumps(results[kind][-1])}", flush=True)
    for kind, runs in results.items():
        walls = [x["wall"] for x in runs]
        print(f"{args.stage} {kind}: wall {statistics.median(walls):.1f} s (range {min(walls):.1f}-{max(walls):.1f}), "
              f"compilation {statistics.median(x['compilation'] for x in runs):.1f} s, "
              f"hits/misses {runs[-1].get('hits')}/{runs[-1].get('misses')}")
    ratios = sorted(c["wall"] / w["wall"] for c, w in zip(results["cold"], results["warm"], strict=True))
    print(f"cold / warm wall time: median {statistics.median(ratios):.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x")


if __name__ == "__main__":
    main()
