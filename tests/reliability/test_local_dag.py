"""The main job's path end to end, short (CI's guard that the main command cannot silently break): the real DAG
through `airflow dags test` on the local backend, every stage as a real subprocess against the Cloud Storage
emulator, on a tiny model and two fine-tune steps, with two candidates (mapped tasks, a champion). Then
idempotency: the same run again skips every stage; an added candidate runs alone, and a changed convert param
reruns only convert; bad input fails once, unretried."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.local_run import BUCKET, _local_run


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("local-run")


# The second candidate fine-tunes on a two-host profile: its Job becomes a JobSet, run as two processes that
# train together on jax.distributed (the multi-host path, for real, on this machine).
CANDIDATES = [{}, {"lora_rank": 8, "learning_rate": 0.001, "finetune_profile": "cpu-x2"}]


def _conf(tiny_gemma3, **overrides) -> dict:
    return {"base_model": str(tiny_gemma3), "max_steps": 2, "batch_size": 2, "max_tokens": 64, "sequence_length": 64,
            "run_name": "ci", "candidates": CANDIDATES, **overrides}


@pytest.fixture(scope="module")
def first_run(root, tiny_gemma3):
    return _local_run(root, _conf(tiny_gemma3))


def test_the_dag_runs_every_stage_and_writes_the_report(first_run, root):
    assert first_run.returncode == 0, first_run.stdout[-4000:] + first_run.stderr[-4000:]
    prefix = root / "gcs" / BUCKET / "runs" / "ci"
    report = json.loads((prefix / "report.json").read_text())
    assert report["complete"] is True
    champion = json.loads((prefix / "champion.json").read_text())
    finished = [c for c in champion["candidates"] if c["status"] == "finished"]
    assert len(finished) == 2 and len({c["tokens_sha256"] for c in finished}) == 1
    best = min(finished, key=lambda c: c["perplexity"])
    assert champion["champion"] == best["key"] and report["champion"]["champion"] == best["key"]
    chosen = prefix / "candidates" / best["key"]
    for candidate in finished:  # each candidate trained and was scored in its own folder
        for stage in ("finetune", "benchmark"):
            assert (prefix / "candidates" / candidate["key"] / stage / "_manifest.json").exists()
    assert [p.name for p in (prefix / "candidates").glob("*/convert")] == ["convert"]  # only the champion
    assert "| candidate | overrides |" in first_run.stdout and "(champion)" in first_run.stdout
    assert [s["stage"] for s in report["stages"]] == ["preprocess", "finetune", "benchmark", "convert"]
    assert all(s["backend"] == "local" and s["seconds"] > 0 and s["peak_rss_bytes"] > 0 for s in report["stages"])
    assert report["summary"]["steps"] == 2 and report["summary"]["parity"]["passed"] is True
    assert report["summary"]["base_perplexity"] > 1 and report["summary"]["tuned_perplexity"] > 1
    assert report["params"]["max_steps"] == 2 and report["params"]["run_name"] == "ci"
    assert (prefix / "preprocess" / "_manifest.json").exists()
    assert (chosen / "convert" / "model.safetensors").exists() and (chosen / "finetune" / "adapter.lora.h5").exists()
    assert "data:image/png;base64," in (prefix / "report.html").read_text()
    # The task log carries the stage's own output, streamed from the subprocess.
    assert "stage finetune finished" in first_run.stdout and "jobs.finetuning" in first_run.stdout
    assert "as 2 processes of" in first_run.stdout and "[host 1]" in first_run.stdout  # the JobSet's two hosts
    assert "process 1 of 2 joined" in first_run.stdout
    # Nothing in a healthy CPU run's log reads like a failure: no CUDA probe errors from TensorFlow, no
    # missing-XCom errors from the provider's GKE link, no traceback.
    log = first_run.stdout + first_run.stderr
    assert [w for w in ("cuInit", "XCom not found", "Traceback") if w in log] == []
    # What the command prints at the end: artifact paths and the summary table.
    assert str(chosen / "convert" / "parity.json") in first_run.stdout
    profile = best.get("overrides", {}).get("finetune_profile", "tpu-v5e-1")  # the champion's fine-tune
    assert "| perplexity after |" in first_run.stdout and f"| finetune | done | {profile} |" in first_run.stdout


@pytest.mark.slow  # a second DAG run; the skip decision itself is tested in tests/jobs/common/test_manifest.py
def test_the_same_run_name_again_skips_every_finished_stage(first_run, root, tiny_gemma3):
    assert first_run.returncode == 0
    again = _local_run(root, _conf(tiny_gemma3))
    assert again.returncode == 0, again.stdout[-4000:]
    skipped = set(re.findall(r"SKIPPED: (gs://local-gemma-bucket/runs/ci/\S+) already", again.stdout))
    assert len(skipped) == 6  # 1 + 2 x 2 + 1 (each host of the two-host fine-tune says so)
    report = json.loads((root / "gcs" / BUCKET / "runs" / "ci" / "report.json").read_text())
    # The report keeps the times of the run that did the work, and says the stages were reused.
    assert all(s["skipped"] for s in report["stages"]) and "| finetune | reused (skipped) |" in again.stdout


@pytest.mark.slow  # a second DAG run (~100 s); candidate reuse is also covered by tests/dags/test_candidates.py
def test_an_added_candidate_runs_alone_and_a_changed_param_reruns_only_what_it_affects(first_run, root, tiny_gemma3):
    assert first_run.returncode == 0
    added = {"max_train_examples": 4, "seed": 3}
    changed = _local_run(root, _conf(tiny_gemma3, candidates=[*CANDIDATES, added], export_dtype="bfloat16"))
    assert changed.returncode == 0, changed.stdout[-4000:]
    from gemma_pipeline.plan.candidates import candidate_key

    runs = "gs://local-gemma-bucket/runs/ci"
    assert f"SKIPPED: {runs}/preprocess " in changed.stdout
    for candidate in CANDIDATES:
        for stage in ("finetune", "benchmark"):
            assert f"SKIPPED: {runs}/candidates/{candidate_key(candidate)}/{stage} " in changed.stdout
    new = candidate_key(added)
    assert f"SKIPPED: {runs}/candidates/{new}/finetune " not in changed.stdout
    assert changed.stdout.count("RUNNING finetune: no manifest yet") == 1  # the new candidate, alone
    champion = json.loads((root / "gcs" / BUCKET / "runs" / "ci" / "champion.json").read_text())
    assert len(champion["candidates"]) == 3
    convert = root / "gcs" / BUCKET / "runs" / "ci" / "candidates" / champion["champion"] / "convert" / "_manifest.json"
    assert json.loads(convert.read_text())["config"]["dtype"] == "bfloat16"


@pytest.mark.slow  # a DAG run; exit 2 -> no retry is tested on the operator in tests/dags/test_local.py
def test_bad_input_fails_at_once_without_retry_and_still_reports(first_run, root, tiny_gemma3):
    bad = _local_run(root, _conf(tiny_gemma3, run_name="ci-bad", response_field="no_such_column"))
    assert bad.returncode == 1
    assert "--response-field" in bad.stdout and "no_such_column" in bad.stdout
    assert "stage preprocess exited with code 2" in bad.stdout and "non-retriable" in bad.stdout
    # No retry of a bad-input failure (the exact task id: preprocess_engine and preprocess_dataflow share the prefix).
    assert len(re.findall(r"\[DAG TEST\] starting task_id=preprocess\b", bad.stdout)) == 1
    report = json.loads((root / "gcs" / BUCKET / "runs" / "ci-bad" / "report.json").read_text())
    assert report["complete"] is False and [s["done"] for s in report["stages"]] == [False] * 4
    assert "no candidate's benchmark finished" in bad.stdout


def test_D10_a_conf_key_that_is_not_a_param_fails_the_run_before_any_job(root, tiny_gemma3):
    """Airflow merges a trigger's conf into the task's params, typos included: the plan checks the conf against the
    DAG's declared Params, in a real run, and nothing is submitted."""
    run = _local_run(root, {"lora_rnak": 8, "run_name": "typo", "base_model": str(tiny_gemma3)}, timeout=240)
    assert run.returncode != 0
    assert "'lora_rnak' (did you mean 'lora_rank'?)" in run.stdout
    assert not re.search(r"\[DAG TEST\] starting task_id=preprocess\b", run.stdout)
    assert not (root / "gcs" / BUCKET / "runs" / "typo").exists()
