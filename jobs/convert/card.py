"""The model card convert writes beside the export and beside its PEFT adapter: a Hugging Face `README.md` whose
YAML front matter the Hub (and `huggingface_hub.ModelCard`) reads — base model, license and the Gemma terms,
datasets, tags, evaluation results — and whose body says where the model came from (dataset and manifest digests),
how it was trained, every metric with its 95% interval against the base, who approved it, and what it is for.

`huggingface_hub` builds and parses the card; the body is plain Markdown written here (no template engine in the
stage image). Values that come from users (dataset URIs, an approver's comment) sit in code spans or YAML only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from jobs.contract import artifacts, documents

GEMMA_TERMS = "https://ai.google.dev/gemma/terms"
PIPELINE = "gemma-lora-pipeline"
TRAINING_KEYS = ("base_model", "lora_rank", "lora_targets", "learning_rate", "epochs", "max_steps", "batch_size",
                 "sequence_length", "max_train_examples", "base_quantization", "mixed_precision", "seed")


def hub_id(uri: str) -> str | None:
    """A Hub repository id for `hf://org/name` (what the front matter's base_model and datasets hold); None else."""
    match = re.fullmatch(r"hf://([\w.-]+/[\w.-]+)(?:@[\w.-]+)?/?", uri or "")
    return match[1] if match else None


def _code(value: Any, cell: bool = False) -> str:
    """A code span no backtick in `value` can close, on one line; in a table cell `|` is escaped too (GFM)."""
    text = re.sub(r"[\r\n]+", " ", str(value))
    if not text:
        return "n/a"
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text[:1] in "` " or text[-1:] in "` " else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|') if cell else text}{pad}{fence}"


def _figure(figure: dict[str, Any]) -> dict[str, Any] | None:
    if figure.get("value") is None:
        return None
    return {"value": figure["value"], "ci95": [figure.get("ci95_low"), figure.get("ci95_high")]}


def metrics_of(report: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Every metric of the tuned model in a benchmark report, with the base model's, each {value, ci95}."""
    if not report:
        return {}
    return {name: {"tuned": _figure(documents.metric(report, "tuned", name)),
                   "base": _figure(documents.metric(report, "base", name))}
            for name in documents.metric_names(report, "tuned") if _figure(documents.metric(report, "tuned", name))}


def _cell(figure: dict[str, Any] | None) -> str:
    if not figure:
        return "n/a"
    low, high = figure["ci95"]
    interval = f" ({low:.4g}–{high:.4g})" if isinstance(low, (int, float)) and isinstance(high, (int, float)) else ""
    return f"{figure['value']:.4g}{interval}"


def _approval_line(approval: dict[str, Any] | None) -> str:
    if not approval:
        return "No approval record: this export was not promoted through the pipeline's approval step."
    who = (approval.get("by") or {}).get("name") or (approval.get("by") or {}).get("id")
    if approval["decision"] == documents.NOT_APPROVED:
        return (f"Not the promoted candidate: converted beside {_code(approval.get('candidate') or 'none')}, which was "
                "promoted; serve it only for comparison.")
    if approval["decision"] == documents.AUTOMATIC:
        return "Promoted without review (approval = none): the automatic champion."
    comment = f" Comment: {_code(approval['comment'])}." if approval.get("comment") else ""
    chosen = "the automatic champion" if approval["decision"] == documents.APPROVED else \
        f"chosen over the automatic champion {_code(approval['selected'])}"
    return f"Approved by {_code(who)}: {chosen}.{comment}"


def build(*, kind: str, base_model: str, dataset: str, lineage: dict[str, Any], training: dict[str, Any],
          report: dict[str, Any] | None, approval: dict[str, Any] | None, run: str, candidate: str, source: str) -> Any:
    """The card (a `huggingface_hub.ModelCard`) for `kind` = "model" (the merged export) or "adapter" (PEFT)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    metrics = metrics_of(report)
    name = f"{run}/{candidate}" if run else candidate or "gemma-lora"
    base_id, data_id = hub_id(base_model), hub_id(dataset)
    results = [EvalResult(task_type="text-generation", dataset_type=data_id or "json", dataset_name=f"eval split of {dataset}",
                          dataset_split=artifacts.EVAL, metric_type=metric, metric_name=metric, metric_value=figures["tuned"]["value"])
               for metric, figures in metrics.items()]
    data = ModelCardData(
        base_model=base_id, license="gemma", license_link=GEMMA_TERMS, library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation", datasets=[data_id] if data_id else None, model_name=name,
        tags=["gemma", "lora", "peft", "fine-tuned", PIPELINE], eval_results=results or None,
        **{PIPELINE.replace("-", "_"): {"run": run, "candidate": candidate, "base_model": base_model, "dataset": dataset,
                                         "lineage": lineage, "training": training, "metrics": metrics, "approval": approval}})
    what = ("the LoRA adapter (PEFT format) of" if kind == "adapter" else "the merged model (LoRA folded into the weights) of")
    load = ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
            "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), \"path/to/adapter\")\n```\n\n"
            "vLLM: `vllm serve BASE --enable-lora --lora-modules name=path/to/adapter`, then ask for `\"model\": \"name\"`."
            if kind == "adapter" else
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(\"path/to/model\")\n```\n\nvLLM: `vllm serve path/to/model`.")
    rows = "\n".join(f"| {_code(metric, cell=True)} | {_cell(f['base'])} | {_cell(f['tuned'])} |" for metric, f in metrics.items())
    body = "\n".join([
        f"# {name}\n",
        f"This is {what} a LoRA fine-tune of {_code(base_model)}, made by the Gemma LoRA pipeline ({source}).\n",
        "## How to load it\n", load + "\n",
        "## Training data\n",
        f"- Dataset: {_code(dataset)}",
        *(f"- {key.replace('_', ' ')}: {_code(value)}" for key, value in lineage.items()) , "",
        "## Training\n", "\n".join(f"- {key}: {_code(json.dumps(training[key]))}" for key in training) + "\n",
        "## Evaluation\n",
        ("On the run's held-out eval split; each value with its 95% bootstrap interval.\n\n"
         "| metric | base model | this model |\n|---|---|---|\n" + rows + "\n") if metrics else
        "No benchmark was recorded for this export.\n",
        "## Approval\n", _approval_line(approval) + "\n",
        "## Intended use and limitations\n",
        "For the task its dataset describes, after checking the evaluation above against your own examples. It "
        "inherits the base model's limitations and biases; the fine-tune can narrow what it does well and was not "
        "evaluated for safety beyond the metrics shown. Not for decisions about people without human review.\n",
        "## License\n",
        f"Gemma is provided under and subject to the Gemma Terms of Use found at {GEMMA_TERMS}; this derivative is too.\n",
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write(directory: Path, card: Any) -> Path:
    path = directory / artifacts.MODEL_CARD
    card.save(path)
    return path
