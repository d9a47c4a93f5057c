"""`RunStore`: the one Cloud Storage client of the Airflow side (tasks and triggers). On GKE it is the Google
provider's `GCSHook` client for the task's `gcp_conn_id` (Composer's credentials, or the connection's); on the local
backend, the emulator's anonymous client."""

from __future__ import annotations

import json
from typing import Any

from gemma_pipeline import local


class RunStore:
    """Reads and writes objects under the run prefix: the Composer worker's credentials on GKE, the emulator
    (anonymous) locally."""

    def __init__(self, backend: str, gcp_conn_id: str = "google_cloud_default") -> None:
        if backend == "local":
            self.client = local.storage_client()
        else:
            from airflow.providers.google.cloud.hooks.gcs import GCSHook

            self.client = GCSHook(gcp_conn_id=gcp_conn_id).get_conn()

    def _blob(self, uri: str) -> Any:
        bucket, _, name = uri.removeprefix("gs://").partition("/")
        return self.client.bucket(bucket).blob(name)

    def read(self, uri: str) -> bytes | None:
        from google.api_core.exceptions import NotFound

        try:
            return self._blob(uri).download_as_bytes()
        except NotFound:
            return None

    def read_json(self, uri: str) -> dict[str, Any] | None:
        data = self.read(uri)
        return json.loads(data) if data is not None else None

    def write(self, uri: str, data: bytes, content_type: str, if_generation_match: int | None = None) -> int:
        """Write an object and return its generation; with `if_generation_match` (0: only if absent) Cloud Storage
        refuses the write (PreconditionFailed) when the object changed, so a stale writer cannot overwrite."""
        blob = self._blob(uri)
        blob.upload_from_string(data, content_type=content_type, if_generation_match=if_generation_match)
        return int(blob.generation or 0)

    def read_generation(self, uri: str) -> tuple[bytes | None, int]:
        """The object's content and generation, read consistently; (None, 0) when absent."""
        from google.api_core.exceptions import NotFound, PreconditionFailed

        bucket, _, name = uri.removeprefix("gs://").partition("/")
        for _ in range(5):  # the object may change between the metadata and the content request
            blob = self.client.bucket(bucket).get_blob(name)
            if blob is None:
                return None, 0
            try:
                return blob.download_as_bytes(if_generation_match=blob.generation), int(blob.generation)
            except (NotFound, PreconditionFailed):
                continue
        raise RuntimeError(f"{uri} kept changing while being read")

    def delete(self, uri: str, if_generation_match: int | None = None) -> None:
        from google.api_core.exceptions import NotFound

        if if_generation_match is not None:
            # Checked by reading first too: fake-gcs-server ignores preconditions on delete (Cloud Storage does not).
            _, current = self.read_generation(uri)
            if current not in (0, if_generation_match):
                from google.api_core.exceptions import PreconditionFailed

                raise PreconditionFailed(f"{uri} is at generation {current}, not {if_generation_match}")
        try:
            self._blob(uri).delete(if_generation_match=if_generation_match)
        except NotFound:
            pass
