"""Perplexity throughput: the benchmark stage's scorer (keras-hub + JAX, length-bucketed batches, the LM head at
the scored positions only) vs the same scorer with the head on every position and vs Hugging Face transformers
(PyTorch), on the same model (real Gemma 3 270M), the same windows and the same target tokens, in this run,
interleaved over --rounds rounds (median and range of each ratio). All must agree on perplexity within 1e-3.

Run: .venv/bin/python bench/perplexity_throughput.py [--mode response|text] [--max-length 128] [--batch-size 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["response", "text"], default="response")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.benchmark import core
    from jobs.common import lm, models
    from jobs.contract.configs.benchmark import BenchmarkConfig
    from jobs.contract.configs.preprocess import PreprocessConfig
    from jobs.demo_model.weights import model_dir as demo_model_dir
    from jobs.finetuning import data as data_lib
    from jobs.preprocessing.core import run as preprocess

    work = Path(tempfile.mkdtemp(prefix="bench-ppl-"))
    preprocess(PreprocessConfig(output=str(work / "pre"), max_tokens=args.max_length), work / "w1")
    rows = data_lib.read_rows(work / "pre" / "eval.jsonl", "--data")
    model = models.load_causal_lm("demo:gemma3-270m", work / "w2")
    config = BenchmarkConfig(data="-", output="-", mode=args.mode, max_length=args.max_length, batch_size=args.batch_size)
    windows, _ = core.eval_windows(config, rows, model.preprocessor.tokenizer)
    targets = windows.weights > 0
    print(f"{args.mode} mode: {len(windows.x)} windows, {int(targets.sum())} target tokens, "
          f"{int(windows.lengths.sum())} input tokens, max length {args.max_length}, batch {args.batch_size}")

    head, full = lm.NllScorer(model), lm.NllScorer(model, loss_positions=False)
    hf = AutoModelForCausalLM.from_pretrained(str(demo_model_dir()), dtype=torch.float32).eval()

    def hf_score() -> np.ndarray:
        nll = np.zeros(windows.weights.shape, np.float32)
        limit = windows.x.shape[1]
        with torch.inference_mode():  # the same batches and widths as the stage
            for rows_, valid in lm.batches(len(windows.x), args.batch_size, windows.lengths):
                width = lm.bucket_width(int(windows.lengths[rows_].max()), limit)
                mask = (np.arange(width)[None, :] < windows.lengths[rows_, None]).astype(np.int64)
                logits = hf(input_ids=torch.from_numpy(windows.x[rows_, :width]).long(), attention_mask=torch.from_numpy(mask)).logits
                out = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), torch.from_numpy(windows.y[rows_, :width]).long(),
                                                        reduction="none").numpy()
                nll[rows_[valid], :width] = out[valid]
        return nll

    contenders = {"keras-hub/JAX, head at scored positions": lambda: core.score(head, windows, args.batch_size),
                  "keras-hub/JAX, head on every position": lambda: core.score(full, windows, args.batch_size),
                  f"transformers ({torch.get_num_threads()} threads)": hf_score}
    nll = {name: fn() for name, fn in contenders.items()}  # warm-up: compiles every bucket width and capacity
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            nll[name] = contenders[name]()
            seconds[name].append(time.perf_counter() - started)

    scored = int(windows.lengths.sum())
    ppl = {name: float(np.exp(values[targets].astype(np.float64).mean())) for name, values in nll.items()}
    for name in names:
        print(f"{name:42s} {scored / statistics.median(seconds[name]):7.1f} input tokens/s (median of {args.rounds})  "
              f"perplexity {ppl[name]:.4f}")

    def ratio(a: str, b: str, goal: float) -> None:
        per_round = sorted(y / x for x, y in zip(seconds[a], seconds[b], strict=True))
        verdict = "holds" if per_round[0] >= goal else "does not hold"
        print(f"ratio {a} / {b}: median {statistics.median(per_round):.2f}x, range {per_round[0]:.2f}-{per_round[-1]:.2f}x "
              f"(goal >= {goal}: {verdict} across the range); perplexity relative difference "
              f"{abs(ppl[a] - ppl[b]) / ppl[b]:.2e} (goal <= 1e-3)")

    ratio(names[0], names[2], 1.5)
    ratio(names[0], names[1], 1.0)
    print(f"{int(targets.sum())} target tokens")


if __name__ == "__main__":
    main()
