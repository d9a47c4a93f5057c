"""The `approve` task: a person promotes a candidate, or rejects the run, before anything is converted or served.

Built on the standard provider's `HITLOperator`: the request is a Required Action in the Airflow UI and a
`hitlDetails` resource of the REST API; on Airflow 3.3 the task waits in `awaiting_input`, held by no process, so a
scheduler or triggerer restart loses nothing. The options are the run's finished candidates (the automatic
champion first) and Reject, computed from `champion.json` when the task asks and again when it resumes, so the
same list is offered and checked. The decision is written into `champion.json` (`plan.approval`), and the task
returns the convert Jobs of the promoted candidate (or of every finished candidate with `convert_all`); a
rejection skips convert and serve. With `approval` = none it promotes the automatic champion without asking.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from gemma_pipeline import local
from gemma_pipeline.plan import approval, jobspec
from jobs.contract import artifacts, documents
from jobs.contract.layout import RunLayout


def report_link(prefix: str, backend: str) -> str:
    """Where a person reads the report: the Cloud Console's authenticated view of the object (GKE), or the
    emulator's file (local)."""
    uri = f"{prefix}/{artifacts.RUN_REPORT_HTML}"
    if backend == "local":
        return str(local.Emulator(local.local_root()).path_of(uri))
    return "https://storage.cloud.google.com/" + uri.removeprefix("gs://")


class PromoteOperator(HITLOperator):
    template_fields = (*HITLOperator.template_fields, "mode")

    def __init__(self, *, mode: str = "{{ params.approval }}", approvers: list[dict[str, str]] | None = None,
                 response_timeout: timedelta | None = None, gcp_conn_id: str = "google_cloud_default",
                 **kwargs: Any) -> None:
        for key in ("namespace", "wait_until_job_complete", "deferrable", "parallelism", "completions", "suspend",
                    "backoff_limit", "ttl_seconds_after_finished", "get_logs", "queue_timeout_s", "project_id",
                    "location", "cluster_name"):
            kwargs.pop(key, None)  # the stage Jobs' default_args, which this task does not take
        kwargs.pop("params", None)  # the DAG's, passed down by default: the request's form has only the comment
        super().__init__(
            subject="Promote a candidate of this run?", body=None, options=[approval.REJECT],
            defaults=[approval.REJECT],  # what the scheduler applies when the response times out
            params={approval.COMMENT: Param(None, type=["null", "string"], maxLength=2000, title="Comment",
                                            description="why: recorded with the decision in champion.json, the run "
                                                        "report and the model card")},
            assigned_users=approvers or None, response_timeout=response_timeout, **kwargs)
        self.mode, self.gcp_conn_id = mode, gcp_conn_id

    def _store(self) -> Any:
        from gemma_pipeline.storage.store import RunStore

        return RunStore(local.backend(), self.gcp_conn_id)

    def _record(self, context: Any, store: Any) -> tuple[RunLayout, dict[str, Any]]:
        entries = context["ti"].xcom_pull(task_ids="plan") or []
        if not entries:
            raise AirflowFailException("no candidates planned: nothing to promote (see the plan task's log)")
        layout = RunLayout(entries[0]["run_prefix"])
        data = store.read(layout.champion)
        if not data:
            raise AirflowFailException(f"no {layout.champion}: the select task wrote no champion to promote")
        # A retry after the decision was written asks again from what select chose, not from that decision.
        return layout, approval.undo(documents.CHAMPION.load(data, layout.champion), entries)

    def execute(self, context: Any) -> Any:
        if self.mode not in approval.MODES:
            raise AirflowFailException(f"approval: got {self.mode!r}; expected one of {', '.join(approval.MODES)}")
        with local.emulated():
            store = self._store()
            _, record = self._record(context, store)
            if self.mode == "none":
                return self.promote(context, store, record, approval.automatic(record))
            self.ask(context, store, record)
        return super().execute(context)  # writes the request and parks the task until someone answers

    def ask(self, context: Any, store: Any, record: dict[str, Any]) -> None:
        from gemma_pipeline.operators.report import publish
        from gemma_pipeline.plan.report import answers_sections, candidates_table, metrics_section

        report = publish(context, store, record["run_prefix"], asking=True)  # the request links to it
        sections = ["## Candidates\n", candidates_table(record) + "\n", *metrics_section(report), *answers_sections(report)]
        self.options = approval.options(record)
        self.subject = approval.subject(record)
        self.body = approval.body(record, sections, report_link(record["run_prefix"], local.backend()))
        self.log.info("asking for approval: options %s; answer under Required Actions in the Airflow UI or PATCH "
                      "/api/v2/dags/%s/dagRuns/%s/taskInstances/%s/-1/hitlDetails", self.options,
                      context["dag"].dag_id, context["run_id"], self.task_id)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        with local.emulated():
            store = self._store()
            _, record = self._record(context, store)
            self.options = approval.options(record)  # the list offered when the task asked
            super().execute_complete(context, event)  # the provider's checks: options, params
            try:
                decision = approval.decide(record, event)
            except ValueError as err:
                raise AirflowFailException(str(err)) from err
            return self.promote(context, store, record, decision)

    def promote(self, context: Any, store: Any, record: dict[str, Any], decision: dict[str, Any]) -> list[dict[str, Any]]:
        entries = context["ti"].xcom_pull(task_ids="plan")
        params = context["params"]
        keys = [k for k in approval.finished(record) if params.get("convert_all") or k == decision["candidate"]]
        keys = [e["key"] for e in entries if e["key"] in keys]  # the plan's order
        updated = approval.apply(record, decision, entries, keys if decision["candidate"] else None)
        layout = RunLayout(record["run_prefix"])
        store.write(layout.champion, documents.CHAMPION.dump(updated), "application/json")
        message = approval.summary(decision)
        self.log.info("%s (recorded in %s)", message, layout.champion)
        if decision["candidate"] is None:
            raise AirflowSkipException(message)  # convert and serve are skipped; the report says why
        return [self.convert_job(e, decision, params, len(keys)) for e in entries if e["key"] in keys]

    @staticmethod
    def convert_job(entry: dict[str, Any], decision: dict[str, Any], params: Any, count: int) -> dict[str, Any]:
        """A candidate's convert Job as planned, with the decision for its model card; the approved candidate's also
        exports the base when vLLM is to serve every adapter on it (serve=gke with several converted)."""
        job = dict(entry["convert"])
        record = json.dumps(approval.card_record(decision, entry["key"]), sort_keys=True)
        job["arguments"] = jobspec.with_option("convert", job["arguments"], "approval", record)
        if params.get("serve") == "gke" and count > 1 and entry["key"] == decision["candidate"]:
            job["arguments"] = jobspec.with_option("convert", job["arguments"], "export_base", True)
        return job
