"""Typed, validated configuration of the convert stage."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.common.errors import BadInputError

DTYPES = ("float32", "bfloat16")

HELP = {
    "finetune": "output prefix of the fine-tuning stage: its merged model is exported (or, with --adapter, "
                "its base model and adapter settings are used)",
    "output": "output prefix (gs:// or local directory) for the Hugging Face model directory",
    "base_model": "base model for the base + adapter path (default: the one the fine-tune used)",
    "adapter": "a .lora.h5 adapter to merge into --base-model (empty: export the merged preset)",
    "lora_rank": "rank of --adapter (0: read from the fine-tune's manifest)",
    "lora_targets": "layers of --adapter (empty: read from the fine-tune's manifest)",
    "dtype": "float32 or bfloat16 safetensors",
    "max_shard_mb": "shard safetensors above this size (MiB) and write an index",
    "tolerance": "max |logit difference| allowed between Keras and transformers (0: 1e-3 for float32, 2% of the logit range for bfloat16)",
    "samples": "sample prompts for the parity check, separated by '|' (empty: built-in samples)",
}

DEFAULT_SAMPLES = (
    "What does the Python function `os.path.join` do?",
    "<start_of_turn>user\nExplain LoRA in one sentence.<end_of_turn>\n<start_of_turn>model\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé, 漢字 and emoji 🙂 too.",
)


@dataclass(frozen=True)
class ConvertConfig:
    output: str
    finetune: str = ""
    base_model: str = ""
    adapter: str = ""
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()
    dtype: str = "float32"
    max_shard_mb: int = 2048
    tolerance: float = 0.0
    samples: str = ""

    def __post_init__(self) -> None:
        if not self.finetune and not (self.base_model and self.adapter):
            raise BadInputError("--finetune", self.finetune, "a fine-tuning output prefix, or --base-model with --adapter")
        if self.adapter and not self.adapter.endswith(".lora.h5"):
            raise BadInputError("--adapter", self.adapter, "a keras-hub LoRA file ending in .lora.h5")
        if self.adapter and not self.finetune and (self.lora_rank < 1 or not self.lora_targets):
            raise BadInputError("--lora-rank/--lora-targets", (self.lora_rank, self.lora_targets),
                                "the adapter's rank and target layers when no --finetune manifest gives them")
        if self.lora_rank < 0:
            raise BadInputError("--lora-rank", self.lora_rank, "0 (from the manifest) or a positive integer")
        if self.dtype not in DTYPES:
            raise BadInputError("--dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        if self.max_shard_mb < 1:
            raise BadInputError("--max-shard-mb", self.max_shard_mb, "a positive integer")
        if self.tolerance < 0:
            raise BadInputError("--tolerance", self.tolerance, "a number >= 0")

    def sample_texts(self) -> list[str]:
        return [s for s in self.samples.split("|") if s] if self.samples else list(DEFAULT_SAMPLES)
