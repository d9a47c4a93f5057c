"""Least privilege: one identity per role, and Cloud Storage writes confined to what each role produces.

Every stage pod and the serving pod runs as its own Kubernetes service account (`<prefix>-<role>`), bound through
Workload Identity to its own Google service account (`<prefix>-<role>@PROJECT.iam.gserviceaccount.com`). On the
bucket (uniform bucket-level access) those identities may only read; none may write bucket-wide. Writing happens
through Cloud Storage managed folders: the `plan` task creates, for its run, one managed folder per stage prefix
and grants that stage's identity `roles/storage.objectUser` on it alone, until the run's `report` task takes the
grant back (`storage.folders`). So the preprocess pod, which parses
untrusted input, can write `runs/RUN/preprocess/` and nothing else: not `champion.json` (only the Airflow worker,
Composer's own service account, writes the run's files), not a candidate's export that serving reads.

Pure functions: the policy as data (`bucket_bindings`, `folder_grants`), what it allows (`can_write`, the model the
tests check), the ServiceAccount objects and the `gcloud` commands docs/security.md gives.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from jobs.contract import spec, stages
from jobs.contract.layout import SHARED, RunLayout

SERVING = "serving"
DATAFLOW = "dataflow"  # the Dataflow workers of the Beam engine: they write what the preprocess pod would
ROLES = (*stages.NAMES, SERVING, DATAFLOW)
POD_ROLES = (*stages.NAMES, SERVING)  # the roles that run as Kubernetes pods (Dataflow runs its own VMs)
READ = "roles/storage.objectViewer"  # get and list objects
BUCKET_READ = "roles/storage.legacyBucketReader"  # the bucket's own metadata: the stages check that it exists
WRITE = "roles/storage.objectUser"  # create, overwrite and delete objects: a stage rewrites its prefix on a rerun
RUN_FILES = "roles/storage.objectAdmin"  # the worker: champion.json, the report, the lease
FOLDERS = "roles/storage.folderAdmin"  # the worker: creates each run's managed folders and sets their IAM
WORKLOAD_IDENTITY_USER = "roles/iam.workloadIdentityUser"
WORKLOAD_IDENTITY_ANNOTATION = "iam.gke.io/gcp-service-account"
WRITES = {"roles/storage.objectUser", "roles/storage.objectAdmin", "roles/storage.objectCreator", "roles/storage.admin"}


@dataclass(frozen=True)
class Identities:
    """A deployment's identities: `prefix` names every role's accounts; `worker` is the Composer environment's
    service account (the Airflow worker)."""

    project: str
    worker: str
    prefix: str = "gemma"

    def __post_init__(self) -> None:
        import re

        longest = max(len(r) for r in ROLES) + 1
        if not re.fullmatch(rf"[a-z][a-z0-9-]{{0,{29 - longest}}}", self.prefix):
            raise ValueError(f"GEMMA_PIPELINE_IDENTITY_PREFIX: got {self.prefix!r}; expected a lowercase letter then up to "
                             f"{29 - longest} lowercase letters, digits or '-' (a Google service account name, "
                             f"<prefix>-<role>, has at most 30 characters)")

    def ksa(self, role: str) -> str:
        if role not in POD_ROLES:
            raise ValueError(f"role: got {role!r}; expected one of {', '.join(POD_ROLES)}")
        return f"{self.prefix}-{role}"

    def gsa(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"role: got {role!r}; expected one of {', '.join(ROLES)}")
        return f"{self.prefix}-{role}@{self.project}.iam.gserviceaccount.com"

    def member(self, role: str) -> str:
        return f"serviceAccount:{self.gsa(role)}"

    @property
    def worker_member(self) -> str:
        return f"serviceAccount:{self.worker}"


# The values the checked-in manifests and docs/security.md show; a deployment sets its own (docs/deployment.md).
EXAMPLE = Identities(project="my-project", worker="composer-worker@my-project.iam.gserviceaccount.com")


def bucket_bindings(ids: Identities) -> list[dict[str, Any]]:
    """The bucket's IAM bindings: every role reads (objects, and the bucket's metadata); only the worker writes (the
    run's own files) and manages the runs' folders. Serving reads bucket-wide too: Cloud Storage FUSE lists at the
    bucket's scope, which a managed folder's grant does not satisfy."""
    readers = sorted(ids.member(r) for r in ROLES)
    return [{"role": READ, "members": readers}, {"role": BUCKET_READ, "members": readers},
            {"role": RUN_FILES, "members": [ids.worker_member]},
            {"role": FOLDERS, "members": [ids.worker_member]}]


def folder_grants(layout: RunLayout, candidates: list[str]) -> dict[str, tuple[str, ...]]:
    """A run's managed folders (object-name prefixes, ending in `/`) and the roles that write each."""
    grants: dict[str, tuple[str, ...]] = {}
    for stage in stages.NAMES:
        keys = candidates if stages.get(stage).per_candidate else candidates[:1]
        for key in keys:
            roles = (stage, DATAFLOW) if stage == "preprocess" else (stage,)
            grants[object_name(layout.stage(stage, key)) + "/"] = roles
        if any(opt.upstream == SHARED for opt in spec.options(stages.get(stage).config)):
            grants[object_name(layout.shared(stage)) + "/"] = (stage,)  # computed once per run, for every candidate
    return grants


def folder_iam(value: str) -> bool:
    """The deployment setting GEMMA_PIPELINE_FOLDER_IAM: a typo must not silently leave the stages without grants."""
    if value not in ("on", "off"):
        raise ValueError(f"GEMMA_PIPELINE_FOLDER_IAM: got {value!r}; expected 'on' (the plan task grants each stage its "
                         "folders) or 'off' (the bucket's IAM is managed elsewhere)")
    return value == "on"


def object_name(uri: str) -> str:
    return uri.removeprefix("gs://").partition("/")[2]


def can_write(ids: Identities, grants: dict[str, tuple[str, ...]], member: str, name: str) -> bool:
    """Whether `member` may create or overwrite the object `name` under this module's policy: a bucket-wide
    write role, or a write grant on a managed folder that contains it."""
    if any(b["role"] in WRITES and member in b["members"] for b in bucket_bindings(ids)):
        return True
    return any(name.startswith(folder) and member in {ids.member(r) for r in roles} for folder, roles in grants.items())


def service_accounts(ids: Identities, namespace: str, roles: tuple[str, ...]) -> list[dict[str, Any]]:
    """The Kubernetes service accounts, annotated for Workload Identity; none mounts an API token by default."""
    return [{"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": ids.ksa(r), **({"namespace": namespace} if namespace else {}),
                          "labels": {"app.kubernetes.io/part-of": "gemma-lora-pipeline", "gemma-lora-pipeline/role": r},
                          "annotations": {WORKLOAD_IDENTITY_ANNOTATION: ids.gsa(r)}},
             "automountServiceAccountToken": False} for r in roles]


def gcloud_commands(ids: Identities, bucket: str, namespace: str, serving_namespace: str) -> list[str]:
    """What a platform engineer runs once per deployment (docs/security.md shows them for the example values)."""
    q = shlex.quote
    cmds = [f"gcloud storage buckets update gs://{bucket} --uniform-bucket-level-access"]
    for role in ROLES:
        cmds.append(f"gcloud iam service-accounts create {ids.prefix}-{role} --project={q(ids.project)} "
                    f"--display-name={q(f'Gemma LoRA pipeline: {role}')}")
    for role in POD_ROLES:
        ns = serving_namespace if role == SERVING else namespace
        cmds.append(f"gcloud iam service-accounts add-iam-policy-binding {ids.gsa(role)} --role={WORKLOAD_IDENTITY_USER} "
                    f"--member={q(f'serviceAccount:{ids.project}.svc.id.goog[{ns}/{ids.ksa(role)}]')}")
    for binding in bucket_bindings(ids):
        for member in binding["members"]:
            cmds.append(f"gcloud storage buckets add-iam-policy-binding gs://{bucket} --member={q(member)} "
                        f"--role={binding['role']}")
    return cmds


def run_commands(ids: Identities, bucket: str, layout: RunLayout, candidates: list[str]) -> list[str]:
    """What the `plan` task does for each run, as `gcloud` commands (for a run started without the DAG)."""
    cmds = []
    for folder, roles in folder_grants(layout, candidates).items():
        cmds.append(f"gcloud storage managed-folders create gs://{bucket}/{folder}")
        cmds += [f"gcloud storage managed-folders add-iam-policy-binding gs://{bucket}/{folder} "
                 f"--member={shlex.quote(ids.member(r))} --role={WRITE}" for r in roles]
    return cmds


PRODUCTION = "production"  # the WorkloadPriorityClass that preempts other teams' work in the shared cohort
PRODUCTION_USERS_ENV = "GEMMA_PIPELINE_PRODUCTION_USERS"
PRODUCTION_USERS_VARIABLE = "gemma_pipeline_production_users"


def production_users() -> str:
    """Who may run at `production` priority: a comma-separated list of Airflow user names (`*`: anyone), from the
    environment, else the Airflow Variable; unset, no one."""
    import os

    value = os.environ.get(PRODUCTION_USERS_ENV)
    if value is None:
        from airflow.sdk import Variable

        value = Variable.get(PRODUCTION_USERS_VARIABLE, default="")
    return value or ""


def check_priority(priority_class: str, user: str | None, allowed: str) -> None:
    if priority_class != PRODUCTION:
        return
    names = sorted({n.strip() for n in allowed.split(",") if n.strip()})
    if "*" in names or (user and user in names):
        return
    raise ValueError(
        f"priority_class: got {PRODUCTION!r} (run triggered by {user or 'an unknown user'!r}); expected 'development': "
        f"{PRODUCTION!r} may preempt other teams' work, and this deployment allows it for "
        f"{', '.join(repr(n) for n in names) or 'no one'} ({PRODUCTION_USERS_ENV} or the Airflow Variable "
        f"{PRODUCTION_USERS_VARIABLE})")


DOC_START, DOC_END = "<!-- generated: gcloud commands -->", "<!-- end generated -->"


def render_doc(doc: str) -> str:
    """docs/security.md with its commands block filled from this module's policy, for the example deployment."""
    import re

    layout = RunLayout.of("my-gemma-bucket", "manual-001")
    block = ("```bash\n# Once per deployment\n" + "\n".join(gcloud_commands(EXAMPLE, "my-gemma-bucket", "team-a", "serving"))
             + "\n\n# Per run: what the plan task does (run manual-001, one candidate)\n"
             + "\n".join(run_commands(EXAMPLE, "my-gemma-bucket", layout, ["default"])) + "\n```")
    pattern = re.compile(re.escape(DOC_START) + r".*?" + re.escape(DOC_END), re.S)
    if not pattern.search(doc):
        raise ValueError(f"no {DOC_START} ... {DOC_END} markers to fill")
    return pattern.sub(lambda _: f"{DOC_START}\n{block}\n{DOC_END}", doc)
