"""Convert core: merge LoRA, export with keras-hub's `export_to_transformers`, complete the directory for
serving, verify it against the Keras model through transformers, then publish."""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from jobs.common import models, storage
from jobs.common.manifest import StageRun, peak_rss_bytes, read_manifest, upstream_ref
from jobs.contract import artifacts, documents
from jobs.contract.configs.convert import ConvertConfig
from jobs.contract.errors import BadInputError, ExportMismatchError
from jobs.convert.safetensors_io import reshard

log = logging.getLogger(__name__)

SUPPORTED_BACKBONES = ("GemmaBackbone", "Gemma3Backbone")


def release_memory() -> None:
    """Collect the freed model and hand glibc's free pages back to the OS. Without the trim, a freed model's
    gigabyte stays in the allocator's arenas and the next model loads on top of it, raising the stage's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the peak is only higher
        pass


def _finetune_settings(config: ConvertConfig) -> dict[str, Any]:
    manifest = read_manifest(config.finetune) or {}
    return manifest.get("config", {})


def base_model_of(config: ConvertConfig) -> str:
    settings = _finetune_settings(config) if config.finetune else {}
    return config.base_model or settings.get("base_model", "")


def adapter_uri(config: ConvertConfig) -> str:
    """The keras-hub LoRA file: the one given, or the fine-tune's."""
    return config.adapter or (storage.join(config.finetune, artifacts.ADAPTER) if config.finetune else "")


def from_adapter(config: ConvertConfig) -> bool:
    """Export base + adapter (an adapter given, or a fine-tune on a quantized base, whose product is the adapter)
    rather than the fine-tune's merged preset."""
    return bool(config.adapter) or (bool(config.finetune) and models.adapter_only(_finetune_settings(config)))


def load_reference(config: ConvertConfig, workdir: Path):
    """The Keras model the export must reproduce: the merged preset, or the full-precision base with the adapter."""
    if not from_adapter(config):
        return models.load_causal_lm(storage.join(config.finetune, artifacts.MERGED_MODEL), workdir, field="--finetune")
    return load_lora_model(config, workdir, adapter_uri(config))


def load_lora_model(config: ConvertConfig, workdir: Path, uri: str):
    """The base model with the LoRA adapter enabled and loaded (the delta not merged)."""
    settings = _finetune_settings(config) if config.finetune else {}
    rank = config.lora_rank or settings.get("lora_rank", 0)
    targets = list(config.lora_targets or settings.get("lora_targets", ()))
    return models.load_with_adapter(base_model_of(config), uri, rank, targets, workdir)


def export(model, directory: Path) -> None:
    name = type(model.backbone).__name__
    if name not in SUPPORTED_BACKBONES:
        raise BadInputError("model architecture", name, f"one of {', '.join(SUPPORTED_BACKBONES)} (what the exporter supports)")
    model.export_to_transformers(str(directory))
    tokenizer = model.preprocessor.tokenizer
    generation = directory / "generation_config.json"
    settings = json.loads(generation.read_text()) if generation.exists() else {}
    stops = sorted({int(tokenizer.end_token_id), models.end_of_turn_id(tokenizer)})
    settings.update({"bos_token_id": tokenizer.start_token_id, "pad_token_id": tokenizer.pad_token_id,
                     "eos_token_id": stops})
    generation.write_text(json.dumps(settings, indent=2))
    check_stops(directory, stops)


def check_stops(directory: Path, stops: list[int]) -> None:
    """What transformers and vLLM will stop on, read back as transformers reads it: both EOS and end of turn."""
    from transformers import GenerationConfig

    found = GenerationConfig.from_pretrained(str(directory)).eos_token_id
    found = sorted(found) if isinstance(found, list) else [found]
    if found != stops:
        raise ExportMismatchError(f"generation_config.json of {directory}: eos_token_id {found}; expected {stops} (EOS "
                                  "and end of turn: generation would not stop after an answer)")


def reference_outputs(model, texts: list[str]) -> list[dict[str, Any]]:
    """Token ids and logits of the Keras model on the sample texts, kept so the model can be freed before
    transformers loads the export (two models in memory at once set the stage's peak)."""
    import keras

    tokenizer = model.preprocessor.tokenizer
    outputs = []
    for text in texts:
        ids = [int(t) for t in tokenizer(text)]
        full = [tokenizer.start_token_id, *ids]
        logits = model({"token_ids": np.array([full], np.int32), "padding_mask": np.ones((1, len(full)), np.int32)})
        logits = keras.ops.convert_to_numpy(logits).astype(np.float32)
        outputs.append({"text": text, "ids": ids, "input": full, "logits": logits})
    return outputs


def verify(expected: list[dict[str, Any]], directory: Path, config: ConvertConfig) -> dict[str, Any]:
    """Token ids, logits and greedy next tokens of the export against the Keras model's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(directory))
    hf_model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    hf_model.eval()
    token_checks, max_diff, next_tokens, max_logit = [], 0.0, [], 0.0
    for sample in expected:
        keras_logits = sample["logits"]
        token_checks.append(sample["ids"] == hf_tokenizer(sample["text"], add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            hf_logits = hf_model(torch.tensor([sample["input"]])).logits.float().numpy()
        max_diff = max(max_diff, float(np.abs(keras_logits - hf_logits).max()))
        max_logit = max(max_logit, float(np.abs(keras_logits).max()))
        last = keras_logits[0, -1]
        next_tokens.append((int(last.argmax()), int(hf_logits[0, -1].argmax()), last))
    tolerance = config.tolerance or (1e-3 if config.dtype == "float32" else 0.02 * max_logit)
    # A different greedy token fails only when the Keras model preferred its own by more than the tolerance: a
    # near-tie (common in a random or bfloat16 model) cannot be kept through rounding the check already allows.
    greedy_equal = [keras_top == hf_top or float(last[keras_top] - last[hf_top]) <= tolerance
                    for keras_top, hf_top, last in next_tokens]
    parity = {
        "samples": len(expected),
        "token_ids_equal": all(token_checks),
        "logits_max_abs_diff": max_diff,
        "tolerance": tolerance,
        "greedy_next_token_equal": all(greedy_equal),
        "greedy_near_ties": sum(k != h for k, h, _ in next_tokens),
        "dtype": config.dtype,
    }
    parity["passed"] = parity["token_ids_equal"] and max_diff <= tolerance and parity["greedy_next_token_equal"]
    return parity


def run(config: ConvertConfig, workdir: Path) -> dict[str, Any]:
    inputs = [upstream_ref(config.finetune, "--finetune")] if config.finetune else []
    if config.data and config.answers:
        inputs.append(upstream_ref(config.data, "--data"))
    if config.adapter:
        inputs.append({"uri": config.adapter})
    stage = StageRun("convert", config.output, asdict(config), inputs)
    if (out := stage.start(workdir, out=workdir / "export")) is None:
        return stage.manifest
    started = time.time()
    model = load_reference(config, workdir)
    expected = reference_outputs(model, config.sample_texts())
    if from_adapter(config):
        # Exporting a LoRA-enabled model would write the base kernels without the delta. Saving stores merged
        # kernels, so a save/reload round trip yields a plain model with the delta folded in.
        merged_dir = workdir / "merged"
        model.save_to_preset(str(merged_dir))
        del model
        release_memory()
        model = models.load_causal_lm(str(merged_dir), workdir)
    shutil.rmtree(out, ignore_errors=True)  # export writes a fresh directory
    export(model, out)
    del model
    release_memory()
    exported_bytes = (out / "model.safetensors").stat().st_size
    files = reshard(out, config.dtype, config.max_shard_mb * 1024 * 1024)
    config_path = out / "config.json"
    hf_config = json.loads(config_path.read_text())
    hf_config["dtype"] = hf_config["torch_dtype"] = config.dtype
    config_path.write_text(json.dumps(hf_config, indent=2))
    export_time = time.time() - started

    parity = verify(expected, out, config)
    release_memory()
    log.info("parity: %s", json.dumps(parity))
    if not parity["passed"]:
        raise ExportMismatchError(f"export does not reproduce the Keras model, nothing published: {json.dumps(parity)}")
    (out / artifacts.PARITY).write_bytes(documents.PARITY.dump(parity))
    peft = export_peft_adapter(config, workdir, out, parity["tolerance"]) if config.peft_adapter else None
    if config.data and config.answers:
        from jobs.convert import answers

        base_dir = (out / artifacts.BASE_EXPORT) if config.export_base else (workdir / "base-export")
        rows = answers.eval_prompts(config.data, workdir, config.answers)
        answers.write(rows, base_dir if peft else None, out, out / artifacts.ANSWERS)
        log.info("answers of the base and the export to %d eval prompts: answers.json", len(rows))
    settings = _finetune_settings(config) if config.finetune else {}
    metrics = {
        # What was exported: a fine-tune on a quantized base is applied to the full-precision base (its adapter
        # is the product); the parity check compares the export with exactly that model.
        "exported_from": ("the fine-tune's merged model" if not from_adapter(config) else
                          f"the full-precision base {base_model_of(config)} with the adapter applied"
                          + (f" (trained on a {settings['base_quantization']} base)" if models.adapter_only(settings) else "")),
        "export_time_s": round(export_time, 2),
        "total_time_s": round(time.time() - started, 2),
        "checkpoint_bytes": exported_bytes,
        "safetensors_files": files,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_over_checkpoint": round(peak_rss_bytes() / exported_bytes, 3),
        "parity": parity,
        "peft_parity": peft,
    }
    return stage.finish(out, metrics)


def export_peft_adapter(config: ConvertConfig, workdir: Path, out: Path, tolerance: float) -> dict[str, Any]:
    """Write `adapter/` (PEFT's format) and check it: PeftModel on the exported base must reproduce the Keras
    LoRA model's logits within the parity tolerance, or nothing is published (exit 4)."""
    from jobs.convert import peft_adapter

    model = load_lora_model(config, workdir, adapter_uri(config))
    expected = reference_outputs(model, config.sample_texts())
    base_dir = (out / artifacts.BASE_EXPORT) if config.export_base else (workdir / "base-export")
    shutil.rmtree(base_dir, ignore_errors=True)
    export(model, base_dir)  # a LoRA-enabled model exports its base kernels: the delta stays in the adapter
    adapter_config = peft_adapter.write(model.backbone, out / artifacts.PEFT_ADAPTER, base_model_of(config))
    del model
    release_memory()
    if config.export_base:
        reshard(base_dir, config.dtype, config.max_shard_mb * 1024 * 1024)
    result = peft_adapter.verify(expected, base_dir, out / artifacts.PEFT_ADAPTER, tolerance)
    result |= {"rank": adapter_config["r"], "target_modules": adapter_config["target_modules"]}
    log.info("PEFT adapter parity: %s", json.dumps(result))
    if not result["passed"]:
        raise ExportMismatchError(f"the PEFT adapter does not reproduce the Keras LoRA model, nothing published: {json.dumps(result)}")
    (out / artifacts.PEFT_ADAPTER / artifacts.PEFT_PARITY).write_text(json.dumps(result, indent=2))
    return result
