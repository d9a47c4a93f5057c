"""Triggers that also log the stage's live progress (`_progress.json` under its output prefix), so a
multi-hour fine-tune shows step, loss, tokens/s and ETA in the task log while it runs: the provider's GKE Job
trigger with that added, and a JobSet trigger (the provider has none) for multi-host stages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.providers.google.cloud.triggers.kubernetes_engine import GKEJobTrigger
from airflow.triggers.base import BaseTrigger, TriggerEvent

from jobs.contract import documents

JOBSET = ("jobset.x-k8s.io", "v1alpha2", "jobsets")


def read_progress(uri: str, gcp_conn_id: str = "google_cloud_default") -> dict[str, Any] | None:
    """The stage's progress document, through the task's connection (the same client as every task's reads)."""
    from gemma_pipeline.storage.store import RunStore

    data = RunStore("gke", gcp_conn_id).read(uri)
    return documents.PROGRESS.load(data, uri) if data is not None else None


async def report_progress(uri: str, interval: float, log: Any, gcp_conn_id: str = "google_cloud_default") -> None:
    last = None
    loop = asyncio.get_running_loop()
    while True:
        try:
            record = await loop.run_in_executor(None, read_progress, uri, gcp_conn_id)
        except Exception as err:  # progress is best effort
            log.debug("progress not readable: %s", err)
            record = None
        if record and record.get("line") != last:
            last = record.get("line")
            log.info("%s progress: %s", record.get("stage", "stage"), last)
        await asyncio.sleep(interval)


def jobset_state(jobset: dict[str, Any]) -> str | None:
    """"Completed" or "Failed" once the JobSet controller has decided, else None (still running or restarting)."""
    status = jobset.get("status") or {}
    if status.get("terminalState") in ("Completed", "Failed"):
        return status["terminalState"]
    for condition in status.get("conditions") or []:
        if condition.get("type") in ("Completed", "Failed") and condition.get("status") == "True":
            return condition["type"]
    return None


class JobSetTrigger(BaseTrigger):
    """Polls a JobSet until it reaches a terminal state, logging the stage's progress meanwhile."""

    def __init__(self, name: str, namespace: str, cluster_url: str, ssl_ca_cert: str, gcp_conn_id: str = "google_cloud_default",
                 impersonation_chain: Any = None, use_dns_endpoint: bool = False, poll_interval: float = 30.0,
                 progress_uri: str = "", progress_interval: float = 60.0) -> None:
        super().__init__()
        self.name, self.namespace = name, namespace
        self.cluster_url, self.ssl_ca_cert = cluster_url, ssl_ca_cert
        self.gcp_conn_id, self.impersonation_chain, self.use_dns_endpoint = gcp_conn_id, impersonation_chain, use_dns_endpoint
        self.poll_interval, self.progress_uri, self.progress_interval = poll_interval, progress_uri, progress_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{__name__}.JobSetTrigger", {
            "name": self.name, "namespace": self.namespace, "cluster_url": self.cluster_url,
            "ssl_ca_cert": self.ssl_ca_cert, "gcp_conn_id": self.gcp_conn_id,
            "impersonation_chain": self.impersonation_chain, "use_dns_endpoint": self.use_dns_endpoint,
            "poll_interval": self.poll_interval, "progress_uri": self.progress_uri,
            "progress_interval": self.progress_interval})

    async def read(self) -> dict[str, Any]:
        from airflow.providers.google.cloud.hooks.kubernetes_engine import GKEKubernetesAsyncHook
        from kubernetes_asyncio import client as async_client

        hook = GKEKubernetesAsyncHook(cluster_url=self.cluster_url, ssl_ca_cert=self.ssl_ca_cert,
                                      use_dns_endpoint=self.use_dns_endpoint, gcp_conn_id=self.gcp_conn_id,
                                      impersonation_chain=self.impersonation_chain)
        async with hook.get_conn() as connection:
            group, version, plural = JOBSET
            return await async_client.CustomObjectsApi(connection).get_namespaced_custom_object(
                group, version, self.namespace, plural, self.name)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        reporter = asyncio.create_task(report_progress(self.progress_uri, self.progress_interval, self.log, self.gcp_conn_id)) \
            if self.progress_uri else None
        try:
            while True:
                jobset = await self.read()
                state = jobset_state(jobset)
                if state:
                    yield TriggerEvent({"status": "success" if state == "Completed" else "error", "name": self.name,
                                        "namespace": self.namespace, "jobset": jobset,
                                        "message": f"JobSet {self.namespace}/{self.name} {state.lower()}"})
                    return
                await asyncio.sleep(self.poll_interval)
        finally:
            if reporter:
                reporter.cancel()


class ProgressGKEJobTrigger(GKEJobTrigger):
    def __init__(self, *args: Any, progress_uri: str = "", progress_interval: float = 60.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress_uri = progress_uri
        self.progress_interval = progress_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _, kwargs = super().serialize()
        return (f"{__name__}.ProgressGKEJobTrigger",
                {**kwargs, "progress_uri": self.progress_uri, "progress_interval": self.progress_interval})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        reporter = asyncio.create_task(report_progress(self.progress_uri, self.progress_interval, self.log, self.gcp_conn_id)) \
            if self.progress_uri else None
        try:
            async for event in super().run():
                yield event
        finally:
            if reporter:
                reporter.cancel()
