"""Rewrite an exported `model.safetensors` as (optionally bfloat16) shards with an index, one tensor at a
time. By hand because huggingface_hub's shard splitter wants the whole state dict in memory."""

from __future__ import annotations

import json
from pathlib import Path


def reshard(directory: Path, dtype: str, max_shard_bytes: int) -> list[str]:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = directory / "model.safetensors"
    target_dtype = torch.bfloat16 if dtype == "bfloat16" else None
    with safe_open(str(source), framework="pt") as reader:
        names = list(reader.keys())
        sizes = {}
        for name in names:
            info = reader.get_slice(name)
            numel = 1
            for dim in info.get_shape():
                numel *= dim
            sizes[name] = numel * (2 if target_dtype is not None else _itemsize(info.get_dtype()))
        total = sum(sizes.values())
        if target_dtype is None and total <= max_shard_bytes:
            return ["model.safetensors"]
        groups, current, current_size = [], [], 0
        for name in names:
            if current and current_size + sizes[name] > max_shard_bytes:
                groups.append(current)
                current, current_size = [], 0
            current.append(name)
            current_size += sizes[name]
        groups.append(current)
        files = ["model.safetensors"] if len(groups) == 1 else [
            f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))
        ]
        weight_map = {}
        for filename, group in zip(files, groups):
            tensors = {}
            for name in group:
                tensor = reader.get_tensor(name)
                tensors[name] = tensor.to(target_dtype) if target_dtype is not None and tensor.is_floating_point() else tensor
                weight_map[name] = filename
            save_file(tensors, str(directory / (filename + ".tmp")), metadata={"format": "pt"})
            del tensors
    source.unlink()
    for filename in files:
        (directory / (filename + ".tmp")).rename(directory / filename)
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}[dtype]
