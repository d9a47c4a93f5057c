"""Least privilege: one identity per role, writes confined to each role's own prefixes (the policy the docs give
and the `plan` task applies), the `production` priority class only for who the deployment names, and images
pinned by digest end to end. The Google APIs are faked at the client's boundary with the client's own types."""

from __future__ import annotations

import inspect
import re

import pytest
import yaml
from gemma_pipeline.plan import access, jobspec
from gemma_pipeline.plan.candidates import plan

from jobs.contract import artifacts, stages
from jobs.contract.layout import RunLayout
from tests.conftest import ROOT
from tests.support import nonempty

IDS = access.Identities(project="proj", worker="composer@proj.iam.gserviceaccount.com")
LAYOUT = RunLayout.of("bkt", "run-1")
KEYS = ["default", "lora-rank-16-ab12"]


def _grants() -> dict[str, tuple[str, ...]]:
    return access.folder_grants(LAYOUT, KEYS)


def _name(uri: str) -> str:
    return access.object_name(uri)


def test_each_stage_writes_only_its_own_prefixes():
    grants = nonempty(_grants(), "managed folders")
    assert len(grants) == 1 + 3 * len(KEYS) + 1  # + the benchmark's shared folder (the base's evaluation)
    shared = _name(LAYOUT.shared("benchmark")) + "/" + artifacts.base_evaluation("k")
    for stage in stages.NAMES:
        assert access.can_write(IDS, grants, IDS.member(stage), shared) is (stage == "benchmark"), stage
        member = IDS.member(stage)
        for key in KEYS:
            for other in stages.NAMES:
                target = _name(LAYOUT.stage(other, key)) + "/" + stages.get(other).writes[0]
                assert access.can_write(IDS, grants, member, target) is (other == stage), (stage, other, key)
        assert not access.can_write(IDS, grants, member, _name(LAYOUT.champion))
        assert not access.can_write(IDS, grants, member, _name(LAYOUT.file(artifacts.RUN_REPORT_HTML)))


def test_the_preprocess_identity_cannot_rewrite_what_serving_reads():
    """It parses untrusted input: it writes its own prefix, and neither champion.json nor any candidate's export."""
    preprocess = IDS.member("preprocess")
    assert access.can_write(IDS, _grants(), preprocess, _name(LAYOUT.stage("preprocess")) + "/train.jsonl")
    for key in KEYS:
        convert = _name(LAYOUT.stage("convert", key))
        for name in ("model.safetensors", "config.json", "adapter/adapter_model.safetensors"):
            assert not access.can_write(IDS, _grants(), preprocess, f"{convert}/{name}")
    assert not access.can_write(IDS, _grants(), preprocess, _name(LAYOUT.champion))
    assert not access.can_write(IDS, _grants(), preprocess, "runs/run-1/preprocess-evil/x")  # folders end in '/'
    # The Dataflow workers do the preprocess pod's job and get exactly its folder.
    assert access.can_write(IDS, _grants(), IDS.member(access.DATAFLOW), _name(LAYOUT.stage("preprocess")) + "/x")
    assert not access.can_write(IDS, _grants(), IDS.member(access.DATAFLOW), _name(LAYOUT.champion))


def test_only_the_worker_writes_the_runs_own_files_and_serving_writes_nothing():
    assert access.can_write(IDS, _grants(), IDS.worker_member, _name(LAYOUT.champion))
    serving = IDS.member(access.SERVING)
    assert not any(access.can_write(IDS, _grants(), serving, folder + "x") for folder in _grants())
    bindings = access.bucket_bindings(IDS)
    writers = {m for b in bindings if b["role"] in access.WRITES for m in b["members"]}
    assert writers == {IDS.worker_member}
    readers = nonempty([b for b in bindings if b["role"] == access.READ], "read bindings")[0]["members"]
    assert set(readers) == {IDS.member(r) for r in access.ROLES}


def test_the_gcloud_commands_grant_what_the_policy_says():
    cmds = nonempty(access.gcloud_commands(IDS, "bkt", "team-a", "serving"), "gcloud commands")
    for role in access.POD_ROLES:
        ns = "serving" if role == access.SERVING else "team-a"
        assert any(f"add-iam-policy-binding {IDS.gsa(role)} --role=roles/iam.workloadIdentityUser" in c
                   and f"proj.svc.id.goog[{ns}/gemma-{role}]" in c for c in cmds), role
    bucket_grants = [c for c in cmds if c.startswith("gcloud storage buckets add-iam-policy-binding")]
    assert len(bucket_grants) == 2 * len(access.ROLES) + 2
    assert all(c.endswith((f"--role={access.READ}", f"--role={access.BUCKET_READ}")) for c in bucket_grants
               if "composer@" not in c)
    run = nonempty(access.run_commands(IDS, "bkt", LAYOUT, KEYS), "per-run commands")
    assert "gcloud storage managed-folders create gs://bkt/runs/run-1/preprocess/" in run
    assert all("--role=roles/storage.objectUser" in c for c in run if "add-iam-policy-binding" in c)


class FakeStorageControl:
    """StorageControlClient at its boundary: each call is parsed with the API's own request type."""

    def __init__(self, existing: dict[str, object] | None = None) -> None:
        from google.iam.v1 import policy_pb2

        self.policies = dict(existing or {})
        self.created: list[str] = []
        self.set_calls = 0
        self._policy = policy_pb2.Policy

    def create_managed_folder(self, request=None, *, parent=None, managed_folder=None, managed_folder_id=None,
                              retry=None, timeout=None, metadata=()):
        from google.api_core.exceptions import AlreadyExists
        from google.cloud.storage_control_v2 import CreateManagedFolderRequest

        req = CreateManagedFolderRequest(parent=parent, managed_folder=managed_folder, managed_folder_id=managed_folder_id)
        assert req.parent == "projects/_/buckets/bkt" and req.managed_folder_id.endswith("/")
        resource = f"{req.parent}/managedFolders/{req.managed_folder_id}"
        if resource in self.policies:
            raise AlreadyExists(resource)
        self.created.append(req.managed_folder_id)
        self.policies[resource] = self._policy()

    def get_iam_policy(self, request=None, *, resource=None, retry=None, timeout=None, metadata=()):
        from google.iam.v1 import iam_policy_pb2

        req = iam_policy_pb2.GetIamPolicyRequest(**request)
        policy = self._policy()
        policy.CopyFrom(self.policies[req.resource])
        return policy

    def list_managed_folders(self, request=None, *, parent=None, retry=None, timeout=None, metadata=()):
        from google.cloud.storage_control_v2 import ListManagedFoldersRequest, ManagedFolder

        req = ListManagedFoldersRequest(**request)
        within = f"{req.parent}/managedFolders/{req.prefix}"
        return [ManagedFolder(name=r) for r in sorted(self.policies) if r.startswith(within)]

    def set_iam_policy(self, request=None, *, resource=None, retry=None, timeout=None, metadata=()):
        from google.iam.v1 import iam_policy_pb2

        req = iam_policy_pb2.SetIamPolicyRequest(**request)
        self.set_calls += 1
        self.policies[req.resource] = req.policy
        return req.policy


def test_the_fake_has_the_clients_signatures():
    from google.cloud.storage_control_v2 import StorageControlClient

    for name in ("create_managed_folder", "get_iam_policy", "set_iam_policy", "list_managed_folders"):
        real = [p for p in inspect.signature(getattr(StorageControlClient, name)).parameters]
        assert real == list(inspect.signature(getattr(FakeStorageControl, name)).parameters), name


def _params(**overrides) -> dict:
    from gemma_pipeline.plan import form

    return {**{name: default for name, (default, _) in form.specs("team-a").items()}, **overrides}


def test_the_plan_grants_each_folder_once_keeping_existing_bindings_and_the_report_takes_the_writes_back():
    from gemma_pipeline.operators.report import RunReportOperator
    from gemma_pipeline.operators.tasks import grant_folders
    from gemma_pipeline.storage.folders import Folders
    from google.iam.v1 import policy_pb2

    planned = plan(_params(bucket="bkt", candidates=[{}, {"lora_rank": 16}]), "run-1")
    keys = [c["key"] for c in planned["candidates"]]
    preprocess = "projects/_/buckets/bkt/managedFolders/runs/run-1/preprocess/"
    theirs = policy_pb2.Policy(bindings=[policy_pb2.Binding(role="roles/storage.objectViewer", members=["user:a@x.com"])])
    control = FakeStorageControl({preprocess: theirs})
    folders = Folders("bkt", control=control)
    grant_folders("bkt", planned, IDS, folders)
    assert sorted(control.created) == sorted(f for f in access.folder_grants(RunLayout(planned["run_prefix"]), keys)
                                             if "preprocess" not in f)
    bindings = {b.role: list(b.members) for b in control.policies[preprocess].bindings}
    assert bindings == {"roles/storage.objectViewer": ["user:a@x.com"],
                        access.WRITE: [IDS.member("preprocess"), IDS.member(access.DATAFLOW)]}
    calls = control.set_calls
    grant_folders("bkt", planned, IDS, folders)  # a retry of the plan task
    assert control.set_calls == calls

    # The report takes the writes back, and only them: the user's own binding stays, and another run's folders too.
    other = "projects/_/buckets/bkt/managedFolders/runs/run-10/preprocess/"
    control.policies[other] = policy_pb2.Policy(bindings=[policy_pb2.Binding(role=access.WRITE, members=["user:b@x.com"])])
    report = RunReportOperator(task_id="report", run_prefix=planned["run_prefix"], identities=IDS)
    changed = report.revoke_writes(folders)
    assert sorted(changed) == sorted(access.folder_grants(RunLayout(planned["run_prefix"]), keys))
    assert {b.role: list(b.members) for b in control.policies[preprocess].bindings} == {
        "roles/storage.objectViewer": ["user:a@x.com"]}
    assert not any(b.role == access.WRITE for r, p in control.policies.items() if r != other for b in p.bindings)
    assert [b.role for b in control.policies[other].bindings] == [access.WRITE]


def test_a_bucket_without_managed_folders_fails_the_plan_saying_what_to_do():
    from airflow.sdk.exceptions import AirflowFailException
    from gemma_pipeline.operators.tasks import grant_folders
    from google.api_core.exceptions import BadRequest

    class Refusing:
        def grant(self, grants, role):
            raise BadRequest("managed folders require uniform bucket-level access")

    planned = plan(_params(bucket="bkt"), "run-1")
    with pytest.raises(AirflowFailException, match=r"bucket: .*gs://bkt.*uniform bucket-level access.*"
                                                   r"GEMMA_PIPELINE_FOLDER_IAM=off"):
        grant_folders("bkt", planned, IDS, Refusing())


@pytest.mark.parametrize(("setting", "message"), [
    (lambda: access.folder_iam("yes"), "GEMMA_PIPELINE_FOLDER_IAM: got 'yes'; expected 'on'"),
    (lambda: access.Identities("p", "w", prefix="a-very-long-identity-prefix"),
     "GEMMA_PIPELINE_IDENTITY_PREFIX: got 'a-very-long-identity-prefix'; expected a lowercase letter"),
    (lambda: access.Identities("p", "w", prefix="Gemma"), "IDENTITY_PREFIX: got 'Gemma'")])
def test_a_bad_deployment_setting_is_refused_naming_it(setting, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        setting()
    assert access.folder_iam("off") is False and len(access.Identities("p", "w", prefix="x" * 18).gsa("preprocess")
                                                     .split("@")[0]) <= 30


@pytest.mark.parametrize(("allowed", "user", "ok"), [("", "alice", False), ("bob, carol", "alice", False),
                                                     ("bob, alice", "alice", True), ("*", None, True),
                                                     ("alice", None, False)])
def test_production_priority_only_for_who_the_deployment_names(allowed, user, ok):
    access.check_priority("development", user, "")  # development is for everyone
    if ok:
        access.check_priority("production", user, allowed)
        return
    with pytest.raises(ValueError, match=r"priority_class: got 'production' \(run triggered by .*\); expected "
                                         r"'development'.*GEMMA_PIPELINE_PRODUCTION_USERS"):
        access.check_priority("production", user, allowed)


def test_the_plan_task_refuses_production_without_retries(monkeypatch):
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException
    from gemma_pipeline.operators.tasks import plan_task

    monkeypatch.setenv(access.PRODUCTION_USERS_ENV, "bob")
    context = {"dag": SimpleNamespace(params={"priority_class": None, "bucket": None}),
               "dag_run": SimpleNamespace(conf={"priority_class": "production"}, triggering_user_name="alice")}
    with pytest.raises(AirflowFailException, match="'alice'.*allows it for 'bob'"):
        plan_task(_params(bucket="bkt", priority_class="production"), "run-1", context)


def test_the_checked_in_service_accounts_are_one_per_role_without_tokens():
    docs = [d for p in (ROOT / "k8s").rglob("serviceaccount*.yaml") for d in yaml.safe_load_all(p.read_text()) if d]
    accounts = {d["metadata"]["name"]: d for d in nonempty(docs, "ServiceAccounts")}
    assert set(accounts) == {f"gemma-{r}" for r in access.POD_ROLES}
    for role in access.POD_ROLES:
        account = accounts[f"gemma-{role}"]
        assert account["automountServiceAccountToken"] is False
        assert account["metadata"]["annotations"][access.WORKLOAD_IDENTITY_ANNOTATION] == access.EXAMPLE.gsa(role)


def test_images_can_be_pinned_by_digest_and_a_bad_digest_names_the_image():
    digest = "sha256:" + "ab" * 32
    images = jobspec.images("reg", "0.2.0", f'{{"convert": "{digest}"}}')
    assert images["convert"] == f"reg/convert:0.2.0@{digest}" and images["finetune"] == "reg/finetune:0.2.0"
    for bad, message in (('{"convrt": "x"}', "unknown image 'convrt'"), ('{"convert": "sha256:12"}', "digest of 'convert'"),
                         ("[1]", "got list"), ("{", "not JSON")):
        with pytest.raises(ValueError, match=f"GEMMA_PIPELINE_IMAGE_DIGESTS: .*{message}"):
            jobspec.images("reg", "0.2.0", bad)


def test_a_kubectl_job_pinned_by_digest_records_that_digest(tmp_path):
    """The settings component pins the image; the overlay copies it into the env the stage's code identity reads."""
    import shutil
    import subprocess

    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed (Debian package kubectl)")
    tree = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s" / "jobs", tree)
    settings = tree / "components" / "settings" / "kustomization.yaml"
    component = yaml.safe_load(settings.read_text())
    digest = "sha256:" + "cd" * 32
    for image in component["images"]:
        image["digest"] = digest
    settings.write_text(yaml.safe_dump(component))
    for overlay in ("preprocess", "finetune-multihost"):
        built = subprocess.run(["kubectl", "kustomize", str(tree / "overlays" / "example" / overlay)], check=True,
                               capture_output=True, text=True).stdout
        text = yaml.safe_dump([d for d in yaml.safe_load_all(built) if d and d["kind"] != "ConfigMap"])
        images = {line.split("image: ")[1] for line in text.splitlines() if "image: " in line}
        env = [line for line in text.splitlines() if digest in line and "image:" not in line]
        assert len(images) == 1 and next(iter(images)).endswith(f"@{digest}") and env, overlay
