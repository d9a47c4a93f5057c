"""Cloud Storage managed folders and their IAM policies (`gemma_pipeline.plan.access` says who gets what): the
`plan` task gives each stage write access to its own prefixes of the run, the `report` task takes it back, and
`serve` gives the serving identity read access to the champion's export alone. Through the storage client's own
`StorageControlClient`, with the task's `gcp_conn_id` credentials."""

from __future__ import annotations

from typing import Any

PACKAGE = "google-cloud-storage-control"  # the `airflow` extra pins it; Composer images may not carry it


def control_client(gcp_conn_id: str) -> Any:
    from airflow.providers.google.cloud.hooks.gcs import GCSHook
    from airflow.sdk.exceptions import AirflowFailException

    try:
        from google.cloud.storage_control_v2 import StorageControlClient
    except ImportError as err:
        raise AirflowFailException(f"managed folders need the {PACKAGE} package in the Airflow environment (the "
                                   f"project's `airflow` extra installs it): {err}") from err
    return StorageControlClient(credentials=GCSHook(gcp_conn_id=gcp_conn_id).get_credentials())


class Folders:
    def __init__(self, bucket: str, gcp_conn_id: str = "google_cloud_default", control: Any = None) -> None:
        self.bucket = bucket
        self.control = control if control is not None else control_client(gcp_conn_id)

    def _resource(self, folder: str) -> str:
        return f"projects/_/buckets/{self.bucket}/managedFolders/{folder}"

    def grant(self, grants: dict[str, list[str]], role: str) -> None:
        """Create each managed folder (an object-name prefix ending in `/`) and add `role` for its members to the
        folder's IAM policy, keeping what is there: a retry, or a user's own bindings, are left intact."""
        from google.api_core.exceptions import AlreadyExists
        from google.iam.v1 import policy_pb2

        for folder, members in grants.items():
            try:
                self.control.create_managed_folder(parent=f"projects/_/buckets/{self.bucket}", managed_folder={},
                                                   managed_folder_id=folder)
            except AlreadyExists:
                pass
            resource = self._resource(folder)
            policy = self.control.get_iam_policy(request={"resource": resource})
            binding = next((b for b in policy.bindings if b.role == role and not b.condition.expression), None)
            if binding is None:
                policy.bindings.append(policy_pb2.Binding(role=role))
                binding = policy.bindings[-1]
            missing = [m for m in members if m not in binding.members]
            if missing:
                binding.members.extend(missing)
                self.control.set_iam_policy(request={"resource": resource, "policy": policy})

    def revoke(self, prefix: str, role: str) -> list[str]:
        """Drop `role` from every managed folder under the object-name `prefix`; the folders changed."""
        changed = []
        pages = self.control.list_managed_folders(request={"parent": f"projects/_/buckets/{self.bucket}", "prefix": prefix})
        for folder in pages:
            resource = folder.name
            policy = self.control.get_iam_policy(request={"resource": resource})
            kept = [b for b in policy.bindings if b.role != role]
            if len(kept) != len(policy.bindings):
                del policy.bindings[:]
                policy.bindings.extend(kept)
                self.control.set_iam_policy(request={"resource": resource, "policy": policy})
                changed.append(resource.rsplit("/managedFolders/", 1)[1])
        return changed
