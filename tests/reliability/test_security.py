"""Security: no secret in code, manifests, env literals, logs or artifacts; tokens only from Secrets; least
privilege pods; writes only under the run's prefix; no path traversal."""

from __future__ import annotations

import http.server
import json
import re
import threading

import pytest
import yaml
from gemma_pipeline import local
from gemma_pipeline.plan import jobspec, profiles

from jobs.contract import layout
from jobs.contract.layout import RunLayout
from tests.conftest import ROOT, run_module
from tests.support import nonempty

SECRET_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{30,}"),  # Hugging Face token
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\"private_key\"\s*:"),  # service-account JSON
    re.compile(r"(?i)(token|password|secret|api_key)\s*[=:]\s*[\"'][A-Za-z0-9_\-]{12,}[\"']"),
]
SCANNED = ["dags", "jobs", "k8s", "docker", "bench", "pyproject.toml", "README.md", ".ci"]


def test_no_secret_literals_in_the_repository():
    hits, scanned = [], 0
    for entry in SCANNED:
        path = ROOT / entry
        for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]:
            scanned += 1
            text = file.read_text(errors="ignore")
            hits += [f"{file.relative_to(ROOT)}: {m.group(0)[:30]}" for pattern in SECRET_PATTERNS for m in pattern.finditer(text)]
    assert scanned > 100 and hits == []  # the whole tree was read, and holds no secret


def _jobs(dag=None) -> list[dict]:
    """Every Job the project ships: the checked-in k8s/jobs tree (Jobs, and the Job inside each JobSet), and, given
    the DAG, the Job each of its stage tasks would submit."""
    found = []
    for path in sorted((ROOT / "k8s" / "jobs").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Job":
                found.append(doc)
            elif doc and doc.get("kind") == "JobSet":
                found += [{"spec": r["template"]["spec"]} for r in doc["spec"]["replicatedJobs"]]
    if dag is not None:
        from kubernetes.client import ApiClient

        from tests.support.dag import render, stage_task

        found += [ApiClient().sanitize_for_serialization(render(stage_task(dag, s), dag)) for s in jobspec.STAGES]
    return nonempty(found, "Job manifests")


def test_tokens_come_only_from_secret_references(dag):
    jobs = _jobs(dag)
    assert len(jobs) >= 2 * len(jobspec.STAGES)  # the kubectl tree's and the DAG's
    for job in jobs:
        for env in nonempty(job["spec"]["template"]["spec"]["containers"][0]["env"], "env entries"):
            if re.search(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL|USERNAME", env["name"]):
                assert "value" not in env, env
                ref = env["valueFrom"]["secretKeyRef"]
                assert ref["name"] == jobspec.TOKEN_SECRET_NAME and ref["optional"] is True
            else:
                assert "secretKeyRef" not in env.get("valueFrom", {}), env


def test_pods_run_with_least_privilege_and_workload_identity(dag):
    for job in _jobs(dag):
        pod = job["spec"]["template"]["spec"]
        container = pod["containers"][0]
        stage = job["spec"]["template"]["metadata"]["labels"][jobspec.STAGE_LABEL]
        assert pod["serviceAccountName"] == f"gemma-{stage}"  # its role's own account, bound to a Google one: no key files
        assert pod["automountServiceAccountToken"] is False  # no stage talks to the Kubernetes API
        profile = profiles.get(next(name for name, p in profiles.PROFILES.items() if p.node_selector == pod["nodeSelector"]
                                    and p.tolerations == tuple(pod.get("tolerations", ()))))
        assert job["spec"]["activeDeadlineSeconds"] == profile.deadline_s > 0
        assert container["resources"]["limits"]["memory"] == container["resources"]["requests"]["memory"]
        assert [v["emptyDir"]["sizeLimit"] for v in pod["volumes"]] == [profile.scratch]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["securityContext"] == {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                                "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
        assert not any(v.get("hostPath") for v in pod["volumes"])


@pytest.mark.parametrize("stage", jobspec.STAGES)
def test_every_stage_writes_only_under_the_runs_prefix(stage):
    layout = RunLayout.of("bkt", "run-7")
    args = jobspec.stage_args(stage, {}, layout.stages())
    assert args[args.index("--output") + 1] == layout.stage(stage) and layout.stage(stage).startswith("gs://bkt/runs/run-7/")


@pytest.mark.parametrize("name", ["../other-team", "a/b", "..", "UPPER", "x" * 70])
def test_run_names_cannot_escape_the_runs_folder(name, dag):
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        Param(name, **dag.params.get_param("run_name").schema).resolve(suppress_exception=False)
    assert "/" not in layout.run_key(name, "x") and ".." not in layout.run_key(name, "x")


@pytest.mark.parametrize("uri", ["gs://bkt/runs/../../etc", "gs://bkt/a/../b", "gs://../x"])
def test_storage_refuses_traversal(uri):
    from jobs.common import storage
    from jobs.contract.errors import BadInputError

    with pytest.raises(BadInputError, match=r"'\.\.'"):
        storage.split_gcs(uri)


class _RecordingHub(http.server.BaseHTTPRequestHandler):
    """A Hugging Face Hub stand-in that records what it was sent and refuses every request, as the real Hub does
    for a private dataset and a token without access."""

    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append(self.headers.get("Authorization", ""))
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Message", "Invalid credentials in Authorization header")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


def test_a_token_the_stage_sends_never_reaches_outputs_or_logs(tmp_path, tiny_gemma3):
    """The stage really reads HF_TOKEN and sends it (the stand-in Hub sees it), and a refused download, where
    a token is most likely to be echoed, keeps it out of the log and the outputs."""
    marker = "hf_" + "Z" * 34
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _RecordingHub.seen = []
    try:
        result = run_module("jobs.preprocessing", "--input", "hf://datasets/acme/private-set", "--output", str(tmp_path / "out"),
                            "--base-model", str(tiny_gemma3),
                            env={"HF_TOKEN": marker, "KAGGLE_KEY": marker, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
                                 "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")})
    finally:
        server.shutdown()
    assert f"Bearer {marker}" in _RecordingHub.seen, _RecordingHub.seen
    assert result.returncode == 2 and "HF_TOKEN can read" in result.stdout + result.stderr
    assert marker not in result.stdout + result.stderr
    for file in nonempty(list(tmp_path.rglob("*")), "files the stage wrote"):
        if file.is_file() and "hf" not in file.relative_to(tmp_path).parts[:1]:  # HF_HOME may cache the token
            assert marker not in file.read_text(errors="ignore"), file


def test_the_local_backend_passes_tokens_to_the_stage_not_to_the_log(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "Q" * 34)
    settings = jobspec.JobSettings(namespace="n", queue="q", service_account="s", image="i:1", profile=profiles.get("cpu"))
    container = local.container_of(jobspec.job_manifest("preprocess", settings, ["--output", "x"], name="j"))
    command, env = local.process_spec(container, tmp_path)
    assert env["HF_TOKEN"] == "hf_" + "Q" * 34
    assert not any("hf_" in part for part in command)  # the command line (which the task log shows) has no token
