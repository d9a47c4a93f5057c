"""Typed, validated configuration of the benchmark stage: every option declared once (see jobs.contract.spec)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jobs.contract import spec
from jobs.contract.demo import DEMO_MODEL_URI
from jobs.contract.errors import BadInputError
from jobs.contract.spec import option

DESCRIPTION = "Perplexity of the base and tuned models on the eval split."


@dataclass(frozen=True)
class BenchmarkConfig:
    data: str = option(help="output prefix of the preprocessing stage (its eval.jsonl is scored)", upstream="preprocess")
    output: str = option(help="output prefix (gs:// or local directory)", upstream="self")
    finetune: str = option("", "output prefix of the fine-tuning stage (its merged model is the tuned model; "
                               "empty: base only)", upstream="finetune")
    base_model: str = option(DEMO_MODEL_URI, "the base model, as given to the fine-tuning stage", param="base_model")
    mode: Literal["auto", "response", "text"] = option(
        "auto", "response: per example, response tokens only (every assistant turn for chat data); text: running "
                "text with sliding windows; auto: text for raw-text data, else response")
    max_length: int = option(128, "tokens per window (text mode) or per example (response mode)",
                             minimum=8, maximum=131072, param="sequence_length")
    stride: int = option(0, "window start step in text mode (0: half of the max length)", minimum=0)
    separator: str = option("\n\n", "text joining documents in text mode")
    ood_text: str = option("", "optional out-of-domain plain-text file (gs:// or local), scored in text mode to "
                               "show forgetting")
    batch_size: int = option(4, "windows per forward pass", minimum=1)
    max_examples: int = option(0, "score at most this many eval examples (0: all)", minimum=0)
    bootstrap: int = option(1000, "bootstrap resamples for the 95% interval (0: none)", minimum=0, param="bootstrap")
    seed: int = option(0, "bootstrap seed", minimum=0)
    require_improvement: float = option(
        0.0, "quality gate: minimum relative perplexity drop of the tuned model, e.g. 0.05 (0: no gate)",
        minimum=0, exclusive_maximum=1, param="require_improvement")

    def __post_init__(self) -> None:
        spec.validate(self)
        if self.stride == 0:
            object.__setattr__(self, "stride", self.max_length // 2)
        if not 1 <= self.stride <= self.max_length - 1:
            raise BadInputError("--stride", self.stride, f"an integer in [1, max-length - 1 = {self.max_length - 1}]")
        if self.require_improvement and not self.finetune:
            raise BadInputError("--finetune", self.finetune, "the fine-tuning output prefix when --require-improvement is set")
