"""`RunReportOperator`: writes the run report (`plan.report` renders it) after every stage, finished or not."""

from __future__ import annotations

import base64
import json
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from gemma_pipeline import local
from gemma_pipeline.plan import access, approval, jobspec, markup
from gemma_pipeline.plan.report import (
    CHARTS,
    GENERATIONS_BYTES,
    build,
    generation_rows,
    markdown,
    price_table,
    stage_prefixes,
    stage_table,
    summary_table,
)
from gemma_pipeline.storage import lease
from gemma_pipeline.storage.store import RunStore
from jobs.contract import artifacts, stages
from jobs.contract import documents as docs
from jobs.contract.layout import RunLayout


def read_head(store: RunStore, uri: str, max_bytes: int) -> bytes | None:
    """At most the first `max_bytes` of an object, by a ranged read, so a large file never reaches the worker
    whole; None when it is absent."""
    from google.api_core.exceptions import NotFound, RequestRangeNotSatisfiable

    bucket, _, name = uri.removeprefix("gs://").partition("/")
    try:
        return store.client.bucket(bucket).blob(name).download_as_bytes(start=0, end=max_bytes - 1)  # end inclusive
    except NotFound:
        return None
    except RequestRangeNotSatisfiable:  # an empty object has no byte 0 to start from
        return b""


def candidate_generations(store: RunStore, champion: dict[str, Any] | None,
                          max_bytes: int = GENERATIONS_BYTES) -> dict[str, list[dict[str, Any]]]:
    """The head of each finished candidate's generations.jsonl (`plan.report.generation_rows`), by candidate key;
    nothing is read when the benchmark skipped generation (raw text) or before champion.json exists."""
    if not champion or "skipped" in (champion.get("generation") or {}):
        return {}
    found: dict[str, list[dict[str, Any]]] = {}
    for row in champion.get("candidates", []):
        where = (row.get("prefixes") or {}).get("benchmark")
        if row.get("status") != "finished" or not where:
            continue
        data = read_head(store, f"{where}/{artifacts.GENERATIONS}", max_bytes)
        if data is not None:
            found[row["key"]] = generation_rows(data)
    return found


def publish(context: Any, store: RunStore, prefix: str, asking: bool = False) -> dict[str, Any]:
    """Render the run report from what the run has written so far and write report.{json,md,html}; the `approve`
    task publishes it before it asks (`asking`: the request links to it), the `report` task at the end. Before a
    promotion, or after a rejection, a convert output in the champion's folder is an earlier run's: not read."""
    layout = RunLayout(prefix)
    champion_data = store.read(layout.champion)
    champion = docs.CHAMPION.load(champion_data, layout.champion) if champion_data else None
    where = stage_prefixes(prefix, champion)
    if asking or approval.rejected(champion):
        where["convert"] = None
    read = lambda stage, name: store.read_json(f"{where[stage]}/{name}") if where[stage] else None  # noqa: E731
    manifests = {s: read(s, artifacts.MANIFEST) for s in stages.NAMES}
    documents = {"benchmark": read("benchmark", artifacts.BENCHMARK_REPORT), "parity": read("convert", artifacts.PARITY),
                 "answers": read("convert", artifacts.ANSWERS)}
    usages = usages_of(context, champion, convert=where["convert"] is not None)
    params = {k: (v.value if hasattr(v, "value") else v) for k, v in dict(context["params"]).items()}
    started = context["dag_run"].start_date if context.get("dag_run") else None
    report = build(prefix, params, manifests, documents, usages, price_table(), champion,
                   started.strftime("%Y-%m-%dT%H:%M:%SZ") if started else "", candidate_generations(store, champion),
                   asking=asking)
    images = {title: store.read(f"{where[stage]}/{name}") if where[stage] else None for title, (stage, name) in CHARTS.items()}
    relative = {t: f"{where[stage]}/{name}".removeprefix(prefix + "/") for t, (stage, name) in CHARTS.items() if where[stage]}
    md = markdown(report, {t: relative[t] for t, data in images.items() if data})
    inline = {t: "data:image/png;base64," + base64.b64encode(data).decode() for t, data in images.items() if data}
    store.write(layout.file(artifacts.RUN_REPORT_JSON), json.dumps(report, indent=2, default=str).encode(), "application/json")
    store.write(layout.file(artifacts.RUN_REPORT_MD), md.encode(), "text/markdown")
    store.write(layout.file(artifacts.RUN_REPORT_HTML), markup.to_html(markdown(report, inline)).encode(), "text/html")
    return report


def usages_of(context: Any, champion: dict[str, Any] | None, convert: bool = True) -> dict[str, dict | None]:
    """What each of the champion's tasks pushed: its map index among the candidates, and among the converts (none
    before a promotion or after a rejection: `convert` False, or a decision without a candidate)."""
    ti = context["ti"]
    usages = {"preprocess": ti.xcom_pull(task_ids="preprocess", key="usage")}
    if champion:
        usages["finetune"] = ti.xcom_pull(task_ids="candidate.finetune", key="usage", map_indexes=champion["index"])
        usages["benchmark"] = ti.xcom_pull(task_ids="candidate.benchmark", key="usage", map_indexes=champion["index"])
        if convert and ("approval" not in champion or champion["approval"].get("candidate")):
            usages["convert"] = ti.xcom_pull(task_ids="convert", key="usage", map_indexes=champion.get("convert_index", 0))
    return usages


class RunReportOperator(BaseOperator):
    """Writes the run report. Runs after every stage, finished or not, and fails (without retry) when a stage
    did not finish, so the report of a failed run exists and the run still shows as failed. With `identities`
    (on GKE) it then takes back the stages' write access to the run's folders: a finished run's outputs, the
    served export among them, are no stage's to rewrite (a rerun with the same run_name grants it again)."""

    template_fields = ("run_prefix",)

    def __init__(self, *, run_prefix: str = "", gcp_conn_id: str = "google_cloud_default",
                 identities: access.Identities | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_prefix = run_prefix
        self.gcp_conn_id = gcp_conn_id
        self.identities = identities

    def execute(self, context: Any) -> dict[str, Any]:
        self.run_prefix = self.run_prefix or jobspec.run_layout(context["params"], context["run_id"]).prefix
        backend = local.backend()
        if backend == "local":
            with local.Emulator(local.local_root()):
                report = self._write(context, RunStore(backend))
        else:
            report = self._write(context, RunStore(backend, self.gcp_conn_id))
            if self.identities is not None:
                self.revoke_writes()
        if not report["complete"] and not report.get("rejected"):
            missing = [r["stage"] for r in report["stages"] if not r["done"]]
            raise AirflowFailException(f"stages without a manifest: {', '.join(missing)}; report at {self.run_prefix}/{artifacts.RUN_REPORT_MD}")
        return {"report": f"{self.run_prefix}/{artifacts.RUN_REPORT_MD}", "summary": report["summary"]}

    def _write(self, context: Any, store: RunStore) -> dict[str, Any]:
        prefix = self.run_prefix.rstrip("/")
        run_id = context["dag_run"].run_id
        holder, _ = lease.holder(store, prefix)
        if holder is None:  # the plan task failed before taking the lease: the prefix is not this run's to write
            raise AirflowFailException(f"no report written: this run never took the lease on {prefix} (the plan task "
                                       "failed; see its log)")
        if holder.get("run_id") != run_id:  # this run lost the race for its run_name
            raise AirflowFailException(f"no report written: {prefix} belongs to DAG run {holder.get('run_id')!r}, "
                                       "and this run wrote nothing there")
        report = publish(context, store, prefix)
        self.log.info("run report: %s (and .html, .json)\n%s\n\n%s", RunLayout(prefix).file(artifacts.RUN_REPORT_MD),
                      summary_table(report), stage_table(report))
        if lease.release(store, prefix, run_id):
            self.log.info("released the lease on %s: the run_name is free for the next run", prefix)
        return report

    def revoke_writes(self, folders: Any = None) -> list[str]:
        from gemma_pipeline.storage.folders import Folders

        bucket, _, name = self.run_prefix.removeprefix("gs://").partition("/")
        changed = (folders or Folders(bucket, self.gcp_conn_id)).revoke(name.rstrip("/") + "/", access.WRITE)
        self.log.info("took back the stages' write access to %d folder(s) of %s", len(changed), self.run_prefix)
        return changed
