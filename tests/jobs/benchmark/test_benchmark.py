from __future__ import annotations

import json

import numpy as np
import pytest

from jobs.benchmark import perplexity as ppl
from jobs.benchmark.core import run
from jobs.contract.artifacts import MANIFEST
from jobs.contract.configs.benchmark import BenchmarkConfig
from jobs.contract.configs.convert import ConvertConfig
from jobs.contract.errors import BadInputError, QualityGateError
from jobs.convert.core import run as convert


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_run):
    root = tmp_path_factory.mktemp("bench")
    paths = tiny_run
    convert(ConvertConfig(finetune=str(paths["finetune"]), output=str(root / "hf")), root / "w")
    return {**paths, "hf": root / "hf", "root": root}


def hf_perplexity(model_dir, rows, mode: str, max_length: int, stride: int, separator: str = "\n\n") -> float:
    """Independent reference through transformers, following the perplexity guide's loop with exact
    token counts (targets before `prev_end` are set to -100 and excluded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    nll_sum, n_tokens = 0.0, 0

    def add(input_ids, labels):
        nonlocal nll_sum, n_tokens
        with torch.no_grad():
            logits = model(torch.tensor([input_ids])).logits[0, :-1].float()
        targets = torch.tensor(labels[1:])
        keep = targets != -100
        losses = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
        nll_sum += float(losses)
        n_tokens += int(keep.sum())

    if mode == "text":
        ids = tokenizer(separator.join(r["prompt"] + r["response"] for r in rows))["input_ids"]  # adds BOS
        prev_end = 0
        for begin in range(0, len(ids), stride):
            end = min(begin + max_length, len(ids))
            trg_len = end - prev_end
            window = ids[begin:end]
            labels = list(window)
            labels[: len(window) - trg_len] = [-100] * (len(window) - trg_len)
            add(window, labels)
            prev_end = end
            if end == len(ids):
                break
    else:
        for row in rows:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
            ids = [tokenizer.bos_token_id, *prompt, *response, tokenizer.eos_token_id][:max_length]
            add(ids, [-100] * (1 + len(prompt)) + ids[1 + len(prompt):])
    return float(np.exp(nll_sum / n_tokens))


@pytest.mark.parametrize("mode", ["response", "text"])
def test_perplexity_matches_transformers(pipeline, tiny_gemma3, tmp_path, mode):
    cfg = BenchmarkConfig(data=str(pipeline["preprocess"]), finetune=str(pipeline["finetune"]), output=str(tmp_path / "b"),
                          base_model=str(tiny_gemma3), mode=mode, max_length=40, stride=16, bootstrap=200, max_new_tokens=0)
    result = run(cfg, tmp_path / "w")
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    rows = [json.loads(line) for line in (pipeline["preprocess"] / "eval.jsonl").read_text().splitlines()]
    reference = hf_perplexity(pipeline["hf"], rows, mode, 40, 16)
    ours = report["models"]["tuned"]["splits"]["eval"]["perplexity"]
    assert abs(ours - reference) / reference < 1e-3, (ours, reference)
    base = report["models"]["base"]["splits"]["eval"]
    assert base["ci95_low"] <= base["perplexity"] <= base["ci95_high"]
    assert base["tokens"] == report["models"]["tuned"]["splits"]["eval"]["tokens"] > 0
    assert report["relative_improvement"] > 0 and result["metrics"]["relative_improvement"] == report["relative_improvement"]
    assert (tmp_path / "b" / "perplexity.png").stat().st_size > 1000 and (tmp_path / "b" / MANIFEST).exists()


def test_quality_gate_fails_without_manifest(pipeline, tiny_gemma3, tmp_path):
    (tmp_path / "ood.txt").write_text("Some other text entirely.\n\nAnd a second paragraph about cats.")
    cfg = BenchmarkConfig(data=str(pipeline["preprocess"]), finetune=str(pipeline["finetune"]), output=str(tmp_path / "b"),
                          base_model=str(tiny_gemma3), max_length=48, require_improvement=0.99, ood_text=str(tmp_path / "ood.txt"),
                          champion_metric="perplexity", max_new_tokens=0)
    with pytest.raises(QualityGateError, match="expected at least 99.00%"):
        run(cfg, tmp_path / "w")
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["quality_gate"] == {"required": 0.99, "metric": "perplexity", "passed": False}
    assert report["models"]["base"]["splits"]["ood"]["tokens"] > 0
    assert not (tmp_path / "b" / MANIFEST).exists()


def test_a_base_other_than_the_fine_tunes_is_refused(pipeline, tiny_gemma, tmp_path):
    """The tuned model is the base with the fine-tune's adapter folded in: on another base it would be nonsense."""
    cfg = BenchmarkConfig(data=str(pipeline["preprocess"]), finetune=str(pipeline["finetune"]), output=str(tmp_path / "b"),
                          base_model=str(tiny_gemma), max_new_tokens=0)
    with pytest.raises(BadInputError, match="--base-model.*the base the fine-tune trained"):
        run(cfg, tmp_path / "w")


def test_windows_score_every_token_once():
    tokens, owner = ppl.stream([[5, 6, 7, 8], [9, 10], [11, 12, 13]], [3], bos=2)
    windows = ppl.sliding_windows(tokens, owner, max_length=5, stride=2, pad_id=0)
    scored = [windows.y[i, j] for i, j in zip(*np.nonzero(windows.weights))]
    assert scored == list(tokens[1:])
    assert windows.doc[windows.weights > 0].tolist() == owner[1:].tolist()


@pytest.mark.parametrize("kwargs", [{"mode": "tokens"}, {"stride": 600, "max_length": 512}, {"require_improvement": 1.5, "finetune": "x"},
                                    {"require_improvement": 0.1}])
def test_config_validation(kwargs):
    with pytest.raises(BadInputError):
        BenchmarkConfig(data="d", output="o", **kwargs)
