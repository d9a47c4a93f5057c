"""Fine-tune throughput on CPU, real Gemma 3 270M, LoRA rank 4 on query/value, the demo data, all in this run:

- keras-hub + JAX, length-bucketed batches, the LM head only at loss positions (what the stage does);
- the same with the LM head on every position (the full-logits path, the baseline for the head);
- the same batches padded to --sequence-length instead of bucketed (the baseline for bucketing);
- Hugging Face transformers + PEFT (PyTorch), the bucketed batches, same loss (response tokens only), AdamW.

Then the stage default's utilisation of the CPU: its model FLOPs per step (bench/flops.py, with XLA's own count
beside it) over its median wall time, against a float32 matmul peak measured in the same process.

Every padded width is compiled (JAX) or run once (PyTorch) before timing. Then --rounds rounds: in each, every
contender trains on the same --steps batches, in an order that alternates from round to round, so a slow
moment of the machine lands on all of them. Reported per contender: the median useful (non-padding) tokens/s;
per ratio: the median over rounds and its range (a claim holds only if the range clears the goal); the eval
pass of the head vs the full-logits path; the peak RSS of the process before the PyTorch model is loaded.
Run: .venv/bin/python bench/finetune_throughput.py [--steps 6] [--rounds 5] [--batch-size 4] [--sequence-length 128]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/flops.py


def keras_contender(model, initial, train, args, by_length: bool, lm_head: str):
    """A warmed-up keras-hub trainer and its batches: (step function, batches, widths)."""
    import keras

    from jobs.contract.configs.finetune import FinetuneConfig
    from jobs.finetuning import data as data_lib
    from jobs.finetuning.distribution import setup
    from jobs.finetuning.train import Trainer, make_optimizer

    for variable, value in zip(model.trainable_variables, initial):
        variable.assign(value)
    keras.utils.set_random_seed(0)
    config = FinetuneConfig(data="-", output="-", batch_size=args.batch_size, sequence_length=args.sequence_length)
    trainer = Trainer(model, make_optimizer(config, 1000)[0], setup("none", 1, args.batch_size), lm_head)
    plan = data_lib.BatchPlan(train.lengths, args.batch_size, seed=0, by_length=by_length)
    batches = [data_lib.make_batch(train, plan.indices(s), by_length) for s in range(args.steps)]
    for batch in batches:  # compiles every (width, head capacity) shape the timed steps will meet
        trainer.train_step(batch)
    return trainer, batches


def timed_eval(trainer, evaluation, args, by_length: bool) -> tuple[float, float]:
    trainer.evaluate(evaluation, args.batch_size, bucket=by_length)  # compiles every (width, capacity) it meets
    started = time.perf_counter()
    result = trainer.evaluate(evaluation, args.batch_size, bucket=by_length)
    return time.perf_counter() - started, result["loss"]


def peft_contender(model_dir: Path, batches: list):
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
    return step, torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from jobs.common import models
    from jobs.contract.configs.preprocess import PreprocessConfig
    from jobs.demo_model.weights import model_dir as demo_model_dir
    from jobs.finetuning import data as data_lib
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

    head = keras_contender(model, initial, train, args, True, "loss_positions")
    full = keras_contender(model, initial, train, args, True, "all")
    fixed = keras_contender(model, initial, train, args, False, "loss_positions")
    eval_head, eval_full = timed_eval(head[0], evaluation, args, True), timed_eval(full[0], evaluation, args, True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peft_step, threads = peft_contender(demo_model_dir(), head[1])
    contenders = {
        "keras-hub, bucketed, head at loss positions": (head[0].train_step, head[1]),
        "keras-hub, bucketed, head on every position": (full[0].train_step, full[1]),
        "keras-hub, padded to max, head at loss positions": (fixed[0].train_step, fixed[1]),
        f"transformers+PEFT ({threads} threads), bucketed": (peft_step, head[1]),
    }
    useful = {name: sum(int(b[0]["padding_mask"].sum()) for b in batches) for name, (_, batches) in contenders.items()}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            step, batches = contenders[name]
            started = time.perf_counter()
            for batch in batches:
                step(batch)
            rates[name].append(useful[name] / (time.perf_counter() - started))
    for name in names:
        computed = sum(b[0]["token_ids"].size for b in contenders[name][1])
        print(f"{name:52s} {statistics.median(rates[name]):7.1f} useful tokens/s (median of {args.rounds})  "
              f"padding efficiency {useful[name] / computed:5.1%}")

    def ratio(a: str, b: str, goal: float, what: str) -> None:
        per_round = sorted(x / y for x, y in zip(rates[a], rates[b], strict=True))
        verdict = "holds" if per_round[0] >= goal else "does not hold"
        print(f"ratio {what}: median {statistics.median(per_round):.2f}x, range {per_round[0]:.2f}-{per_round[-1]:.2f}x "
              f"over {len(per_round)} rounds (goal >= {goal}: {verdict} across the range)")

    ratio(names[0], names[1], 1.5, "head at loss positions / every position")
    ratio(names[0], names[3], 1.5, "keras-hub (stage default) / transformers+PEFT")
    ratio(names[0], names[2], 1.5, "bucketed / padded to max")
    print(f"eval pass: head at loss positions {eval_head[0]:.1f} s, every position {eval_full[0]:.1f} s "
          f"({eval_full[0] / eval_head[0]:.2f}x), eval loss difference {abs(eval_head[1] - eval_full[1]):.2e}")
    print(f"peak RSS of the keras-hub training process: {rss:.2f} GiB")
    utilisation(head[0], head[1], statistics.median(useful[names[0]] / r for r in rates[names[0]]), args)


def utilisation(trainer, batches, seconds: float, args) -> None:
    """Model FLOPs of the stage's own steps over their median wall time, against a matmul peak measured now."""
    import flops

    model_total, xla_total = 0.0, 0.0
    for batch in batches:
        size = trainer._size(batch[2])
        x, y, w = trainer._device_batch(batch)
        model_total += flops.model_flops(trainer.model.backbone, args.batch_size, batch[0]["token_ids"].shape[1], size,
                                         4, ("query", "value"))
        compiled = trainer._train_step.lower(trainer.trainable, trainer.non_trainable, trainer.opt_vars, x, y, w, size).compile()
        xla_total += flops.xla_flops(compiled) or float("nan")
    peak = flops.matmul_peak()
    achieved = model_total / seconds
    print(f"FLOPs per step (stage default, mean of {len(batches)}): model {model_total / len(batches) / 1e9:.1f} GFLOP, "
          f"XLA's count {xla_total / len(batches) / 1e9:.1f} GFLOP; achieved {achieved / 1e9:.1f} GFLOP/s; float32 "
          f"matmul peak measured now {peak / 1e9:.1f} GFLOP/s; utilisation {achieved / peak:.1%} (goal >= 40%)")


if __name__ == "__main__":
    main()
