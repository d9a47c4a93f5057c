"""Convert without the training stack: the base's Hugging Face weights and the fine-tune's PEFT adapter, merged
tensor by tensor straight into (sharded) safetensors, then checked through transformers and PEFT against the logits
the fine-tune recorded. No Keras model in the process, and at most one tensor of the model in memory while merging.

The merge is PEFT's own arithmetic, `W + (lora_alpha / r) * B @ A` for each adapted module (the adapter folds
keras' scale into B, so the factor is 1), which is why the PEFT adapter's check also vouches for the merge.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path
from typing import Any

from jobs import families
from jobs.common import models, peft_adapter, reference, timing
from jobs.contract.errors import BadInputError

log = logging.getLogger(__name__)

PREFIX = "base_model.model."  # PEFT's name for the wrapped model in adapter keys
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json")
# safetensors' names for torch dtypes (its format: an 8-byte header length, a JSON header, the raw tensors)
DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64", "int32": "I32",
          "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
ALIGN = 8


def base_checkpoint(base_model: str, workdir: Path) -> Path | None:
    """The base model as a Hugging Face checkpoint directory (safetensors + config.json), or None when it is a
    keras-hub preset (exported through keras-hub instead). `hf://` bases are fetched from the Hub."""
    if base_model.startswith("hf://"):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base_model.removeprefix("hf://"),
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]))
    try:
        path = Path(models.resolve(base_model, workdir))
    except BadInputError:
        return None
    if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        return None
    config = json.loads((path / "config.json").read_text())
    if "registered_name" in config:
        return None
    # A text causal LM of its family: its weights carry the names the adapter uses (a multimodal checkpoint's
    # language model sits under another prefix, and goes through keras-hub, which loads its text part).
    family = families.of_config(config, str(path))
    return path if set(config.get("architectures") or ()) & set(family.hf_text_architectures) else None


def _tensor_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return sorted({directory / name for name in json.loads(index.read_text())["weight_map"].values()})
    return [directory / "model.safetensors"]


def adapter_deltas(adapter_dir: Path) -> dict[str, tuple[Any, Any, float]]:
    """{Hugging Face weight name: (lora_A, lora_B, scale)} from a PEFT adapter directory."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / peft_adapter.ADAPTER_CONFIG).read_text())
    scale = float(config["lora_alpha"]) / float(config["r"])
    tensors = load_file(str(adapter_dir / peft_adapter.ADAPTER_WEIGHTS))
    deltas = {}
    for key, lora_a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            deltas[module.removeprefix(PREFIX) + ".weight"] = (lora_a, tensors[module + ".lora_B.weight"], scale)
    if not deltas:
        raise BadInputError("adapter", str(adapter_dir), "a PEFT LoRA adapter with lora_A/lora_B weights")
    return deltas


def merge(base_dir: Path, deltas: dict[str, tuple[Any, Any, float]], out: Path, dtype: str, max_shard_bytes: int) -> list[str]:
    """Write the base's tensors, each adapted one with its LoRA delta added, as `dtype` safetensors shards (with an
    index past one shard), one tensor in memory at a time. By hand: safetensors' writer wants a whole shard in
    memory. Returns the file names."""
    import torch
    from safetensors import safe_open

    target = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    entries = []  # (file, name, shape, output dtype name, bytes)
    for path in _tensor_files(base_dir):
        with safe_open(str(path), framework="pt") as reader:
            for name in reader.keys():
                if name == "lm_head.weight" and "model.embed_tokens.weight" in reader.keys():
                    continue  # tied to the embeddings (Gemma); transformers re-ties it
                piece = reader.get_slice(name)
                shape = list(piece.get_shape())
                kind = piece.get_dtype()
                out_kind = DTYPES[str(target).removeprefix("torch.")] if kind in ("F32", "BF16", "F16", "F64") else kind
                size = _numel(shape) * _itemsize(out_kind)
                entries.append((path, name, shape, out_kind, size))
    missing = sorted(set(deltas) - {e[1] for e in entries})
    if missing:
        raise BadInputError("adapter", ", ".join(missing[:3]), f"modules of the base checkpoint {base_dir}")
    shards, current, size = [], [], 0
    for entry in entries:
        if current and size + entry[4] > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry[4]
    shards.append(current)
    files = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                           for i in range(len(shards))]
    out.mkdir(parents=True, exist_ok=True)
    readers: dict[Path, Any] = {}
    try:
        for filename, shard in zip(files, shards, strict=True):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for _, name, shape, kind, nbytes in shard:
                header[name] = {"dtype": kind, "shape": shape, "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % ALIGN)
            with (out / filename).open("wb") as handle:
                handle.write(struct.pack("<Q", len(encoded)) + encoded)
                for path, name, _, kind, nbytes in shard:
                    if path not in readers:  # each base file opened once, kept open for the shards that read it
                        readers[path] = safe_open(str(path), framework="pt").__enter__()
                    reader = readers[path]
                    tensor = reader.get_tensor(name)
                    if name in deltas:
                        lora_a, lora_b, scale = deltas[name]
                        tensor = tensor.float() + scale * (lora_b.float() @ lora_a.float())
                    if tensor.is_floating_point():
                        tensor = tensor.to(target)
                    data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
                    if data.nbytes != nbytes:
                        raise ValueError(f"{name}: {data.nbytes} bytes written, {nbytes} planned ({kind})")
                    handle.write(memoryview(data))
                    del tensor, data
    finally:
        for reader in readers.values():
            reader.__exit__(None, None, None)
    if len(files) > 1:
        weight_map = {e[1]: f for f, shard in zip(files, shards, strict=True) for e in shard}
        total = sum(e[4] for e in entries)
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}, indent=2))
    log.info("merged %d LoRA modules into %d tensors of %s: %s", len(deltas), len(entries), base_dir, ", ".join(files))
    return files


def complete(base_dir: Path, out: Path, dtype: str) -> list[int]:
    """config.json (its dtype), the tokenizer files and generation_config.json, which stops on EOS and end of turn
    (what transformers and vLLM stop on). Returns the stop ids."""
    from transformers import AutoTokenizer

    config = json.loads((base_dir / "config.json").read_text())
    marker = families.of_config(config, str(base_dir)).chat.end_of_turn
    config.pop("quantization_config", None)
    config["dtype"] = config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (base_dir / name).exists():
            shutil.copyfile(base_dir / name, out / name)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    end_of_turn = tokenizer.convert_tokens_to_ids(marker)
    if end_of_turn is None or end_of_turn == tokenizer.unk_token_id:
        raise BadInputError("tokenizer", str(base_dir), f"a tokenizer with {marker} as one token")
    stops = sorted({int(tokenizer.eos_token_id), int(end_of_turn)})
    generation_path = base_dir / "generation_config.json"
    settings = json.loads(generation_path.read_text()) if generation_path.exists() else {}
    settings.update({"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": stops})
    (out / "generation_config.json").write_text(json.dumps(settings, indent=2))
    return stops


def verify_export(samples: list[reference.Sample], directory: Path, tolerance: float | None) -> dict[str, Any]:
    """The export through transformers (as a server loads it) against the recorded logits, and its tokenizer's ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    with timing.phase("model_load"):
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    result = reference.compare(samples, _logits_of(model), tolerance)
    del model
    ids_equal = all(s.ids == tokenizer(s.text, add_special_tokens=False)["input_ids"] for s in samples)
    result = {**result, "token_ids_equal": ids_equal, "passed": result["passed"] and ids_equal}
    return result


def verify_adapter(samples: list[reference.Sample], base_dir: Path, adapter_dir: Path, tolerance: float) -> dict[str, Any]:
    """PEFT's `PeftModel` on the base against the recorded logits of the LoRA model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with timing.phase("model_load"):
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    result = reference.compare(samples, _logits_of(model), tolerance)
    del model, base
    return result


def _logits_of(model: Any) -> Any:
    import torch

    def run(ids: list[int]) -> Any:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().numpy()
    return run


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _itemsize(kind: str) -> int:
    return {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}[kind]
