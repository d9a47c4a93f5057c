"""Fine-tuning core: load base model, enable LoRA, train with checkpoints, write adapter + merged preset."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jobs import families
from jobs.common import compilation, models, peft_adapter, reference, storage, timing
from jobs.common.manifest import StageRun, digest_json, peak_rss_bytes, stage_in_upstream, upstream_ref
from jobs.common.progress import Progress
from jobs.contract import artifacts
from jobs.contract.configs.convert import DEFAULT_SAMPLES as PROBES
from jobs.contract.configs.finetune import FinetuneConfig
from jobs.contract.errors import BadInputError, PreemptedError
from jobs.finetuning import checkpoint, multihost
from jobs.finetuning import data as data_lib
from jobs.finetuning.distribution import check_model_parallel, setup
from jobs.finetuning.train import Trainer, make_optimizer

log = logging.getLogger(__name__)



class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: saving a checkpoint after the current step")
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _load_splits(config: FinetuneConfig, data_ref: dict[str, str], workdir: Path, tokenizer):
    data_dir = stage_in_upstream(config.data, data_ref, workdir / "data", name="data")
    train_rows = data_lib.read_split(data_dir, artifacts.TRAIN, "--data")
    if config.max_train_examples:
        # The train split is in the preprocessing's seeded hash order, so its head is a random sample; the eval
        # split is untouched, so candidates that differ in data size are still scored on the same rows.
        train_rows = train_rows[: config.max_train_examples]
    eval_rows = data_lib.read_split(data_dir, artifacts.EVAL, "--data", required=False)
    if not train_rows:
        raise BadInputError("--data", config.data, "a preprocessing output with at least one training row")
    train = data_lib.tokenize(train_rows, tokenizer, config.sequence_length)
    evaluation = data_lib.tokenize(eval_rows, tokenizer, config.sequence_length) if eval_rows else None
    if train.truncated:
        log.warning("%d of %d training rows exceed --sequence-length %d and were truncated",
                    train.truncated, len(train_rows), config.sequence_length)
    starved = int((train.loss_mask.sum(axis=1) == 0).sum())
    if starved:
        # Such rows would train on nothing; on real data this means the window is shorter than the prompts.
        raise BadInputError("--sequence-length", config.sequence_length,
                            "a length that leaves room for response tokens after every prompt (at least the "
                            "preprocessing --max-tokens)", f"{starved} of {len(train_rows)} training rows have no "
                            "response token inside the window")
    return train, evaluation


def quantize_base(model, mode: str) -> None:
    """Quantize the frozen base in place with Keras (before LoRA is enabled). The backbone, not the task: the task's
    quantize walks the tokenizer, which has nothing to quantize and is never built."""
    import warnings

    with warnings.catch_warnings():  # one "no quantize method" warning per norm/rotary/dropout layer, by design
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        model.backbone.quantize(mode)
    kernels = [v for v in model.backbone.weights if v.path.endswith("/kernel") and "decoder_block" in v.path]
    log.info("base quantized to %s: %d of %d decoder kernels are int8-stored", mode,
             sum(v.dtype == "int8" for v in kernels), len(kernels))


def _plot_loss(history: list[dict[str, float]], evals: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / response token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_tensorboard(history: list[dict[str, float]], evals: list[dict[str, float]], logdir: Path) -> None:
    import tensorflow as tf  # present in every keras-hub install (tensorflow-text needs it)

    writer = tf.summary.create_file_writer(str(logdir))
    with writer.as_default():
        for h in history:
            tf.summary.scalar("train/loss", h["loss"], step=h["step"])
            tf.summary.scalar("train/learning_rate", h["lr"], step=h["step"])
            tf.summary.scalar("train/tokens_per_s", h["tokens_per_s"], step=h["step"])
        for e in evals:
            tf.summary.scalar("eval/loss", e["loss"], step=e["step"])
    writer.flush()
    writer.close()


def _store_float32_policy(preset: Path) -> None:
    """keras-hub 0.32 cannot reload a preset saved under a mixed policy; its variables are float32 anyway."""

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" and str(node.get("config", {}).get("name", "")).startswith("mixed_"):
                return {**node, "config": {**node["config"], "name": "float32"}}
            return {k: fix(v) for k, v in node.items()}
        return [fix(v) for v in node] if isinstance(node, list) else node

    for name in ("config.json", "task.json"):
        path = preset / name
        if path.exists():
            path.write_text(json.dumps(fix(json.loads(path.read_text())), indent=4))


def _record_reference(config: FinetuneConfig, model: Any, out: Path, workdir: Path) -> None:
    """The tuned model's logits on the probe texts, for convert's checks of the export and the PEFT adapter. They
    must be the float32 model's that the export reproduces: a bfloat16 or quantized training copy is not, so then
    the full-precision base is loaded and the adapter folded into it (one more model load, only in those modes)."""
    with timing.phase("compute"):
        if config.base_quantization == "none" and not config.mixed_precision:
            samples = reference.compute(model, list(PROBES))
        else:
            full = models.load_causal_lm(config.base_model, workdir)
            models.merge_adapter(full, out / artifacts.ADAPTER)
            samples = reference.compute(full, list(PROBES))
            del full
    reference.save(samples, out / artifacts.REFERENCE_LOGITS)


def _join_processes() -> bool:
    multihost.initialize(multihost.detect())
    return multihost.is_primary()


def run(config: FinetuneConfig, workdir: Path) -> dict[str, Any]:
    with timing.phase("imports"):
        import keras

    data_ref = upstream_ref(config.data, "--data")
    model_handle = models.resolve(config.base_model, workdir)
    stage = StageRun("finetune", config.output, asdict(config), [data_ref, models.model_ref(config.base_model, model_handle)])
    if (out := stage.start(workdir, prepare=_join_processes)) is None:
        return stage.manifest
    primary = stage.writer  # the one process that writes; every process computes every step
    xla_cache = compilation.enable_cache(workdir)
    timing.begin("compute")  # what is not loading, staging or publishing (tokenizing, training, evaluating)

    keras.utils.set_random_seed(config.seed)
    family = families.of_source(model_handle)
    family.check_lora_targets(config.lora_targets)  # before any load: the names its adapter export maps
    distribution = setup(config.distribution, config.model_parallel, config.batch_size, family)
    # A per-model dtype policy rather than keras' global one, so nothing leaks into later work in the process.
    model = models.load_causal_lm(config.base_model, workdir, **({"dtype": "mixed_bfloat16"} if config.mixed_precision else {}))
    check_model_parallel(model.backbone, config.model_parallel)
    if config.base_quantization != "none":
        quantize_base(model, config.base_quantization)
    tokenizer = model.preprocessor.tokenizer
    train, evaluation = _load_splits(config, data_ref, workdir, tokenizer)

    try:
        model.backbone.enable_lora(config.lora_rank, target_layer_names=list(config.lora_targets))
    except ValueError as err:
        raise BadInputError("--lora-targets", ",".join(config.lora_targets), "layer names of this model", str(err)) from err
    if not model.backbone.trainable_variables:
        raise BadInputError("--lora-targets", ",".join(config.lora_targets), "names matching layers of this model (none matched)")

    per_epoch = data_lib.steps_per_epoch(len(train.lengths), config.batch_size)
    total_steps = config.max_steps or config.epochs * per_epoch
    optimizer, schedule = make_optimizer(config, total_steps)
    # The loss-position head reads the embedding table directly (an int8 one dequantized); an int4 table, packed,
    # goes through keras' own reverse embedding on the full-logits path.
    lm_head = "all" if config.base_quantization == "int4" else config.lm_head
    trainer = Trainer(model, optimizer, distribution, lm_head, config.document_mask)
    trajectory_sha = digest_json(config.trajectory())

    start_step, history, evals = 0, [], []
    resumed = checkpoint.latest(config.output, workdir) if config.resume else None
    if resumed and resumed[0].get("trajectory_sha256") == trajectory_sha:
        meta, arrays = resumed
        trainer.restore(arrays)
        start_step, history, evals = meta["step"], meta["history"], meta["evals"]
        # The checkpoint holds the global (replicated) state and a global data position, so it resumes on any
        # number of processes with the same global batch (tests/reliability/test_multihost.py).
        log.info("RESUMED from checkpoint at step %d/%d (data position %d, saved by %d process(es), resumed by %d)",
                 start_step, total_steps, meta["data_position"], meta.get("processes", 1), multihost.process_count())
    elif resumed:
        log.warning("ignoring checkpoints under %s: they were made with a different config", config.output)

    eval_before = None
    if evaluation is not None and start_step == 0:
        eval_before = trainer.evaluate(evaluation, config.batch_size, config.eval_batches, config.bucket_by_length)
        evals.append({"step": 0, **eval_before})
        log.info("eval before training: loss=%.4f perplexity=%.3f (%d scored tokens%s)", eval_before["loss"],
                 eval_before["perplexity"], eval_before["tokens"], ", a quick signal: the benchmark scores them all"
                 if config.eval_batches else "")
    elif evals:
        eval_before = {k: v for k, v in evals[0].items() if k != "step"}

    def save_checkpoint(step: int) -> None:
        meta = {"trajectory_sha256": trajectory_sha, "data_position": step * config.batch_size,
                "history": history, "evals": evals, "processes": multihost.process_count()}
        with timing.phase("publish"):
            trainable, opt_vars = multihost.to_host(trainer.trainable), multihost.to_host(trainer.opt_vars)
            if primary:
                checkpoint.save(out, config.output, step, trainable, opt_vars, meta, config.keep_checkpoints)
        multihost.barrier(f"checkpoint-{step}")  # no process moves on (or exits) before the checkpoint is complete

    plan = data_lib.BatchPlan(train.lengths, config.batch_size, config.seed, config.bucket_by_length)
    progress = Progress(config.output, "finetune", total_steps, publish=primary)
    preemption = _Preemption()
    attempt_started = started = time.time()
    tokens_done, last_saved = 0, start_step
    try:
        for step in range(start_step, total_steps):
            batch = data_lib.make_batch(train, plan.indices(step), config.bucket_by_length, config.document_mask)
            step_started = time.perf_counter()
            loss = trainer.train_step(batch)  # returns a host float: the step has finished
            step_s = time.perf_counter() - step_started
            if step == start_step:  # throughput excludes the first step of an attempt: it compiles
                started, tokens_done = time.time(), 0
            else:
                tokens_done += int(batch[0]["padding_mask"].sum())
            elapsed = time.time() - started
            record = {"step": step + 1, "loss": loss, "lr": float(schedule(step)),
                      "tokens_per_s": tokens_done / elapsed if tokens_done else 0.0, "step_s": round(step_s, 4)}
            history.append(record)
            if (step + 1) % config.log_every == 0 or step + 1 == total_steps:
                progress.update(step + 1, step + 1 - start_step, loss=loss, lr=record["lr"], tokens_per_s=round(record["tokens_per_s"], 1))
            if evaluation is not None and config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total_steps:
                result = trainer.evaluate(evaluation, config.batch_size, config.eval_batches, config.bucket_by_length)
                evals.append({"step": step + 1, **result})
                log.info("eval at step %d: loss=%.4f", step + 1, result["loss"])
            if multihost.any_process(preemption.requested):  # every process stops at the same step
                save_checkpoint(step + 1)
                raise PreemptedError(f"preempted at step {step + 1}/{total_steps}; checkpoint saved, the next attempt resumes")
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < total_steps:
                save_checkpoint(step + 1)
                last_saved = step + 1
    finally:
        preemption.restore()
    if last_saved < total_steps:
        save_checkpoint(total_steps)
    steady_time = time.time() - started
    train_time = time.time() - attempt_started

    eval_after = None
    if evaluation is not None:
        eval_after = trainer.evaluate(evaluation, config.batch_size, config.eval_batches, config.bucket_by_length)
        evals.append({"step": total_steps, **eval_after})
        log.info("eval after training: loss=%.4f perplexity=%.3f", eval_after["loss"], eval_after["perplexity"])

    trainer.sync_to_model()
    multihost.localize(model.variables)  # model parallel across hosts: process 0 needs every shard to save
    log.info("final LoRA weights: sha256 %s (process %d of %d)", trainer.trainable_digest(), multihost.process_index(),
             multihost.process_count())
    if not primary:
        multihost.barrier("finetune-published")  # the primary writes and publishes; the others wait for it
        return {"process": multihost.process_index(), "published_by": 0}
    timing.begin("publish")  # writing the products is publishing them, locally first
    model.backbone.save_lora_weights(str(out / artifacts.ADAPTER))
    peft_adapter.write(model.backbone, out / artifacts.PEFT_ADAPTER, config.base_model)
    _record_reference(config, model, out, workdir)
    if config.base_quantization == "none":
        # Saving a LoRA-enabled model stores merged kernels (kernel + A @ B); the preset reloads as a plain model.
        model.save_to_preset(str(out / artifacts.MERGED_MODEL))
        if config.mixed_precision:
            _store_float32_policy(out / artifacts.MERGED_MODEL)
    else:
        log.info("base quantized to %s: the adapter is the product (a merged, re-quantized model would be lossy); "
                 "benchmark and convert apply it to the full-precision base", config.base_quantization)
    _plot_loss(history, evals, out / artifacts.LOSS_CURVE)
    _write_tensorboard(history, evals, out / artifacts.TENSORBOARD)
    steps_run = total_steps - start_step
    metrics = {
        "steps": total_steps,
        "steps_this_attempt": steps_run,
        "resumed_from_step": start_step,
        "train_examples": int(len(train.lengths)),
        "eval_examples": int(len(evaluation.lengths)) if evaluation is not None else 0,
        "final_train_loss": history[-1]["loss"] if history else None,
        "eval_loss_before": eval_before["loss"] if eval_before else None,
        "eval_loss_after": eval_after["loss"] if eval_after else None,
        "tokens_per_s": tokens_done / steady_time if tokens_done else None,
        "train_time_s": round(train_time, 2),
        # Steady steps of this attempt (the first compiles); the median of their wall times.
        "step_s_median": (statistics.median(h["step_s"] for h in history[start_step + 1:]) if steps_run > 1 else None),
        "peak_rss_bytes": peak_rss_bytes(),
        "trainable_parameters": int(sum(v.size for v in trainer.trainable)),
        "model_class": type(model).__name__,
        "base_quantization": config.base_quantization,
        "product": "merged model and adapter" if config.base_quantization == "none" else "adapter",
    }
    (out / artifacts.TRAIN_METRICS).write_text(json.dumps({**metrics, "history": history, "evals": evals}, indent=2))
    if storage.is_gcs(config.output):
        shutil.rmtree(out / checkpoint.CHECKPOINTS, ignore_errors=True)  # uploaded as they were made
    progress.update(total_steps, steps_run, force=True, loss=metrics["final_train_loss"] or 0.0, done=True)
    xla_cache.save()
    manifest = stage.finish(out, {**metrics, "processes": multihost.process_count()})
    multihost.barrier("finetune-published")
    return manifest
