"""The bodies of the DAG's Python tasks: `plan` (check the trigger's conf, plan every stage's Job, take the run's
lease) and `select` (read each candidate's benchmark, choose the champion, record it). The choices themselves are
pure functions in `plan.candidates`."""

from __future__ import annotations

import difflib
from typing import Any

from gemma_pipeline import local
from gemma_pipeline.plan import access
from gemma_pipeline.plan.candidates import plan, select
from gemma_pipeline.storage import lease
from gemma_pipeline.storage.store import RunStore
from jobs.contract import artifacts, documents
from jobs.contract.configs.benchmark import AUTO
from jobs.contract.layout import RunLayout


def plan_task(params: dict[str, Any], run_key: str, context: Any = None, store: Any = None,
              identities: access.Identities | None = None) -> Any:
    """The `plan` task: a conf key that is not a Param, a bad candidate list or a priority class this deployment
    does not allow the triggering user fails the run at once, without retries (nothing has run yet); then the run
    takes the lease on its prefix (`lease`), or fails naming the active run that holds it, gives each stage's
    identity write access to its own prefixes (`identities`, on GKE), and returns the candidates (the
    preprocessing's Jobs go to XCom under their own keys). Without a `context` (unit tests of the plan) it takes no
    lease and returns the whole plan."""
    from airflow.sdk.exceptions import AirflowFailException

    if context is not None:
        check_conf(context)
    try:
        if context is not None and params.get("priority_class") == access.PRODUCTION:  # the Variable is read only then
            dag_run = context.get("dag_run")
            access.check_priority(params.get("priority_class", ""), getattr(dag_run, "triggering_user_name", None),
                                  access.production_users())
        planned = plan(params, run_key, task_file_reader(store))
    except ValueError as err:
        raise AirflowFailException(str(err)) from err
    if context is None:
        return planned
    if store is None and local.backend() == "local":
        with local.Emulator(local.local_root()) as emulator:
            emulator.ensure_bucket(params["bucket"])
            return plan_task(params, run_key, context, RunStore("local"))  # the emulator has no IAM to grant
    from google.api_core.exceptions import NotFound

    run = context["dag_run"]
    try:
        lease.acquire(store or RunStore(local.backend()), planned["run_prefix"],
                      {"dag_id": run.dag_id, "run_id": run.run_id}, lease.dag_run_active(context))
    except lease.LeaseHeld as err:
        raise AirflowFailException(str(err)) from err
    except NotFound as err:
        raise AirflowFailException(f"bucket: got {params['bucket']!r}; expected an existing Cloud Storage bucket "
                                   f"({err})") from err
    if identities is not None:
        grant_folders(params["bucket"], planned, identities)
    # The candidates are what the mapped tasks expand over (a mapped task expands only over a return value); the
    # preprocessing's two engines read their share under their own keys.
    for key in ("preprocess", "dataflow"):
        context["ti"].xcom_push(key=key, value=planned[key])
    return planned["candidates"]


def task_file_reader(store: Any = None) -> Any:
    """How `plan` reads an `eval_tasks` YAML file: a local path, or a gs:// object (on the local backend, the
    emulator's file, so the check needs no running emulator)."""
    from pathlib import Path

    def read(uri: str) -> bytes:
        if not uri.startswith("gs://"):
            return Path(uri).read_bytes()
        if store is None and local.backend() == "local":
            return local.Emulator(local.local_root()).path_of(uri).read_bytes()
        data = (store or RunStore(local.backend())).read(uri)
        if data is None:
            raise FileNotFoundError(f"no object {uri}")
        return data
    return read


def grant_folders(bucket: str, planned: dict[str, Any], identities: access.Identities, folders: Any = None,
                  gcp_conn_id: str = "google_cloud_default") -> None:
    """Each stage's identity gets write access to its own managed folders of this run, and to nothing else."""
    from airflow.sdk.exceptions import AirflowFailException
    from google.api_core.exceptions import GoogleAPICallError

    from gemma_pipeline.storage.folders import Folders

    grants = access.folder_grants(RunLayout(planned["run_prefix"]), [c["key"] for c in planned["candidates"]])
    members = {folder: [identities.member(r) for r in roles] for folder, roles in grants.items()}
    try:
        (folders or Folders(bucket, gcp_conn_id)).grant(members, access.WRITE)
    except GoogleAPICallError as err:
        raise AirflowFailException(
            f"bucket: could not give the stages' identities their managed folders in gs://{bucket} ({err}); expected "
            f"a bucket with uniform bucket-level access where {identities.worker} holds {access.FOLDERS} "
            "(docs/security.md), or GEMMA_PIPELINE_FOLDER_IAM=off where the bucket's IAM is managed otherwise") from err


def check_conf(context: Any) -> None:
    """Refuse a trigger whose conf names a key that is not a Param (a typo such as `lora_rnak` would otherwise
    be ignored and the run would train with the default), before any Job is submitted. The known keys are the
    DAG's declared Params, not the task's `params`: Airflow merges the conf into those, typos included."""
    dag_run = context.get("dag_run")
    conf = getattr(dag_run, "conf", None) or {}
    known = set(context["dag"].params)
    unknown = sorted(set(conf) - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"the trigger's conf has keys that are not params of this DAG: {', '.join(hints)}; "
                                   f"expected only: {', '.join(sorted(known))}")


def select_task(entries: list[dict[str, Any]] | None, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The `select` task. It runs after failed candidates too (all_done), so it also runs when the `plan` task
    failed: then there is nothing to choose from, and a retry cannot change that."""
    from airflow.sdk.exceptions import AirflowFailException

    if not entries:
        raise AirflowFailException("the plan task did not finish: no candidates to choose from (see the plan task's log)")
    return record_champion(entries, params)


def record_champion(entries: list[dict[str, Any]], params: dict[str, Any], store: Any = None) -> list[dict[str, Any]]:
    """The `select` task: read each candidate's benchmark (complete only with its manifest), choose, write
    `runs/RUN/champion.json`, and return the convert Jobs the automatic choice would run: the champion's, or every
    finished candidate's with `convert_all` (the `approve` task decides what convert runs). A champion that fails
    the quality gate stops the run after the record."""
    from airflow.sdk.exceptions import AirflowFailException


    if store is None and local.backend() == "local":
        with local.Emulator(local.local_root()):
            return record_champion(entries, params, RunStore("local"))
    store = store or RunStore(local.backend())
    layout = RunLayout(entries[0]["run_prefix"])
    reports, seconds, splits = {}, {}, {}
    for entry in entries:
        manifests = {s: store.read_json(f"{entry['prefixes'][s]}/{artifacts.MANIFEST}") for s in ("finetune", "benchmark")}
        report_uri = f"{entry['prefixes']['benchmark']}/{artifacts.BENCHMARK_REPORT}"
        reports[entry["key"]] = documents.BENCHMARK.load(store.read(report_uri), report_uri) if manifests["benchmark"] else None
        seconds[entry["key"]] = {s: (m or {}).get("wall_time_s") for s, m in manifests.items()}
        splits[entry["key"]] = {s: documents.time_split(m) for s, m in manifests.items() if documents.time_split(m)}
    run_prefix = layout.prefix
    try:
        record = select(entries, reports, float(params.get("require_improvement") or 0),
                        params.get("champion_metric") or AUTO, int(params.get("bootstrap") or 0), int(params.get("seed") or 0))
    except ValueError as err:
        raise AirflowFailException(str(err)) from err
    record["run_prefix"] = run_prefix
    for row, entry in zip(record["candidates"], entries, strict=True):
        row["seconds"] = seconds[entry["key"]]
        row["time_split"] = splits[entry["key"]]
        row["profiles"] = {"finetune": entry["finetune"]["profile_name"], "benchmark": entry["benchmark"]["profile_name"]}
    finished = {r["key"] for r in record["candidates"] if r["status"] == "finished"}
    converts = [e for e in entries if e["key"] in (finished if params.get("convert_all") else {record["champion"]})]
    record["convert_index"] = [e["key"] for e in converts].index(record["champion"])
    store.write(layout.champion, documents.CHAMPION.dump(record), "application/json")
    if not record["quality_gate"]["passed"]:
        gate = record["quality_gate"]
        gain = "n/a" if gate["relative_improvement"] is None else f"{gate['relative_improvement']:.2%}"
        raise AirflowFailException(f"champion {record['champion']} improved {gate['metric']} over the base by {gain}; "
                                   f"require_improvement asks for {gate['required']:.2%}; see {layout.champion}")
    return [entry["convert"] for entry in converts]
