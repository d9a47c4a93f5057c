"""Debian's Chromium for the tests that drive a real browser through Playwright (the trigger form, the run report).

`.ci/run` installs Chromium and sets GEMMA_PIPELINE_REQUIRE_BROWSER=1, so CI fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium on a closed network: no background connections, no sandbox as root, a throwaway profile.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser_available() -> bool:
    """Chromium is here; where it must be (GEMMA_PIPELINE_REQUIRE_BROWSER=1, as in CI) its absence fails."""
    if Path(CHROMIUM).exists():
        return True
    if os.environ.get("GEMMA_PIPELINE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"Chromium not found at {CHROMIUM} (Debian package chromium; .ci/run installs it)")
    return False


def browser_or_skip() -> None:
    if Path(CHROMIUM).exists():
        return
    message = f"Chromium not found at {CHROMIUM} (Debian package chromium; .ci/run installs it)"
    if os.environ.get("GEMMA_PIPELINE_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)
