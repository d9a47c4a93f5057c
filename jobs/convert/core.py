"""Convert core: the fine-tuned model in Hugging Face format (merged) and its PEFT adapter, each verified through
transformers / PEFT before anything is published.

Two ways, chosen per run (the manifest's `path` says which):

- without the training stack (`hf_merge`): when the base is a Hugging Face checkpoint (the demo model, `hf://`, a
  checkpoint directory) and the fine-tune recorded its adapter in PEFT's format and its reference logits. The
  LoRA delta is merged tensor by tensor into safetensors; no Keras model is loaded.
- through keras-hub (this module): a keras-hub preset base, an `--adapter` file given alone, custom `--samples`, or
  a fine-tune older than the reference logits. Merge in Keras, `export_to_transformers`, verify against the Keras
  model's own logits.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from jobs import families
from jobs.common import models, peft_adapter, reference, storage, timing
from jobs.common.manifest import StageRun, peak_rss_bytes, read_manifest, sha256_file, upstream_ref
from jobs.contract import artifacts, documents
from jobs.contract.configs.convert import ConvertConfig
from jobs.contract.errors import ExportMismatchError
from jobs.convert import hf_merge
from jobs.convert.safetensors_io import reshard

log = logging.getLogger(__name__)

WITHOUT_KERAS = "without Keras: the base's Hugging Face weights + the PEFT adapter, merged tensor by tensor"


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
    family = families.of_model(model)
    model.export_to_transformers(str(directory))
    family.finish_export(directory, model.backbone)
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


def verify(expected: list[reference.Sample], directory: Path, config: ConvertConfig) -> dict[str, Any]:
    """Token ids, logits and greedy next tokens of the export against the reference."""
    parity = hf_merge.verify_export(expected, directory, config.tolerance or (1e-3 if config.dtype == "float32" else None))
    return {**parity, "dtype": config.dtype}


def fast_path(config: ConvertConfig, workdir: Path) -> tuple[Path, dict[str, Any]] | str:
    """(the base's Hugging Face checkpoint, the fine-tune's manifest) when the conversion can skip Keras; else why not."""
    if config.adapter or not config.finetune:
        return "an --adapter file is given (keras-hub's LoRA format)"
    if config.samples:
        return "custom --samples (the fine-tune recorded its logits on the built-in probes)"
    manifest = read_manifest(config.finetune) or {}
    outputs = manifest.get("outputs") or {}
    if artifacts.REFERENCE_LOGITS not in outputs or not any(n.startswith(artifacts.PEFT_ADAPTER + "/") for n in outputs):
        return f"the fine-tune has no {artifacts.REFERENCE_LOGITS} and {artifacts.PEFT_ADAPTER}/ (made by older code)"
    base = hf_merge.base_checkpoint(base_model_of(config), workdir)
    if base is None:
        return f"the base {base_model_of(config)} is a keras-hub preset, not a Hugging Face checkpoint"
    return base, manifest


def _stage_finetune_files(config: ConvertConfig, manifest: dict[str, Any], workdir: Path) -> Path:
    """Only what this path reads of the fine-tune (its adapter and reference; not the merged model), each file
    checked against the fine-tune's manifest."""
    wanted = [n for n in manifest["outputs"] if n == artifacts.REFERENCE_LOGITS or n.startswith(artifacts.PEFT_ADAPTER + "/")]
    root = workdir / "finetune"
    for name in wanted:
        local = storage.stage_in(storage.join(config.finetune, name), root / Path(name).parent, name=Path(name).name)
        if sha256_file(local) != manifest["outputs"][name]["sha256"]:
            raise RuntimeError(f"{config.finetune}/{name} does not match the fine-tune's manifest (rewritten while read?); retry")
    return root if storage.is_gcs(config.finetune) else Path(config.finetune)


def convert_without_keras(config: ConvertConfig, workdir: Path, out: Path, base_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    finetune_dir = _stage_finetune_files(config, manifest, workdir)
    samples = reference.load(finetune_dir / artifacts.REFERENCE_LOGITS)
    adapter_dir = finetune_dir / artifacts.PEFT_ADAPTER
    shutil.rmtree(out, ignore_errors=True)
    files = hf_merge.merge(base_dir, hf_merge.adapter_deltas(adapter_dir), out, config.dtype, config.max_shard_mb * 2**20)
    check_stops(out, hf_merge.complete(base_dir, out, config.dtype))
    release_memory()
    parity = verify(samples, out, config)
    release_memory()
    _check("export does not reproduce the fine-tuned model's recorded logits", parity)
    (out / artifacts.PARITY).write_bytes(documents.PARITY.dump(parity))
    peft = None
    if config.peft_adapter:
        shutil.copytree(adapter_dir, out / artifacts.PEFT_ADAPTER, dirs_exist_ok=True)
        peft = hf_merge.verify_adapter(samples, base_dir, out / artifacts.PEFT_ADAPTER, parity["tolerance"])
        release_memory()
        peft = _adapter_result(peft, out)
    if config.export_base:
        hf_merge.merge(base_dir, {}, out / artifacts.BASE_EXPORT, config.dtype, config.max_shard_mb * 2**20)
        hf_merge.complete(base_dir, out / artifacts.BASE_EXPORT, config.dtype)
    _answers(config, workdir, out, base_dir)
    return {"path": WITHOUT_KERAS,
            "base_checkpoint": str(base_dir), "safetensors_files": files, "parity": parity, "peft_parity": peft}


def _check(what: str, result: dict[str, Any]) -> None:
    log.info("%s: %s", "parity" if "export" in what else "PEFT adapter parity", json.dumps(result))
    if not result["passed"]:
        raise ExportMismatchError(f"{what}, nothing published: {json.dumps(result)}")


def _adapter_result(result: dict[str, Any], out: Path) -> dict[str, Any]:
    adapter_config = json.loads((out / artifacts.PEFT_ADAPTER / peft_adapter.ADAPTER_CONFIG).read_text())
    result = {**result, "rank": adapter_config["r"], "target_modules": adapter_config["target_modules"]}
    _check("the PEFT adapter does not reproduce the fine-tuned LoRA model", result)
    (out / artifacts.PEFT_ADAPTER / artifacts.PEFT_PARITY).write_text(json.dumps(result, indent=2))
    return result


def _answers(config: ConvertConfig, workdir: Path, out: Path, base_dir: Path | None) -> None:
    if config.data and config.answers:
        from jobs.convert import answers

        rows = answers.eval_prompts(config.data, workdir, config.answers)
        answers.write(rows, base_dir, out, out / artifacts.ANSWERS)
        log.info("answers of the base and the export to %d eval prompts: answers.json", len(rows))


def run(config: ConvertConfig, workdir: Path) -> dict[str, Any]:
    inputs = [upstream_ref(config.finetune, "--finetune")] if config.finetune else []
    if config.data and config.answers:
        inputs.append(upstream_ref(config.data, "--data"))
    if config.adapter:
        inputs.append({"uri": config.adapter})
    if config.benchmark:  # the model card's metrics
        inputs.append(upstream_ref(config.benchmark, "--benchmark"))
    stage = StageRun("convert", config.output, asdict(config), inputs)
    if (out := stage.start(workdir, out=workdir / "export")) is None:
        return stage.manifest
    timing.begin("compute")
    started = time.time()
    chosen = fast_path(config, workdir)
    if isinstance(chosen, str):
        log.info("converting through keras-hub: %s", chosen)
        result = convert_with_keras(config, workdir, out)
    else:
        log.info("converting without the training stack (base checkpoint %s)", chosen[0])
        result = convert_without_keras(config, workdir, out, *chosen)
    settings = _finetune_settings(config) if config.finetune else {}
    checkpoint_bytes = sum((out / f).stat().st_size for f in result["safetensors_files"])
    # What was exported: a fine-tune on a quantized base is applied to the full-precision base (its adapter is the
    # product); the parity check compares the export with exactly that model.
    quantized = f" (trained on a {settings['base_quantization']} base)" if models.adapter_only(settings) else ""
    if result["path"] == WITHOUT_KERAS:
        source = f"the base's Hugging Face checkpoint with the fine-tune's adapter merged in{quantized}"
    elif not from_adapter(config):
        source = "the fine-tune's merged model"
    else:
        source = f"the full-precision base {base_model_of(config)} with the adapter applied{quantized}"
    metrics = {
        "exported_from": source,
        **result,
        "model_cards": write_cards(config, out, settings, source),
        "total_time_s": round(time.time() - started, 2),
        "checkpoint_bytes": checkpoint_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_over_checkpoint": round(peak_rss_bytes() / checkpoint_bytes, 3),
    }
    return stage.finish(out, metrics)


def write_cards(config: ConvertConfig, out: Path, settings: dict[str, Any], source: str) -> list[str]:
    """The model card of the export, and of its adapter when there is one: lineage from the upstream manifests,
    the fine-tune's config, the candidate's benchmark, and the promotion decision the approve task passed
    (`--approval`: a new decision is a new config, so a rerun rewrites the card rather than keeping a stale one)."""
    from jobs.contract.layout import RunLayout
    from jobs.convert import card

    def read_json(uri: str) -> dict[str, Any] | None:
        return json.loads(storage.read_bytes(uri)) if uri and storage.exists(uri) else None

    finetune = read_manifest(config.finetune) if config.finetune else None
    upstream = next((i for i in (finetune or {}).get("inputs", []) if "manifest_sha256" in i), {})
    preprocess = read_manifest(upstream["uri"]) if upstream else None
    lineage = {"preprocess_output": upstream.get("uri"), "preprocess_manifest_sha256": upstream.get("manifest_sha256"),
               "finetune_output": config.finetune or None,
               "finetune_manifest_sha256": upstream_ref(config.finetune, "--finetune")["manifest_sha256"] if finetune else None,
               **{k: ((preprocess or {}).get("metrics") or {}).get(k) for k in ("train_rows", "eval_rows")}}
    report = read_json(storage.join(config.benchmark, artifacts.BENCHMARK_REPORT)) if config.benchmark else None
    layout = RunLayout.containing(config.output)
    candidate = config.output.rstrip("/").split("/")[-2] if layout else ""
    common = {"base_model": base_model_of(config), "dataset": ((preprocess or {}).get("config") or {}).get("input", ""),
              "lineage": {k: v for k, v in lineage.items() if v is not None},
              "training": {k: settings[k] for k in card.TRAINING_KEYS if k in settings}, "report": report,
              "approval": config.approval_record(), "run": layout.prefix.rsplit("/", 1)[-1] if layout else "", "candidate": candidate,
              "source": source}
    written = [card.write(out, card.build(kind="model", **common))]
    if (out / artifacts.PEFT_ADAPTER).is_dir():
        written.append(card.write(out / artifacts.PEFT_ADAPTER, card.build(kind="adapter", **common)))
    return [str(p.relative_to(out)) for p in written]


def convert_with_keras(config: ConvertConfig, workdir: Path, out: Path) -> dict[str, Any]:
    """Merge in Keras, export with keras-hub, verify against the Keras model's logits."""
    started = time.time()
    model = load_reference(config, workdir)
    expected = reference.compute(model, config.sample_texts())
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
    files = reshard(out, config.dtype, config.max_shard_mb * 1024 * 1024)
    config_path = out / "config.json"
    hf_config = json.loads(config_path.read_text())
    hf_config["dtype"] = hf_config["torch_dtype"] = config.dtype
    config_path.write_text(json.dumps(hf_config, indent=2))
    export_time = time.time() - started
    parity = verify(expected, out, config)
    release_memory()
    _check("export does not reproduce the Keras model", parity)
    (out / artifacts.PARITY).write_bytes(documents.PARITY.dump(parity))
    peft = export_peft_adapter(config, workdir, out, parity["tolerance"]) if config.peft_adapter else None
    base_dir = (out / artifacts.BASE_EXPORT) if config.export_base else (workdir / "base-export")
    _answers(config, workdir, out, base_dir if peft else None)
    return {"path": "through keras-hub's exporter", "export_time_s": round(export_time, 2), "safetensors_files": files,
            "parity": parity, "peft_parity": peft}


@contextlib.contextmanager
def _delta_off(backbone) -> Iterator[None]:
    """LoRA's B factors zeroed for the duration: a LoRA-enabled layer's `kernel` (what some families' exporters
    read, Gemma 4's among them) then is its base kernel, whatever the exporter reads."""
    saved = [(v, v.numpy()) for v in backbone.trainable_variables if v.path.endswith("lora_kernel_b")]
    for variable, value in saved:
        variable.assign(np.zeros_like(value))
    try:
        yield
    finally:
        for variable, value in saved:
            variable.assign(value)


def export_peft_adapter(config: ConvertConfig, workdir: Path, out: Path, tolerance: float) -> dict[str, Any]:
    """Write `adapter/` (PEFT's format) and check it: PeftModel on the exported base must reproduce the Keras
    LoRA model's logits within the parity tolerance, or nothing is published (exit 4)."""
    model = load_lora_model(config, workdir, adapter_uri(config))
    expected = reference.compute(model, config.sample_texts())
    base_dir = (out / artifacts.BASE_EXPORT) if config.export_base else (workdir / "base-export")
    shutil.rmtree(base_dir, ignore_errors=True)
    with _delta_off(model.backbone):  # the base's kernels: the delta is the adapter's
        export(model, base_dir)
    peft_adapter.write(model.backbone, out / artifacts.PEFT_ADAPTER, base_model_of(config))
    del model
    release_memory()
    if config.export_base:
        reshard(base_dir, config.dtype, config.max_shard_mb * 1024 * 1024)
    result = hf_merge.verify_adapter(expected, base_dir, out / artifacts.PEFT_ADAPTER, tolerance)
    return _adapter_result(result, out)
