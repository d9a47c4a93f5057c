"""The model card: built from what the run recorded, read back by the Hub's own parser (`huggingface_hub.ModelCard`)."""

from __future__ import annotations

import pytest

from jobs.convert import card

REPORT = {"models": {
    "base": {"splits": {"eval": {"perplexity": 12.5, "ci95_low": 11.0, "ci95_high": 14.0}},
             "generation": {"metrics": {"rouge_l": {"value": 0.1, "ci95_low": 0.05, "ci95_high": 0.15}}}},
    "tuned": {"splits": {"eval": {"perplexity": 8.25, "ci95_low": 7.5, "ci95_high": 9.0}},
              "generation": {"metrics": {"rouge_l": {"value": 0.3, "ci95_low": 0.25, "ci95_high": 0.35}}},
              "tasks": {"arith": {"exact_match": {"value": 0.5, "ci95_low": 0.4, "ci95_high": 0.6}}}}}}
APPROVAL = {"decision": "overridden", "candidate": "lr-high", "selected": "default", "by": {"id": "alice", "name": "Alice"},
            "timed_out": False, "comment": "shorter `answers` | <script>"}  # what convert's --approval carries


def _card(kind: str = "model", **overrides):
    values = {"kind": kind, "base_model": "hf://google/gemma-3-270m-it", "dataset": "hf://org/support-tickets",
              "lineage": {"preprocess_manifest_sha256": "ab" * 32, "train_rows": 900},
              "training": {"lora_rank": 8, "learning_rate": 2e-4}, "report": REPORT, "approval": APPROVAL,
              "run": "r1", "candidate": "lr-high", "source": "convert without Keras"}
    return card.build(**{**values, **overrides})


def test_the_hubs_parser_reads_the_card_back(tmp_path):
    from huggingface_hub import ModelCard

    path = card.write(tmp_path, _card())
    assert path.name == "README.md"
    data = ModelCard.load(path).data
    assert data.base_model == "google/gemma-3-270m-it" and data.license == "gemma"
    assert data.license_link == card.GEMMA_TERMS and data.library_name == "transformers"
    assert data.datasets == ["org/support-tickets"] and {"lora", "gemma", "gemma-lora-pipeline"} <= set(data.tags)
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"perplexity": 8.25, "rouge_l": 0.3, "arith:exact_match": 0.5}
    record = data.gemma_lora_pipeline
    assert record["metrics"]["perplexity"] == {"tuned": {"value": 8.25, "ci95": [7.5, 9.0]},
                                               "base": {"value": 12.5, "ci95": [11.0, 14.0]}}
    assert record["approval"] == APPROVAL and record["lineage"]["train_rows"] == 900
    assert record["dataset"] == "hf://org/support-tickets" and record["training"]["lora_rank"] == 8
    text = path.read_text()
    assert "| `rouge_l` | 0.1 (0.05–0.15) | 0.3 (0.25–0.35) |" in text
    assert "Approved by `Alice`: chosen over the automatic champion `default`" in text
    assert "``shorter `answers` | <script>``" in text  # the approver's words in a code span, shown literally
    assert "## Intended use and limitations" in text and "Gemma Terms of Use" in text


def test_the_adapter_card_says_peft_and_a_base_off_the_hub_stays_out_of_the_front_matter(tmp_path):
    from huggingface_hub import ModelCard

    data = ModelCard.load(card.write(tmp_path, _card("adapter", base_model="gemma3_instruct_270m", dataset="gs://b/d.jsonl"))).data
    assert data.library_name == "peft" and data.base_model is None and data.datasets is None
    assert data.gemma_lora_pipeline["base_model"] == "gemma3_instruct_270m"


@pytest.mark.parametrize(("uri", "expected"), [("hf://google/gemma-3-1b-it", "google/gemma-3-1b-it"),
                                               ("hf://org/ds@main", "org/ds"), ("gs://b/x", None), ("demo:x", None)])
def test_hub_ids(uri, expected):
    assert card.hub_id(uri) == expected


def test_a_candidate_converted_beside_the_promoted_one_says_so(tmp_path):
    from huggingface_hub import ModelCard

    from jobs.contract import documents

    beside = {**APPROVAL, "decision": documents.NOT_APPROVED}
    path = card.write(tmp_path, _card(candidate="default", approval=beside))
    assert "Not the promoted candidate: converted beside `lr-high`" in path.read_text()
    assert ModelCard.load(path).data.gemma_lora_pipeline["approval"]["decision"] == documents.NOT_APPROVED
    assert "No approval record" in card.write(tmp_path, _card(approval=None)).read_text()
