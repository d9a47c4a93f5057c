"""Where a stage's time goes: phases nest, JAX's compilations are moved out of compute, and the persistent
compilation cache is shared by processes (a local directory, or a gs:// prefix mirrored to scratch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from jobs.common import compilation, quiet, timing
from jobs.contract import documents
from jobs.contract.env import COMPILATION_CACHE_ENV
from tests.conftest import ROOT


def test_phases_nest_and_add_up_to_the_wall_time():
    clock = timing.Clock(started=time.time() - 1.0)  # a second of "imports" before the clock existed
    with clock.phase("model_load"):
        time.sleep(0.05)
        with clock.phase("staging"):  # a download inside a load is staging, not loading
            time.sleep(0.1)
    clock.begin("compute")
    time.sleep(0.05)
    split = clock.split()
    assert set(split) == set(documents.PHASES)
    assert split["imports"] >= 1.0 and 0.1 <= split["staging"] < 0.2 and 0.05 <= split["model_load"] < 0.1
    assert split["compute"] >= 0.05
    with pytest.raises(ValueError, match="expected one of"):
        with clock.phase("thinking"):
            pass


def test_compilation_is_counted_apart_from_compute():
    import jax
    import jax.numpy as jnp

    clock = timing.Clock()
    timing._CLOCK, saved = clock, timing._CLOCK
    try:
        clock.listen_to_jax(jax.monitoring)
        with clock.phase("compute"):
            fn = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0))
            fn(jnp.ones((33, 17))).block_until_ready()
        split = clock.split()
    finally:
        timing._CLOCK = saved
    assert split["compilation"] > 0 and split["compute"] >= 0


PROGRAM = """
import json, sys
from pathlib import Path
import jax, jax.numpy as jnp
from jobs.common import compilation, timing
cache = compilation.enable_cache(Path(sys.argv[1]))
jax.jit(lambda x: jnp.sin(x @ x.T).sum())(jnp.ones((31, 7))).block_until_ready()
cache.save()
print(json.dumps(timing.clock().record()))
"""


def _compile_in_a_process(workdir, env):
    result = subprocess.run([sys.executable, "-c", PROGRAM, str(workdir)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
                                              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **env})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])[documents.COMPILE_CACHE]


def test_a_second_process_reads_what_the_first_compiled(tmp_path):
    env = {COMPILATION_CACHE_ENV: str(tmp_path / "shared-cache")}
    first = _compile_in_a_process(tmp_path / "a", env)
    second = _compile_in_a_process(tmp_path / "b", env)
    assert first["misses"] >= 1 and first["hits"] == 0
    assert second["hits"] >= 1 and second["misses"] == 0


def test_gcs_cache_mirrors_to_scratch(tmp_path, gcs):
    shutil.rmtree(compilation.MIRROR, ignore_errors=True)
    env = {COMPILATION_CACHE_ENV: f"{gcs}/xla-cache", "STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]}
    first = _compile_in_a_process(tmp_path / "a", env)
    from jobs.common import storage

    assert first["misses"] >= 1 and storage.list_files(f"{gcs}/xla-cache")  # uploaded at the end
    shutil.rmtree(compilation.MIRROR)  # a new pod: only the bucket has the executables
    second = _compile_in_a_process(tmp_path / "b", env)
    assert second["hits"] >= 1 and second["misses"] == 0


def test_tensorflow_start_up_notices_are_filtered_and_the_rest_kept(capfd, monkeypatch):
    code = ("import os, sys; os.write(2, b'I0000 cudart_stub.cc:31] Could not find cuda drivers\\n'); "
            "os.write(2, b'a real warning\\n')")
    module = type(sys)("tensorflow")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # force the import below to run our stand-in
    monkeypatch.delitem(sys.modules, "tensorflow")
    monkeypatch.setattr("builtins.__import__", _importer(code, module))
    quiet.import_tensorflow()
    err = capfd.readouterr().err
    assert "a real warning" in err and "cudart_stub" not in err


def _importer(code, module):
    import builtins

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "tensorflow":
            exec(code)
            return module
        return real(name, *args, **kwargs)
    return fake
