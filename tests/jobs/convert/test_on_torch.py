"""The convert tests run on torch, the backend of the convert image: Keras fixes its backend when it is first
imported, and the rest of this session runs JAX, so they run in a pytest process of their own."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_convert_suite_on_the_torch_backend():
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                             "-W", "ignore::DeprecationWarning", str(ROOT / "tests/jobs/convert/torch_cases.py")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(result.stdout[-5000:])
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout
