"""A GKE Job trigger that also logs the stage's live progress (`_progress.json` under its output prefix),
so a multi-hour fine-tune shows step, loss, tokens/s and ETA in the task log while it runs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from airflow.providers.google.cloud.triggers.kubernetes_engine import GKEJobTrigger
from airflow.triggers.base import TriggerEvent


def read_progress(uri: str) -> dict[str, Any] | None:
    from google.cloud import storage

    bucket, _, path = uri.removeprefix("gs://").partition("/")
    blob = storage.Client().bucket(bucket).blob(path)
    return json.loads(blob.download_as_bytes()) if blob.exists() else None


class ProgressGKEJobTrigger(GKEJobTrigger):
    def __init__(self, *args: Any, progress_uri: str = "", progress_interval: float = 60.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress_uri = progress_uri
        self.progress_interval = progress_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _, kwargs = super().serialize()
        return (f"{__name__}.ProgressGKEJobTrigger",
                {**kwargs, "progress_uri": self.progress_uri, "progress_interval": self.progress_interval})

    async def _report_progress(self) -> None:
        last = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                record = await loop.run_in_executor(None, read_progress, self.progress_uri)
            except Exception as err:  # progress is best effort
                self.log.debug("progress not readable: %s", err)
                record = None
            if record and record.get("line") != last:
                last = record.get("line")
                self.log.info("%s progress: %s", record.get("stage", "stage"), last)
            await asyncio.sleep(self.progress_interval)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        reporter = asyncio.create_task(self._report_progress()) if self.progress_uri else None
        try:
            async for event in super().run():
                yield event
        finally:
            if reporter:
                reporter.cancel()
