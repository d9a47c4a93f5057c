"""Typed, validated configuration of the fine-tuning stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from jobs.common.errors import BadInputError
from jobs.convert.gguf_import import DEMO_MODEL_URI

DISTRIBUTIONS = ("auto", "none", "data", "model")

HELP = {
    "data": "output prefix of the preprocessing stage (train.jsonl, eval.jsonl, _manifest.json)",
    "output": "output prefix (gs:// or local directory)",
    "base_model": "keras-hub preset name, hf://ORG/NAME, demo:gemma3-270m, or a gs:// or local model directory",
    "lora_rank": "LoRA rank",
    "lora_targets": "layers that get LoRA adapters (keras-hub names: query, value, key, attention_output, ...)",
    "learning_rate": "peak learning rate",
    "weight_decay": "AdamW weight decay (not applied to biases and norm scales)",
    "warmup_fraction": "fraction of the steps spent in linear warmup before cosine decay",
    "max_grad_norm": "global gradient-norm clip (0: off)",
    "epochs": "passes over the training data (ignored when --max-steps > 0)",
    "max_steps": "optimizer steps (0: derive from --epochs)",
    "batch_size": "global batch size (split over data-parallel devices)",
    "sequence_length": "tokens per example after padding/truncation",
    "seed": "seed for initialisation and data order",
    "mixed_precision": "compute in bfloat16 with float32 weights",
    "distribution": "auto (data parallel when several devices), none, data, or model (needs --model-parallel)",
    "model_parallel": "devices along the model axis for --distribution model",
    "checkpoint_every": "save a checkpoint every N steps (0: only at the end and on SIGTERM)",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "eval_every": "evaluate on the eval split every N steps (0: only before and after training)",
    "eval_batches": "cap on eval batches per evaluation (0: the whole split)",
    "log_every": "log a progress line every N steps",
    "resume": "continue from the latest complete checkpoint under the output prefix",
    "bucket_by_length": "batch rows of similar length and pad each batch to its length bucket (false: pad all to --sequence-length)",
}


@dataclass(frozen=True)
class FinetuneConfig:
    data: str
    output: str
    base_model: str = DEMO_MODEL_URI
    lora_rank: int = 4
    lora_targets: tuple[str, ...] = ("query", "value")
    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int = 0
    batch_size: int = 4
    sequence_length: int = 256
    seed: int = 0
    mixed_precision: bool = False
    distribution: str = "auto"
    model_parallel: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_batches: int = 0
    log_every: int = 1
    resume: bool = True
    bucket_by_length: bool = True

    def __post_init__(self) -> None:
        positive = {"--lora-rank": self.lora_rank, "--batch-size": self.batch_size, "--log-every": self.log_every,
                    "--model-parallel": self.model_parallel, "--keep-checkpoints": self.keep_checkpoints}
        for flag, value in positive.items():
            if value < 1:
                raise BadInputError(flag, value, "a positive integer")
        non_negative = {"--max-steps": self.max_steps, "--checkpoint-every": self.checkpoint_every,
                        "--eval-every": self.eval_every, "--eval-batches": self.eval_batches, "--epochs": self.epochs}
        for flag, value in non_negative.items():
            if value < 0:
                raise BadInputError(flag, value, "an integer >= 0")
        if self.max_steps == 0 and self.epochs == 0:
            raise BadInputError("--epochs", self.epochs, "a positive integer when --max-steps is 0")
        if not 0 < self.learning_rate < 1:
            raise BadInputError("--learning-rate", self.learning_rate, "a number in (0, 1)")
        if not 0 <= self.weight_decay < 1:
            raise BadInputError("--weight-decay", self.weight_decay, "a number in [0, 1)")
        if not 0 <= self.warmup_fraction < 1:
            raise BadInputError("--warmup-fraction", self.warmup_fraction, "a number in [0, 1)")
        if self.max_grad_norm < 0:
            raise BadInputError("--max-grad-norm", self.max_grad_norm, "a number >= 0 (0 disables clipping)")
        if not 8 <= self.sequence_length <= 131072:
            raise BadInputError("--sequence-length", self.sequence_length, "an integer in [8, 131072]")
        if self.distribution not in DISTRIBUTIONS:
            raise BadInputError("--distribution", self.distribution, f"one of {', '.join(DISTRIBUTIONS)}")
        if self.model_parallel > 1 and self.distribution != "model":
            raise BadInputError("--model-parallel", self.model_parallel, "1 unless --distribution model")
        if not self.lora_targets:
            raise BadInputError("--lora-targets", "", "at least one layer name, e.g. query,value")

    def trajectory(self) -> dict[str, Any]:
        """The fields that change the training trajectory: a checkpoint resumes only when these match."""
        values = asdict(self)
        for key in ("output", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_batches", "log_every", "resume"):
            values.pop(key)
        return values
