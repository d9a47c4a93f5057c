"""Candidates and the champion: the trigger form's schema, validation that names the candidate and field, stable
keys, the plan each mapped task runs, and the choice of the champion (pure functions; the real DAG runs them in
tests/reliability/test_local_dag.py)."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowFailException
from gemma_pipeline.operators import tasks
from gemma_pipeline.plan import candidates, form, jobspec

from jobs.contract import artifacts, documents

PARAMS = {**{name: default for name, (default, _) in form.specs().items()}, "bucket": "bkt", "run_name": None,
          "require_improvement": 0.0}


def _args(entry, stage):
    args = entry[stage]["arguments"]
    return dict(zip(args[::2], args[1::2], strict=True))


def test_the_schema_allows_exactly_the_fields_and_bounds_of_the_finetune_params():
    import jsonschema

    schema = candidates.schema()
    assert set(schema["items"]["properties"]) == set(candidates.FIELDS) and schema["items"]["additionalProperties"] is False
    jsonschema.validate([{}], schema)
    jsonschema.validate([{"lora_rank": 8, "learning_rate": 1e-3}, {"finetune_profile": "cpu", "max_train_examples": 64}], schema)
    for bad in ([], [{"lora_rnak": 8}], [{"lora_rank": 0}], [{"learning_rate": 1}], [{"finetune_profile": "tpu-v9"}], [{"lora_rank": "8"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


@pytest.mark.parametrize("value,message", [
    ([{}, {"lora_rnak": 8}], "candidates[1].lora_rnak: not a field a candidate can override (did you mean 'lora_rank'?)"),
    ([{"lora_rank": 0}], "candidates[0].lora_rank: got 0; expected an integer in [1, 512]"),
    ([{"learning_rate": 2.0}], "candidates[0].learning_rate: got 2.0;"),
    ([{"finetune_profile": "tpu-v9"}], "candidates[0].finetune_profile: got 'tpu-v9'; expected one of"),
    ([{"lora_rank": 8}, {"lora_rank": 8}], "candidates[1]: the same overrides as candidates[0]"),
    ([], "expected a list of 1 to 16 objects"),
    (["rank 8"], "candidates[0]: got 'rank 8'; expected an object of overrides"),
    ("[{", "expected a JSON list of objects"),
])
def test_a_bad_candidate_is_named_with_its_field(value, message):
    with pytest.raises(ValueError) as err:
        candidates.validate(value)
    assert message in str(err.value)


def test_keys_are_stable_readable_and_distinct():
    assert candidates.candidate_key({}) == "default"
    a = candidates.candidate_key({"lora_rank": 8, "learning_rate": 0.001})
    assert a == candidates.candidate_key({"learning_rate": 0.001, "lora_rank": 8}) and a.startswith("learning-rate-0-001-lora-rank-8-")
    assert a != candidates.candidate_key({"lora_rank": 8, "learning_rate": 0.002})
    assert len(candidates.candidate_key({f: 1 for f in candidates.FIELDS[:7]})) <= 49


def test_the_plan_shares_preprocessing_and_gives_each_candidate_its_own_folders():
    plan = candidates.plan({**PARAMS, "candidates": [{}, {"lora_rank": 8, "seed": 5, "finetune_profile": "cpu"}]}, "r1")
    entries = plan["candidates"]
    assert _args(plan, "preprocess")["--output"] == "gs://bkt/runs/r1/preprocess"
    assert plan["dataflow"]["parameters"]["output"] == "gs://bkt/runs/r1/preprocess"
    default, ranked = entries
    assert [e["index"] for e in entries] == [0, 1] and default["key"] == "default"
    for entry in entries:
        finetune, benchmark = _args(entry, "finetune"), _args(entry, "benchmark")
        assert finetune["--data"] == benchmark["--data"] == "gs://bkt/runs/r1/preprocess"  # identical eval rows
        assert finetune["--output"] == f"gs://bkt/runs/r1/candidates/{entry['key']}/finetune"
        assert benchmark["--finetune"] == finetune["--output"]
        assert benchmark["--require-improvement"] == "0.0"  # the gate judges the champion, in select
        assert _args(entry, "convert")["--finetune"] == finetune["--output"]
        assert entry["finetune"]["labels"][jobspec.CANDIDATE_LABEL] == entry["key"]
        assert entry["finetune"]["labels"][jobspec.RUN_LABEL] == "r1" and entry["finetune"]["labels"][jobspec.QUEUE_LABEL]
    assert _args(default, "finetune")["--lora-rank"] == str(PARAMS["lora_rank"])
    assert _args(ranked, "finetune")["--lora-rank"] == "8" and _args(ranked, "finetune")["--seed"] == "5"
    assert ranked["finetune"]["profile_name"] == "cpu" and default["finetune"]["profile_name"] == "tpu-v5e-1"


def test_model_parallel_must_divide_each_candidates_devices_per_host_before_any_job():
    entry = candidates.plan({**PARAMS, "model_parallel": 4, "finetune_profile": "tpu-v5e-16"}, "r1")["candidates"][0]
    assert _args(entry, "finetune")["--model-parallel"] == "4"  # 4 chips per host: the model spans one host
    for profile, devices in (("gpu-h100-8x2", 8), ("cpu", 1)):
        with pytest.raises(AirflowFailException, match=f"model_parallel: got 3; expected a divisor of the {devices} "
                                                       f"device\\(s\\) per host of profile '{profile}'"):
            tasks.plan_task({**PARAMS, "model_parallel": 3, "finetune_profile": profile}, "r1")


def _report(ppl, low, high, base=300.0, digest="abc"):
    split = lambda p, lo, hi: {"eval": {"perplexity": p, "ci95_low": lo, "ci95_high": hi, "tokens": 100,  # noqa: E731
                                        "tokens_sha256": digest}}
    return {"models": {"base": {"splits": split(base, base - 5, base + 5)}, "tuned": {"splits": split(ppl, low, high)}},
            "relative_improvement": (base - ppl) / base}


def _entries(n):
    return candidates.plan({**PARAMS, "candidates": [{}] + [{"lora_rank": 2 ** (i + 2)} for i in range(n - 1)]}, "r1")["candidates"]


def test_the_champion_is_the_lowest_perplexity_and_overlaps_are_said():
    entries = _entries(3)
    keys = [e["key"] for e in entries]
    record = candidates.select(entries, {keys[0]: _report(200, 190, 210), keys[1]: _report(180, 170, 195),
                                         keys[2]: _report(150, 140, 160)}, 0.0)
    assert record["champion"] == keys[2] and record["index"] == 2 and record["overlapping"] == []
    record = candidates.select(entries, {keys[0]: _report(200, 190, 210), keys[1]: _report(195, 185, 205), keys[2]: None}, 0.0)
    assert record["champion"] == keys[1] and record["overlapping"] == [keys[0]] and "may be noise" in record["why"]
    assert [r["status"] for r in record["candidates"]] == ["finished", "finished", "missing"]
    assert [r["champion"] for r in record["candidates"]] == [False, True, False]


def _with_answers(report, rouge, base_rouge, stops=0.5):
    """A report with generation metrics: per-example ROUGE-L `rouge` (a list) against the base's `base_rouge`."""
    def block(values):
        mean = sum(values) / len(values)
        return {"metrics": {"rouge_l": {"value": mean, "ci95_low": mean - 0.05, "ci95_high": mean + 0.05},
                            "stop_rate": {"value": stops, "ci95_low": 0.0, "ci95_high": 1.0}},
                "per_example": {"rouge_l": values, "stop_rate": [stops] * len(values)}}
    report["models"]["tuned"]["generation"], report["models"]["base"]["generation"] = block(rouge), block(base_rouge)
    report["generation"] = {"max_new_tokens": 48, "examples": len(rouge), "sampling": "greedy"}
    report["champion_metric"] = {"name": "rouge_l", "higher_is_better": True}
    return report


def test_the_champion_metric_chooses_and_gates_and_pairwise_differences_are_paired():
    entries = _entries(2)
    keys = [e["key"] for e in entries]
    base = [0.1] * 40
    # the second candidate has the worse perplexity but the better answers: ROUGE-L (auto) picks it
    reports = {keys[0]: _with_answers(_report(150, 140, 160), [0.2] * 40, base),
               keys[1]: _with_answers(_report(180, 170, 190), [0.3 + 0.01 * (i % 3) for i in range(40)], base)}
    record = candidates.select(entries, reports, 0.0)
    assert record["champion"] == keys[1] and record["champion_metric"] == {"name": "rouge_l", "higher_is_better": True}
    assert "highest eval rouge_l" in record["why"]
    difference = record["pairwise"][keys[0]]
    assert difference["value"] == pytest.approx(0.11, abs=1e-3) and difference["excludes_zero"]
    assert record["candidates"][1]["metrics"]["rouge_l"]["ci95"] == [pytest.approx(0.26, abs=1e-3), pytest.approx(0.36, abs=1e-3)]
    assert record["quality_gate"]["metric"] == "rouge_l" and record["quality_gate"]["relative_improvement"] == pytest.approx(2.1, abs=0.01)
    assert candidates.select(entries, reports, 0.9)["quality_gate"]["passed"]  # +210% ROUGE-L passes a 90% gate
    by_perplexity = candidates.select(entries, reports, 0.6, "perplexity")
    assert by_perplexity["champion"] == keys[0] and by_perplexity["pairwise"] == {}
    assert by_perplexity["quality_gate"] == {"required": 0.6, "metric": "perplexity", "relative_improvement": 0.5, "passed": False}
    with pytest.raises(ValueError, match="champion_metric: 'mc:acc' is not in the benchmark of"):
        candidates.select(entries, reports, 0.0, "mc:acc")


def test_candidates_whose_answers_were_generated_differently_are_not_compared():
    entries = _entries(2)
    reports = {e["key"]: _with_answers(_report(150, 140, 160), [0.2] * 4, [0.1] * 4) for e in entries}
    reports[entries[1]["key"]]["generation"]["max_new_tokens"] = 16
    with pytest.raises(ValueError, match="generated with different settings"):
        candidates.select(entries, reports, 0.0)


def test_candidates_scored_on_different_tokens_are_not_compared():
    entries = _entries(2)
    with pytest.raises(ValueError, match="different eval tokens"):
        candidates.select(entries, {entries[0]["key"]: _report(200, 1, 2), entries[1]["key"]: _report(100, 1, 2, digest="x")}, 0.0)
    with pytest.raises(ValueError, match="no candidate's benchmark finished"):
        candidates.select(entries, {}, 0.0)


class FakeStore:
    def __init__(self, objects):
        self.objects = {k: json.dumps(v).encode() for k, v in objects.items()}

    def read_json(self, uri):
        return json.loads(self.objects[uri]) if uri in self.objects else None

    def read(self, uri):
        return self.objects.get(uri)

    def write(self, uri, data, content_type):
        self.objects[uri] = data


def _store(entries, reports):
    objects = {}
    for entry, report in zip(entries, reports, strict=True):
        if report is not None:
            objects[f"{entry['prefixes']['benchmark']}/{artifacts.BENCHMARK_REPORT}"] = {documents.VERSION_KEY: 1, **report}
            objects[f"{entry['prefixes']['benchmark']}/{artifacts.MANIFEST}"] = {"stage": "benchmark"}
    return FakeStore(objects)


def test_select_records_the_champion_and_returns_the_converts_to_run():
    entries = _entries(3)
    reports = [_report(200, 190, 210), _report(150, 140, 160), _report(170, 165, 175)]
    store = _store(entries, reports)
    converts = tasks.record_champion(entries, {"require_improvement": 0.1}, store)
    assert converts == [entries[1]["convert"]]
    record = store.read_json("gs://bkt/runs/r1/champion.json")
    assert record["champion"] == entries[1]["key"] and record["convert_index"] == 0
    assert record["candidates"][1]["lineage"]["finetune"] == entries[1]["prefixes"]["finetune"] + "/_manifest.json"
    everything = tasks.record_champion(entries, {"convert_all": True}, _store(entries, reports))
    assert everything == [e["convert"] for e in entries]


def test_a_report_without_a_manifest_does_not_count_and_the_gate_judges_the_champion():
    entries = _entries(2)
    store = _store(entries, [_report(290, 280, 300), _report(100, 90, 110)])
    del store.objects[entries[1]["prefixes"]["benchmark"] + "/_manifest.json"]  # killed before the manifest
    with pytest.raises(AirflowFailException, match="require_improvement asks for 10.00%"):
        tasks.record_champion(entries, {"require_improvement": 0.1}, store)
    record = store.read_json("gs://bkt/runs/r1/champion.json")  # written before failing: the reason is on record
    assert record["champion"] == entries[0]["key"] and record["quality_gate"]["passed"] is False
