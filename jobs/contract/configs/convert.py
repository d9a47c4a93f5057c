"""Typed, validated configuration of the convert stage: every option declared once (see jobs.contract.spec)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from jobs.contract import spec
from jobs.contract.errors import BadInputError
from jobs.contract.spec import option

DESCRIPTION = "Merge LoRA, export to Hugging Face transformers format, and verify it."

DEFAULT_SAMPLES = (
    "What does the Python function `os.path.join` do?",
    "<start_of_turn>user\nExplain LoRA in one sentence.<end_of_turn>\n<start_of_turn>model\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé, 漢字 and emoji 🙂 too.",
)


@dataclass(frozen=True)
class ConvertConfig:
    output: str = option(help="output prefix (gs:// or local directory) for the Hugging Face model directory",
                         upstream="self")
    finetune: str = option("", "output prefix of the fine-tuning stage: its merged model is exported (or, with "
                               "an adapter, its base model and adapter settings are used)", upstream="finetune")
    data: str = option("", "output prefix of the preprocessing stage: its first eval prompts are answered by the base "
                           "and the exported model, side by side in answers.json (empty: no answers)",
                       upstream="preprocess")
    benchmark: str = option("", "output prefix of the benchmark stage: its metrics, each with its 95% interval, go into "
                                "the model card (empty: a card without evaluation)", upstream="benchmark")
    approval: str = option("", "the promotion decision for the model card, as JSON (decision, candidate, selected, by, "
                               "comment); the DAG's approve task sets it, so a new decision rewrites the card (empty: "
                               "no approval record)")
    answers: int = option(3, "how many eval prompts to answer (0: none)", minimum=0, maximum=50)
    base_model: str = option("", "base model for the base + adapter path (default: the one the fine-tune used)")
    adapter: str = option("", "a .lora.h5 adapter to merge into the base model (empty: export the merged preset)")
    lora_rank: int = option(0, "rank of the adapter (0: read from the fine-tune's manifest)", minimum=0)
    lora_targets: tuple[str, ...] = option((), "layers of the adapter (empty: read from the fine-tune's manifest)")
    dtype: Literal["float32", "bfloat16"] = option("float32", "dtype of the exported safetensors",
                                                   param="export_dtype")
    max_shard_mb: int = option(2048, "shard safetensors above this size (MiB) and write an index", minimum=1)
    tolerance: float = option(0.0, "max |logit difference| allowed between Keras and transformers (0: 1e-3 for "
                                   "float32, 2% of the logit range for bfloat16)", minimum=0)
    peft_adapter: bool = option(True, "also write the LoRA adapter for PEFT and vLLM (adapter/) and check it with "
                                      "PeftModel on the exported base against the Keras LoRA model",
                                param="peft_adapter")
    export_base: bool = option(False, "also publish the exported base model (base/), for serving it with the "
                                      "adapter where the base is not on a hub")
    samples: str = option("", "sample prompts for the parity check, separated by '|' (empty: built-in samples)")

    def __post_init__(self) -> None:
        spec.validate(self)
        self.approval_record()  # a malformed --approval fails here, before anything loads
        if not self.finetune and not (self.base_model and self.adapter):
            raise BadInputError("--finetune", self.finetune, "a fine-tuning output prefix, or --base-model with --adapter")
        if self.adapter and not self.adapter.endswith(".lora.h5"):
            raise BadInputError("--adapter", self.adapter, "a keras-hub LoRA file ending in .lora.h5")
        if self.adapter and not self.finetune and (self.lora_rank < 1 or not self.lora_targets):
            raise BadInputError("--lora-rank/--lora-targets", (self.lora_rank, self.lora_targets),
                                "the adapter's rank and target layers when no --finetune manifest gives them")

    def approval_record(self) -> dict[str, Any] | None:
        if not self.approval:
            return None
        try:
            record = json.loads(self.approval)
        except json.JSONDecodeError as err:
            raise BadInputError("--approval", self.approval, f"a JSON object ({err})") from None
        if not isinstance(record, dict) or "decision" not in record:
            raise BadInputError("--approval", self.approval, "a JSON object with a decision")
        return record

    def sample_texts(self) -> list[str]:
        return [s for s in self.samples.split("|") if s] if self.samples else list(DEFAULT_SAMPLES)
