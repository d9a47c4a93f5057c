"""Typed, validated configuration of the benchmark stage."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.common.errors import BadInputError
from jobs.convert.gguf_import import DEMO_MODEL_URI

MODES = ("response", "text")

HELP = {
    "data": "output prefix of the preprocessing stage (its eval.jsonl is scored)",
    "finetune": "output prefix of the fine-tuning stage (its merged model is the tuned model; empty: base only)",
    "output": "output prefix (gs:// or local directory)",
    "base_model": "the base model, as given to the fine-tuning stage",
    "mode": "response: per example, response tokens only; text: running text with sliding windows",
    "max_length": "tokens per window (text mode) or per example (response mode)",
    "stride": "window start step in text mode (0: half of --max-length)",
    "separator": "text joining documents in text mode",
    "ood_text": "optional out-of-domain plain-text file (gs:// or local), scored in text mode to show forgetting",
    "batch_size": "windows per forward pass",
    "max_examples": "score at most this many eval examples (0: all)",
    "bootstrap": "bootstrap resamples for the 95% interval (0: none)",
    "seed": "bootstrap seed",
    "require_improvement": "quality gate: minimum relative perplexity drop of the tuned model, e.g. 0.05 (0: no gate)",
}


@dataclass(frozen=True)
class BenchmarkConfig:
    data: str
    output: str
    finetune: str = ""
    base_model: str = DEMO_MODEL_URI
    mode: str = "response"
    max_length: int = 512
    stride: int = 0
    separator: str = "\n\n"
    ood_text: str = ""
    batch_size: int = 4
    max_examples: int = 0
    bootstrap: int = 1000
    seed: int = 0
    require_improvement: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BadInputError("--mode", self.mode, f"one of {', '.join(MODES)}")
        if not 8 <= self.max_length <= 131072:
            raise BadInputError("--max-length", self.max_length, "an integer in [8, 131072]")
        if self.stride == 0:
            object.__setattr__(self, "stride", self.max_length // 2)
        if not 1 <= self.stride <= self.max_length - 1:
            raise BadInputError("--stride", self.stride, f"an integer in [1, max-length - 1 = {self.max_length - 1}]")
        if self.batch_size < 1:
            raise BadInputError("--batch-size", self.batch_size, "a positive integer")
        if self.max_examples < 0 or self.bootstrap < 0:
            raise BadInputError("--max-examples/--bootstrap", (self.max_examples, self.bootstrap), "integers >= 0")
        if not 0.0 <= self.require_improvement < 1.0:
            raise BadInputError("--require-improvement", self.require_improvement, "a relative improvement in [0, 1), e.g. 0.05 for 5%")
        if self.require_improvement and not self.finetune:
            raise BadInputError("--finetune", self.finetune, "the fine-tuning output prefix when --require-improvement is set")
