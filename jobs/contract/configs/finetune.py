"""Typed, validated configuration of the fine-tuning stage: every option declared once (see jobs.contract.spec)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from jobs.contract import spec
from jobs.contract.demo import DEMO_MODEL_URI
from jobs.contract.errors import BadInputError
from jobs.contract.spec import option

DESCRIPTION = "LoRA fine-tuning of a Gemma / Gemma 3 causal LM with keras-hub on JAX."


@dataclass(frozen=True)
class FinetuneConfig:
    data: str = option(help="output prefix of the preprocessing stage (train.jsonl, eval.jsonl, _manifest.json)",
                       upstream="preprocess")
    output: str = option(help="output prefix (gs:// or local directory)", upstream="self")
    base_model: str = option(DEMO_MODEL_URI, "keras-hub preset name, hf://ORG/NAME, demo:gemma3-270m, or a gs:// or "
                                             "local model directory", param="base_model")
    # The trigger form's defaults are the demo's: 20 steps at a rate high enough to learn the answer format (answers
    # that stop) within them; a longer run over a larger model usually wants the CLI's lower rate.
    lora_rank: int = option(4, "LoRA rank", minimum=1, maximum=512, param="lora_rank", dag_default=8)
    lora_targets: tuple[str, ...] = option(("query", "value"), "layers that get LoRA adapters (keras-hub names: "
                                                                "query, value, key, attention_output, ...)")
    learning_rate: float = option(2e-4, "peak learning rate", exclusive_minimum=0, exclusive_maximum=1,
                                  param="learning_rate", dag_default=1e-3)
    weight_decay: float = option(0.01, "AdamW weight decay (not applied to biases and norm scales)",
                                 minimum=0, exclusive_maximum=1)
    warmup_fraction: float = option(0.1, "fraction of the steps spent in linear warmup before cosine decay",
                                    minimum=0, exclusive_maximum=1)
    max_grad_norm: float = option(1.0, "global gradient-norm clip (0: off)", minimum=0)
    epochs: int = option(1, "passes over the training data (ignored when max steps > 0)", minimum=0, param="epochs")
    max_steps: int = option(0, "optimizer steps (0: derive from epochs)", minimum=0, param="max_steps", dag_default=20)
    batch_size: int = option(4, "global batch size (split over data-parallel devices)", minimum=1, maximum=4096,
                             param="batch_size")
    sequence_length: int = option(128, "tokens per example after padding/truncation (and the benchmark's window)",
                                  minimum=8, maximum=131072, param="sequence_length")
    seed: int = option(0, "seed of the deterministic split and of training", minimum=0, param="seed")
    max_train_examples: int = option(0, "train on at most this many rows of the train split, taken in its seeded "
                                        "order (0: all); the eval split is never cut", minimum=0,
                                     param="max_train_examples")
    base_quantization: Literal["none", "int8", "int4"] = option(
        "none", "quantize the frozen base with Keras before LoRA (QLoRA-style: a bigger model on the same chips); "
                "the adapter is then the product, and benchmark and convert apply it to the full-precision base. "
                "float8 is not offered: Keras cannot train LoRA on it", param="base_quantization")
    mixed_precision: bool = option(False, "compute in bfloat16 with float32 weights", param="mixed_precision")
    distribution: Literal["auto", "none", "data", "model"] = option(
        "auto", "auto (model parallel when --model-parallel > 1, else data parallel when several devices), none, "
                "data, or model (needs model parallel > 1); the DAG sets it from the accelerator profile")
    model_parallel: int = option(1, "devices of one host along the model axis, for a model too big for one device "
                                    "(1: data parallel only; hosts are always data parallel)", minimum=1, maximum=256,
                                 param="model_parallel")
    checkpoint_every: int = option(50, "save a checkpoint every N steps (0: only at the end and on SIGTERM)", minimum=0,
                                   param="checkpoint_every")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep", minimum=1)
    eval_every: int = option(0, "evaluate on the eval split every N steps (0: only before and after training)",
                             minimum=0)
    eval_batches: int = option(8, "cap on eval batches per evaluation (0: the whole split); a quick signal, since the "
                                  "benchmark stage scores the whole split and is the authority", minimum=0)
    log_every: int = option(1, "log a progress line every N steps", minimum=1)
    resume: bool = option(True, "continue from the latest complete checkpoint under the output prefix")
    lm_head: Literal["loss_positions", "all"] = option(
        "loss_positions", "where the LM head runs: loss_positions (only where the loss is: response tokens) or all "
                          "(every position; the reference path, same loss)")
    document_mask: bool = option(True, "raw-text data (packed): attention stays inside each document (a mask from "
                                       "segment ids); false: plain causal attention across the packed stream",
                                 param="document_mask")
    bucket_by_length: bool = option(True, "batch rows of similar length and pad each batch to its length bucket "
                                          "(false: pad all to the sequence length)")

    def __post_init__(self) -> None:
        spec.validate(self)
        if self.max_steps == 0 and self.epochs == 0:
            raise BadInputError("--epochs", self.epochs, "a positive integer when --max-steps is 0")
        if self.model_parallel > 1 and self.distribution not in ("auto", "model"):
            raise BadInputError("--model-parallel", self.model_parallel, f"1 with --distribution {self.distribution} "
                                "(model parallel needs --distribution model or auto)")
        if self.base_quantization == "int4" and self.model_parallel > 1:
            # int4 packs each kernel into a 2-D layout that the families' layout maps (3-D attention kernels) cannot shard.
            raise BadInputError("--model-parallel", self.model_parallel, "1 with --base-quantization int4 (int8 shards "
                                "as the full-precision model does)")
        if not self.lora_targets:
            raise BadInputError("--lora-targets", "", "at least one layer name, e.g. query,value")

    def trajectory(self) -> dict[str, Any]:
        """The fields that change the training trajectory: a checkpoint resumes only when these match."""
        values = asdict(self)
        for key in ("output", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_batches", "log_every", "resume",
                    "lm_head"):  # the head's two paths compute the same loss
            values.pop(key)
        return values
