"""Every file name one stage writes and another stage, the DAG or the run report reads: the only place they are
spelled. A stage's own scratch names stay in the stage."""

from __future__ import annotations

# Every stage's prefix: the manifest is written last (a prefix without it is incomplete), progress while it runs,
# the error document when a bad input stops an engine that has no exit code to report it (Dataflow).
MANIFEST = "_manifest.json"
PROGRESS = "_progress.json"
ERROR = "_error.json"
# Bookkeeping files the stage publishes besides its outputs: never listed among them.
BOOKKEEPING = (MANIFEST, PROGRESS, ERROR)

# preprocess
# Split names: written as `train.jsonl` (split_file) or as shards `train-00000-of-00004.jsonl` (jobs.contract.splits).
TRAIN = "train"
EVAL = "eval"
QUARANTINE = "quarantine"  # rows refused with --on-bad-record skip
STATS = "stats.json"

# finetune
ADAPTER = "adapter.lora.h5"  # keras-hub's LoRA weights (`save_lora_weights`)
# The fine-tuned model's logits on the probe texts (`PROBES`), recorded by the fine-tune: what convert checks its
# Hugging Face export and PEFT adapter against, without loading the training stack.
REFERENCE_LOGITS = "reference_logits.npz"
MERGED_MODEL = "model"  # the merged keras-hub preset directory (absent for a quantized base: the adapter is the product)
TRAIN_METRICS = "metrics.json"
LOSS_CURVE = "loss_curve.png"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"

# benchmark
BENCHMARK_REPORT = "report.json"
PERPLEXITY_CHART = "perplexity.png"
GENERATIONS = "generations.jsonl"  # one line per eval example: the prompt, reference, base and tuned answers, scores
BASE_EVALUATION = "base-{key}.json"  # in the run's shared benchmark folder: see base_evaluation

# convert: the prefix itself is the Hugging Face model directory (`from_pretrained(prefix)`)
PARITY = "parity.json"
PEFT_ADAPTER = "adapter"  # PEFT's adapter directory (adapter_config.json + adapter_model.safetensors); the fine-tune
# writes it, convert checks it with PeftModel and publishes it beside the merged export
PEFT_PARITY = "peft_parity.json"  # inside PEFT_ADAPTER
PEFT_ADAPTER_CONFIG = "adapter_config.json"  # inside PEFT_ADAPTER: PEFT's config (its rank `r` sizes vLLM's LoRA slots)
ANSWERS = "answers.json"
BASE_EXPORT = "base"  # the base model in Hugging Face format, with --export-base
MODEL_CARD = "README.md"  # the Hugging Face model card, in the export and in its PEFT_ADAPTER directory

# the run's own files, next to the stages' folders
CHAMPION = "champion.json"
RUN_REPORT_JSON = "report.json"
RUN_REPORT_MD = "report.md"
RUN_REPORT_HTML = "report.html"
LEASE = "_lease.json"


def base_evaluation(key: str) -> str:
    """The base model's evaluation in the run's shared benchmark folder, named by the digest of what it depends on
    (base model, eval data, metric config, code), so every candidate and a rerun reuse it."""
    return BASE_EVALUATION.format(key=key)


def split_file(split: str) -> str:
    """A split written as one file by the single-machine stage."""
    return f"{split}.jsonl"
