"""Fine-tune throughput on CPU, real Gemma 3 270M, LoRA rank 4 on query/value, the demo data, all in this run:

- keras-hub + JAX, every batch padded to --sequence-length (the baseline before length bucketing);
- keras-hub + JAX, length-bucketed batches (what the stage does by default);
- Hugging Face transformers + PEFT (PyTorch), the same batches as the bucketed run, same loss (response
  tokens only), AdamW at the same learning rate.

Every padded width is compiled (JAX) or run once (PyTorch) before timing, so figures are steady state.
Reported: useful (non-padding) tokens/s, padding efficiency (useful / computed tokens), the eval pass time
and eval loss of both keras modes, and the ratios.
Run: .venv/bin/python bench/finetune_throughput.py [--steps 6] [--batch-size 4] [--sequence-length 128]
(needs the bench extra: `pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def keras_run(model, initial, train, evaluation, args, by_length: bool) -> dict:
    import keras

    from jobs.finetuning import data as data_lib
    from jobs.finetuning.config import FinetuneConfig
    from jobs.finetuning.distribution import setup
    from jobs.finetuning.train import Trainer, make_optimizer

    for variable, value in zip(model.trainable_variables, initial):
        variable.assign(value)
    keras.utils.set_random_seed(0)
    config = FinetuneConfig(data="-", output="-", batch_size=args.batch_size, sequence_length=args.sequence_length)
    trainer = Trainer(model, make_optimizer(config, 1000)[0], setup("none", 1, args.batch_size))
    plan = data_lib.BatchPlan(train.lengths, args.batch_size, seed=0, by_length=by_length)
    batches = [data_lib.make_batch(train, plan.indices(s), by_length) for s in range(args.steps)]
    compiled = set()
    for batch in batches:
        if (width := batch[0]["token_ids"].shape[1]) not in compiled:
            compiled.add(width)
            trainer.train_step(batch)
    started = time.perf_counter()
    for batch in batches:
        trainer.train_step(batch)
    seconds = time.perf_counter() - started
    first_of_width = {}
    for i, n in enumerate(evaluation.lengths):
        first_of_width.setdefault(data_lib.bucket_width(int(n), args.sequence_length) if by_length else 0, i)
    for i in first_of_width.values():
        one = data_lib.TokenizedSplit(evaluation.tokens[[i]], evaluation.lengths[[i]], evaluation.loss_mask[[i]], 0)
        trainer.evaluate(one, args.batch_size, bucket=by_length)
    started = time.perf_counter()
    result = trainer.evaluate(evaluation, args.batch_size, bucket=by_length)
    eval_s = time.perf_counter() - started
    useful = sum(int(b[0]["padding_mask"].sum()) for b in batches)
    computed = sum(b[0]["token_ids"].size for b in batches)
    return {"seconds": seconds, "useful": useful, "computed": computed, "batches": batches,
            "eval_s": eval_s, "eval_loss": result["loss"], "widths": sorted(compiled)}


def peft_run(model_dir: Path, batches: list, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01)

    def step(batch) -> None:
        x, y, w = batch
        logits = model(input_ids=torch.from_numpy(x["token_ids"]).long(),
                       attention_mask=torch.from_numpy(x["padding_mask"]).long()).logits
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), torch.from_numpy(y).long(), reduction="none")
        weights = torch.from_numpy(w)
        loss = (nll * weights).sum() / weights.sum().clamp(min=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmed = set()
    for batch in batches:
        if (width := batch[0]["token_ids"].shape[1]) not in warmed:
            warmed.add(width)
            step(batch)
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    return {"seconds": time.perf_counter() - started, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=128)
    args = parser.parse_args()

    from jobs.common import models
    from jobs.demo_model.weights import model_dir as demo_model_dir
    from jobs.finetuning import data as data_lib
    from jobs.preprocessing.config import PreprocessConfig
    from jobs.preprocessing.core import run as preprocess

    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    preprocess(PreprocessConfig(output=str(work / "pre"), max_tokens=args.sequence_length), work / "w1")
    model = models.load_causal_lm("demo:gemma3-270m", work / "w2")
    model.backbone.enable_lora(4, target_layer_names=["query", "value"])
    initial = [np.array(v.value) for v in model.trainable_variables]  # host copies: training donates device buffers
    tokenizer = model.preprocessor.tokenizer
    train = data_lib.tokenize(data_lib.read_rows(work / "pre" / "train.jsonl", "--data"), tokenizer, args.sequence_length)
    evaluation = data_lib.tokenize(data_lib.read_rows(work / "pre" / "eval.jsonl", "--data"), tokenizer, args.sequence_length)
    print(f"train rows {len(train.lengths)} (mean {train.lengths.mean():.1f} tokens), eval rows {len(evaluation.lengths)}, "
          f"sequence length {args.sequence_length}, batch {args.batch_size}, {args.steps} timed steps per run")

    fixed = keras_run(model, initial, train, evaluation, args, by_length=False)
    bucketed = keras_run(model, initial, train, evaluation, args, by_length=True)
    peft = peft_run(demo_model_dir(), bucketed["batches"], args)

    def line(name: str, seconds: float, useful: int, computed: int, extra: str = "") -> float:
        rate = useful / seconds
        print(f"{name:28s} {seconds:7.1f} s  {rate:8.1f} useful tokens/s  padding efficiency {useful / computed:5.1%}{extra}")
        return rate

    r_fixed = line("keras-hub/JAX, fixed width", fixed["seconds"], fixed["useful"], fixed["computed"],
                   f"  eval pass {fixed['eval_s']:.1f} s, eval loss {fixed['eval_loss']:.5f}")
    r_bucketed = line("keras-hub/JAX, bucketed", bucketed["seconds"], bucketed["useful"], bucketed["computed"],
                      f"  eval pass {bucketed['eval_s']:.1f} s, eval loss {bucketed['eval_loss']:.5f}, widths {bucketed['widths']}")
    r_peft = line(f"transformers+PEFT ({peft['threads']} threads)", peft["seconds"], bucketed["useful"], bucketed["computed"])
    print(f"ratio bucketed/fixed (useful tokens/s): {r_bucketed / r_fixed:.2f}x (goal >= 1.5); "
          f"eval pass {fixed['eval_s'] / bucketed['eval_s']:.2f}x faster, eval loss difference {abs(fixed['eval_loss'] - bucketed['eval_loss']):.2e}")
    print(f"ratio keras-hub bucketed / transformers+PEFT on the same batches: {r_bucketed / r_peft:.2f}x (goal >= 1.0)")


if __name__ == "__main__":
    main()
