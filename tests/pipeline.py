"""A tiny end-to-end pipeline (preprocess -> finetune -> convert) shared by the benchmark and convert tests."""

from __future__ import annotations

import json
from pathlib import Path

ROWS = [{"instruction": f"What does function number {i} do?", "response": f"It returns the value {i % 5}."} for i in range(40)]


def tiny_pipeline(root: Path, model: Path, steps: int = 8) -> dict[str, Path]:
    from jobs.contract.configs.finetune import FinetuneConfig
    from jobs.contract.configs.preprocess import PreprocessConfig
    from jobs.finetuning.core import run as finetune
    from jobs.preprocessing.core import run as preprocess

    source = root / "d.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    paths = {"preprocess": root / "pre", "finetune": root / "ft"}
    preprocess(PreprocessConfig(input=str(source), output=str(paths["preprocess"]), base_model=str(model), eval_fraction=0.25), root / "w")
    finetune(FinetuneConfig(data=str(paths["preprocess"]), output=str(paths["finetune"]), base_model=str(model), max_steps=steps,
                            batch_size=4, sequence_length=48, learning_rate=2e-2, checkpoint_every=0), root / "w")
    return paths


def tiny_pipeline_processes(root: Path, model: Path, steps: int = 8) -> dict[str, Path]:
    """The same, each stage as its own process with its production backend (JAX), as the Jobs run: for tests
    whose own process runs another backend (convert on torch)."""
    import os

    from tests.conftest import run_module

    source = root / "d.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    paths = {"preprocess": root / "pre", "finetune": root / "ft"}
    env = {"KERAS_BACKEND": "jax", "STAGE_WORKDIR": str(root)}
    commands = {
        "jobs.preprocessing": ["--input", str(source), "--output", str(paths["preprocess"]), "--base-model", str(model),
                               "--eval-fraction", "0.25"],
        "jobs.finetuning": ["--data", str(paths["preprocess"]), "--output", str(paths["finetune"]), "--base-model",
                            str(model), "--max-steps", str(steps), "--batch-size", "4", "--sequence-length", "48",
                            "--learning-rate", "0.02", "--checkpoint-every", "0"],
    }
    for module, args in commands.items():
        result = run_module(module, *args, env={**os.environ, **env})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return paths
