"""Perplexity throughput: the benchmark stage's scorer (keras-hub + JAX, length-bucketed batches) vs Hugging Face
transformers (PyTorch) on the same model (real Gemma 3 270M), the same windows and the same target tokens, in
this run. Both must agree on perplexity within 1e-3 relative.

Run: .venv/bin/python bench/perplexity_throughput.py [--mode response|text] [--max-length 128] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import os
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
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.benchmark import core
    from jobs.benchmark.config import BenchmarkConfig
    from jobs.common import lm, models
    from jobs.demo_model.weights import model_dir as demo_model_dir
    from jobs.finetuning import data as data_lib
    from jobs.preprocessing.config import PreprocessConfig
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

    scorer = lm.NllScorer(model)
    core.score(scorer, windows, args.batch_size)  # compiles every bucket width
    started = time.perf_counter()
    keras_nll = core.score(scorer, windows, args.batch_size)
    keras_s = time.perf_counter() - started

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

    hf_score()  # warm-up
    started = time.perf_counter()
    hf_nll = hf_score()
    hf_s = time.perf_counter() - started

    tokens = int(targets.sum())
    ppl_keras = float(np.exp(keras_nll[targets].astype(np.float64).mean()))
    ppl_hf = float(np.exp(hf_nll[targets].astype(np.float64).mean()))
    scored = int(windows.lengths.sum())
    print(f"keras-hub/JAX:  {keras_s:6.1f} s  {scored / keras_s:7.1f} input tokens/s  perplexity {ppl_keras:.4f}")
    print(f"transformers:   {hf_s:6.1f} s  {scored / hf_s:7.1f} input tokens/s  perplexity {ppl_hf:.4f} ({torch.get_num_threads()} threads)")
    print(f"ratio keras/transformers throughput: {hf_s / keras_s:.2f}x (goal >= 1.0); "
          f"perplexity relative difference {abs(ppl_keras - ppl_hf) / ppl_hf:.2e} (goal <= 1e-3); {tokens} target tokens")


if __name__ == "__main__":
    main()
