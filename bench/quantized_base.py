"""LoRA on a quantized base, real Gemma 3 270M on CPU, the demo data: none / int8 / int4 side by side.

Each contender is the fine-tune stage itself (`python -m jobs.finetuning --base-quantization MODE`), a fresh
process, the same seed, data and --steps steps (batch 4, sequence 128, LoRA rank 4 on query/value). Reported per
contender: peak RSS of the stage process; the median wall time of its steady steps (the first compiles) and their
interquartile range; the eval perplexity of what it trained, twice: in the fine-tune (the quantized base with
the adapter, the whole eval split) and by the benchmark stage (the adapter on the full-precision base: what
benchmark and convert ship; for `none`, the merged model). With --rounds > 1 the contenders run in an order that
rotates from round to round; step times are the median over rounds of each round's median.
Run: .venv/bin/python bench/quantized_base.py [--steps 20] [--rounds 1]
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

from jobs.contract import artifacts, stages

ROOT = Path(__file__).resolve().parent.parent
MODES = ("none", "int8", "int4")


def stage(module: str, *args: str, work: Path) -> None:
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT), "STAGE_WORKDIR": str(work)}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{module} {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-quantized-"))
    (work / "w").mkdir()
    stage(stages.get("preprocess").module, "--output", str(work / "pre"), "--max-tokens", "128", work=work / "w")
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        order = MODES[round_ % len(MODES):] + MODES[: round_ % len(MODES)]
        for mode in order:
            out = work / f"ft-{mode}-{round_}"
            stage(stages.get("finetune").module, "--data", str(work / "pre"), "--output", str(out), "--max-steps", str(args.steps),
                  "--batch-size", "4", "--sequence-length", "128", "--checkpoint-every", "0", "--eval-batches", "0",
                  "--base-quantization", mode, work=work / "w")
            metrics = json.loads((out / artifacts.TRAIN_METRICS).read_text())
            steps = [h["step_s"] for h in metrics["history"][1:]]
            q1, _, q3 = statistics.quantiles(steps, n=4)
            runs[mode].append({"rss": metrics["peak_rss_bytes"], "step": metrics["step_s_median"], "iqr": (q1, q3),
                               "eval_ppl_quantized": float(2.718281828459045 ** metrics["eval_loss_after"]), "out": out})
            print(f"round {round_ + 1} {mode}: peak RSS {metrics['peak_rss_bytes'] / 2**30:.2f} GiB, step "
                  f"{metrics['step_s_median']:.3f} s (IQR {q1:.3f}-{q3:.3f}), eval loss {metrics['eval_loss_after']:.4f}",
                  flush=True)
    table = {}
    for mode in MODES:
        bench = work / f"bench-{mode}"
        stage(stages.get("benchmark").module, "--data", str(work / "pre"), "--finetune", str(runs[mode][0]["out"]), "--output", str(bench),
              "--bootstrap", "0", work=work / "w")
        report = json.loads((bench / artifacts.BENCHMARK_REPORT).read_text())
        table[mode] = {"base": report["models"]["base"]["splits"]["eval"]["perplexity"],
                       "tuned": report["models"]["tuned"]["splits"]["eval"]["perplexity"]}
    print(f"\n{args.steps} steps, batch 4, sequence 128, {args.rounds} round(s); CPU, real Gemma 3 270M\n")
    print("| base | peak RSS (GiB) | step s (median, IQR) | step vs none | eval ppl, quantized base + adapter "
          "| eval ppl, full-precision base + adapter (benchmark) |")
    print("|---|---|---|---|---|---|")
    base_step = statistics.median(r["step"] for r in runs["none"])
    for mode in MODES:
        rs = runs[mode]
        step = statistics.median(r["step"] for r in rs)
        iqr = rs[0]["iqr"]
        print(f"| {mode} | {max(r['rss'] for r in rs) / 2**30:.2f} | {step:.3f} ({iqr[0]:.3f}-{iqr[1]:.3f}) | "
              f"{step / base_step:.2f}x | {rs[0]['eval_ppl_quantized']:.3f} | {table[mode]['tuned']:.3f} |")
    print(f"\nbase model (no adapter) eval perplexity: {table['none']['base']:.3f}")


if __name__ == "__main__":
    main()
