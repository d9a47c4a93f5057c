"""The main job's path end to end, short (CI's guard that the main command cannot silently break): the real DAG
through `airflow dags test` on the local backend, every stage as a real subprocess against the Cloud Storage
emulator, on a tiny model and two fine-tune steps, with two candidates (mapped tasks, a champion). The first run
asks for approval, as a person meets it: a real `airflow api-server` on the same metadata database refuses a
foreign candidate through the REST API (the request stays open), then Chromium opens Required Actions and
promotes the candidate that is not the automatic champion; the run converts that one. Then idempotency: the same
run again skips every stage, and a REST rejection serves nothing; an added candidate runs alone, and a changed
convert param reruns only convert; bad input fails once, unretried."""

from __future__ import annotations

import json
import re

import pytest
from gemma_pipeline.plan import approval

from tests.support import airflow_ui
from tests.support.browser import browser_available
from tests.support.local_run import BUCKET, _local_run, abandon, finish_local_run


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("local-run")


# The second candidate fine-tunes on a two-host profile: its Job becomes a JobSet, run as two processes that
# train together on jax.distributed (the multi-host path, for real, on this machine).
CANDIDATES = [{}, {"lora_rank": 8, "learning_rate": 0.001, "finetune_profile": "cpu-x2"}]


def _conf(tiny_gemma3, **overrides) -> dict:
    return {"base_model": str(tiny_gemma3), "max_steps": 2, "batch_size": 2, "max_tokens": 64, "sequence_length": 64,
            "run_name": "ci", "candidates": CANDIDATES, **overrides}


COMMENT = "fewer cut-offs <b>here</b>"


@pytest.fixture(scope="module")
def first_run(root, tiny_gemma3):
    """The run, with the answers a person and an API client gave it (`answers`)."""
    process, ui = airflow_ui.local_run_ui(root, _conf(tiny_gemma3, approval="required"))
    try:
        asked = airflow_ui.open_request(ui.url, process, token=ui.token)
        run_id = asked["task_instance"]["dag_run_id"]
        path = airflow_ui.hitl_path(ui.url, run_id)
        refused = airflow_ui.request(path, "PATCH", {"chosen_options": ["not-a-candidate"], "params_input": {}}, ui.token)
        still_open = airflow_ui.request(path, token=ui.token)[1]
        other = asked["options"][1]  # the candidate that is not the automatic champion
        if browser_available():
            shown = airflow_ui.answer_in_browser(ui, run_id, other, COMMENT)
        else:  # no Chromium here (CI requires it): the same answer through the API keeps the end-to-end guard
            shown = asked["body"]
            airflow_ui.request(path, "PATCH", {"chosen_options": [other], "params_input": {"comment": COMMENT}}, ui.token)
    except BaseException:
        abandon(process)
        raise
    result = finish_local_run(process)
    result.answers = {"asked": asked, "refused": refused, "still_open": still_open, "chosen": other, "shown": shown}
    return result


def test_a_person_promotes_another_candidate_and_only_it_is_converted(first_run, root):
    assert first_run.returncode == 0, first_run.stdout[-4000:] + first_run.stderr[-4000:]
    answers = first_run.answers
    prefix = root / "gcs" / BUCKET / "runs" / "ci"
    champion = json.loads((prefix / "champion.json").read_text())
    automatic, other = answers["asked"]["options"][0], answers["chosen"]
    assert answers["asked"]["options"] == [automatic, other, "Reject"] and automatic != other
    # The request showed the evidence: every candidate with its metrics, the answers side by side, the report.
    for text in ("Candidates", "95% interval", "Answers side by side", str(prefix / "report.html"), other):
        assert text in answers["shown"], text
    status, body = answers["refused"]
    assert status == 400 and "Invalid options ['not-a-candidate']" in body["detail"], body
    assert answers["still_open"]["response_received"] is False  # the refused answer left the request open
    assert champion["champion"] == other and champion["approval"]["selected"] == automatic
    assert champion["approval"]["decision"] == "overridden" and champion["approval"]["comment"] == COMMENT
    assert champion["approval"]["by"]["name"]  # who answered, as the api-server knows them
    assert [p.parent.name for p in (prefix / "candidates").glob("*/convert")] == [other]
    report = (prefix / "report.md").read_text()
    assert f"chosen over the automatic champion {automatic}" in report and "fewer cut-offs &lt;b&gt;here" in report
    assert "serve is none" in first_run.stdout  # nothing to serve on the local backend
    # The model cards of the export and of its adapter carry the decision; the Hub's parser reads them.
    from huggingface_hub import ModelCard

    convert = prefix / "candidates" / other / "convert"
    for card in (convert / "README.md", convert / "adapter" / "README.md"):
        data = ModelCard.load(card).data
        assert data.license == "gemma" and data.gemma_lora_pipeline["approval"]["comment"] == COMMENT
        assert data.gemma_lora_pipeline["metrics"]["perplexity"]["tuned"]["ci95"][0] is not None
        assert data.gemma_lora_pipeline["lineage"]["preprocess_manifest_sha256"]


def test_the_dag_runs_every_stage_and_writes_the_report(first_run, root):
    assert first_run.returncode == 0, first_run.stdout[-4000:] + first_run.stderr[-4000:]
    prefix = root / "gcs" / BUCKET / "runs" / "ci"
    report = json.loads((prefix / "report.json").read_text())
    assert report["complete"] is True
    champion = json.loads((prefix / "champion.json").read_text())
    finished = [c for c in champion["candidates"] if c["status"] == "finished"]
    assert len(finished) == 2 and len({c["tokens_sha256"] for c in finished}) == 1
    best = next(c for c in finished if c["key"] == champion["champion"])  # the promoted candidate
    assert report["champion"]["champion"] == best["key"] and report["approval"]["candidate"] == best["key"]
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


def _answered_by_api(root, conf: dict, choose) -> tuple:
    """A run answered by an API client alone: `choose(request)` gives the chosen option and the comment."""
    process, ui = airflow_ui.local_run_ui(root, conf)
    try:
        asked = airflow_ui.open_request(ui.url, process, token=ui.token)
        option, comment = choose(asked)
        path = airflow_ui.hitl_path(ui.url, asked["task_instance"]["dag_run_id"])
        answered = airflow_ui.request(path, "PATCH", {"chosen_options": [option], "params_input": {"comment": comment}},
                                      ui.token)
    except BaseException:
        abandon(process)
        raise
    result = finish_local_run(process)
    return result, asked, answered


def test_the_same_run_name_again_skips_every_finished_stage_and_the_api_promotes_the_same_candidate(first_run, root, tiny_gemma3):
    """The REST API does what the person did in the browser, and the rerun reuses every stage, convert included."""
    assert first_run.returncode == 0
    chosen = first_run.answers["chosen"]
    # The same answer as the person's (same user, candidate and comment): the converted export and its card stand.
    again, asked, answered = _answered_by_api(root, _conf(tiny_gemma3, approval="required"), lambda _: (chosen, COMMENT))
    assert again.returncode == 0, again.stdout[-4000:]
    assert answered[0] == 200 and answered[1]["chosen_options"] == [chosen], answered
    skipped = set(re.findall(r"SKIPPED: (gs://local-gemma-bucket/runs/ci/\S+) already", again.stdout))
    assert len(skipped) == 6  # 1 + 2 x 2 + 1 (each host of the two-host fine-tune says so)
    assert f"SKIPPED: gs://local-gemma-bucket/runs/ci/candidates/{chosen}/convert " in again.stdout
    report = json.loads((root / "gcs" / BUCKET / "runs" / "ci" / "report.json").read_text())
    # The report keeps the times of the run that did the work, and says the stages were reused.
    assert all(s["skipped"] for s in report["stages"]) and "| finetune | reused (skipped) |" in again.stdout
    assert report["approval"]["candidate"] == chosen and report["approval"]["comment"] == COMMENT


@pytest.mark.slow  # a third DAG run; the rejection itself is tested on the operator in tests/dags/test_approval.py
def test_a_rejected_run_converts_and_serves_nothing_and_says_so(first_run, root, tiny_gemma3):
    assert first_run.returncode == 0
    run, _, answered = _answered_by_api(root, _conf(tiny_gemma3, run_name="ci-rejected", approval="required", candidates=[{}]),
                                        lambda _: ("Reject", "not good enough yet"))
    assert answered[0] == 200 and run.returncode == 0, run.stdout[-4000:]
    prefix = root / "gcs" / BUCKET / "runs" / "ci-rejected"
    assert not list((prefix / "candidates").glob("*/convert"))
    assert json.loads((prefix / "champion.json").read_text())["approval"]["decision"] == "rejected"
    report = (prefix / "report.md").read_text()
    assert "REJECTED at approval: nothing was converted or served" in report and "not good enough yet" in report


@pytest.mark.slow  # a DAG run that waits out its timeout; the default itself is tested in tests/dags/test_approval.py
def test_nobody_answering_before_the_timeout_rejects_the_run(root, tiny_gemma3):
    """The default (Reject) applies when the deployment's timeout passes unanswered: by the scheduler's own sweep,
    which local_run runs beside `dags test`."""
    run = _local_run(root, _conf(tiny_gemma3, run_name="ci-timeout", approval="required", candidates=[{}]),
                     env={approval.TIMEOUT_ENV: "0.005"}, args=("--ui-port", "0"))  # 18 s, and no UI: nobody answers
    assert run.returncode == 0, run.stdout[-4000:]
    prefix = root / "gcs" / BUCKET / "runs" / "ci-timeout"
    assert not list((prefix / "candidates").glob("*/convert"))
    decision = json.loads((prefix / "champion.json").read_text())["approval"]
    assert decision["decision"] == "rejected" and decision["timed_out"] and decision["by"] is None, decision
    assert "before it timed out" in (prefix / "report.md").read_text()


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
