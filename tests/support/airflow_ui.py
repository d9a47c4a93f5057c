"""A real `airflow api-server` over an Airflow home (SQLite), for the tests that meet the DAG as a person does:
the trigger form, and the approval request under Required Actions (answered in Chromium or through the REST API
while `airflow dags test` waits on the same metadata database)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from gemma_pipeline import local

from tests.conftest import ROOT
from tests.support.browser import CHROMIUM, CHROMIUM_FLAGS

DAG_ID = "gemma_lora_finetune"
PASSWORDS = "simple_auth_manager_passwords.json.generated"


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "STORAGE_EMULATOR", "GEMMA_PIPELINE_"))}
    env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True"})
    return env


def airflow(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str, process: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until the api-server at `url` answers its health check; False if `process` (it, or what starts it)
    ends first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while not local.responds(f"{url}/api/v2/monitor/health"):
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


@contextlib.contextmanager
def api_server(home: Path, env: dict[str, str] | None = None, port: int | None = None) -> Iterator[str]:
    """The api-server over `home`'s metadata database (migrated here if new); yields its URL."""
    env = env or clean_env(home)
    if not (home / "airflow.db").exists():
        airflow(env, "db", "migrate")
    port = port or free_port()
    with open(home / "api-server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "airflow", "api-server", "--port", str(port)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            if not healthy(url, server, 180):
                pytest.fail(f"airflow api-server did not start:\n{(home / 'api-server.log').read_text()[-3000:]}")
            yield url
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


@dataclass(frozen=True)
class UI:
    """An api-server a test talks to: its URL and SimpleAuthManager's `admin` (password, and a JWT for the API)."""
    url: str
    password: str
    token: str


def local_run_ui(root: Path, conf: dict) -> tuple[subprocess.Popen, UI]:
    """The main command with approval required, as a user runs it: it starts its own Airflow UI (api-server) on a
    port of ours; returns the run's process and the UI once it answers, logged in as `admin`."""
    from tests.support.local_run import abandon, start_local_run

    port = free_port()
    process = start_local_run(root, conf, args=("--ui-port", str(port)))
    url = f"http://127.0.0.1:{port}"
    if not healthy(url, process, 300):
        abandon(process)
        pytest.fail(f"the local run's Airflow UI never answered at {url} (exit {process.returncode})")
    home = root / "airflow"
    password = json.loads((home / PASSWORDS).read_text())["admin"]
    return process, UI(url, password, login(url, home, "admin"))


def request(url: str, method: str = "GET", body: Any = None, token: str | None = None) -> tuple[int, Any]:
    """A REST call as an API client makes it: with `token` (`login`), as that user; without, as SimpleAuthManager's
    anonymous admin when every user is one."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def login(url: str, home: Path, user: str) -> str:
    """A JWT for one of SimpleAuthManager's users (their passwords are in the file it generates in AIRFLOW_HOME)."""
    passwords = json.loads((home / PASSWORDS).read_text())
    status, body = request(f"{url}/auth/token", "POST", {"username": user, "password": passwords[user]})
    assert status in (200, 201), body
    return body["access_token"]


def hitl_path(url: str, run_id: str, task_id: str = "approve", map_index: int = -1) -> str:
    return (f"{url}/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances/{task_id}/"
            f"{map_index}/hitlDetails")


def open_request(url: str, process: subprocess.Popen, timeout_s: float = 600, token: str | None = None) -> dict[str, Any]:
    """Wait until the run asks (an unanswered request in the REST API's list) and return it; fail if the run
    ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, listing = request(f"{url}/api/v2/dags/~/dagRuns/~/hitlDetails", token=token)
        waiting = [d for d in (listing or {}).get("hitl_details", []) if not d["response_received"]]
        if waiting:
            return waiting[0]
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) without asking for approval")
        time.sleep(2)
    pytest.fail(f"no approval request within {timeout_s:.0f} s")


def answer_in_browser(ui: UI, run_id: str, option: str, comment: str, screenshot: str | None = None) -> str:
    """A person's answer: sign in, Required Actions, this run's request, a comment, the option's button. Returns the
    text the request showed."""
    import re

    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(f"{ui.url}/required_actions", wait_until="networkidle")
        page.locator('input[name="username"]').fill("admin")  # SimpleAuthManager's sign-in page first
        page.locator('input[name="password"]').fill(ui.password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{ui.url}/required_actions")
        page.get_by_role("row").filter(has_text=run_id).get_by_role("link", name=re.compile("^Promote a candidate")).click()
        page.locator('input[name="element_comment"]').fill(comment)
        shown = page.inner_text("body")
        if screenshot:
            page.screenshot(path=screenshot, full_page=True)
        page.get_by_role("button", name=option, exact=True).click()
        page.get_by_text("response successful").wait_for(timeout=30_000)
        browser.close()
    return shown
