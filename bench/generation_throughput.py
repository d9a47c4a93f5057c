"""Generation throughput: the benchmark stage's batched greedy generation (keras-hub's KV-cached generate step on
JAX, `jobs.benchmark.generation`) vs Hugging Face transformers' `generate` (PyTorch, KV cache, left padding), on the
same model (real Gemma 3 270M), the same eval prompts and exactly the same number of new tokens per prompt (no
early stop on either side), in this run, interleaved over --rounds rounds: median and range of the tokens/s ratio.
Compilation is excluded (one warm-up call of every shape first); the greedy tokens of both are compared too.

Run: .venv/bin/python bench/generation_throughput.py [--prompts 32] [--batch-size 16] [--new-tokens 32] [--rounds 5]
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
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from jobs.benchmark import generation
    from jobs.common import models
    from jobs.contract.configs.preprocess import PreprocessConfig
    from jobs.demo_model.weights import model_dir as demo_model_dir
    from jobs.finetuning import data as data_lib
    from jobs.preprocessing.core import run as preprocess

    work = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    preprocess(PreprocessConfig(output=str(work / "pre")), work / "w1")
    rows = data_lib.read_rows(work / "pre" / "eval.jsonl", "--data")[: args.prompts]
    model = models.load_causal_lm("demo:gemma3-270m", work / "w2")
    tokenizer = model.preprocessor.tokenizer
    prompts = generation.prompt_ids(tokenizer, [r["prompt"] for r in rows], 127)
    generation.configure(model, 0.0, 1.0, 0)
    hf = AutoModelForCausalLM.from_pretrained(str(demo_model_dir()), dtype=torch.float32).eval()
    pad = int(tokenizer.pad_token_id)
    total = len(prompts) * args.new_tokens
    print(f"{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), {args.new_tokens} new "
          f"tokens each, batch {args.batch_size}, {torch.get_num_threads()} torch threads")

    def keras() -> list[list[int]]:
        return generation.generate(model, prompts, args.new_tokens, (), args.batch_size, pad).tokens

    def transformers() -> list[list[int]]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # the same length-sorted batches
        out: list[list[int]] = [[] for _ in prompts]
        with torch.inference_mode():
            for begin in range(0, len(order), args.batch_size):
                rows_ = order[begin: begin + args.batch_size]
                width = max(len(prompts[i]) for i in rows_)
                ids = torch.full((len(rows_), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows_), width), dtype=torch.long)
                for slot, i in enumerate(rows_):  # left padding, as decoder-only generation needs
                    ids[slot, width - len(prompts[i]):] = torch.tensor(prompts[i])
                    mask[slot, width - len(prompts[i]):] = 1
                gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)
                for slot, i in enumerate(rows_):
                    out[i] = gen[slot, width:].tolist()
        return out

    contenders = {"keras-hub/JAX": keras, "transformers": transformers}
    answers = {name: fn() for name, fn in contenders.items()}  # warm-up: compiles every shape
    same = sum(a == b for a, b in zip(answers["keras-hub/JAX"], answers["transformers"]))
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        rates = sorted(total / t for t in values)
        print(f"{name:14s} tokens/s median {statistics.median(rates):7.1f}  range {rates[0]:.1f}-{rates[-1]:.1f}")
    ratios = sorted(t / k for k, t in zip(times["keras-hub/JAX"], times["transformers"]))
    print(f"ratio keras-hub/JAX over transformers: median {statistics.median(ratios):.2f}x, range "
          f"{ratios[0]:.2f}-{ratios[-1]:.2f}x over {args.rounds} interleaved rounds")
    print(f"greedy answers identical for {same} of {len(prompts)} prompts")


if __name__ == "__main__":
    main()
