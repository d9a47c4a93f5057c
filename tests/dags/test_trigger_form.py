"""The DAG's trigger form in a real browser: Debian's Chromium driven by Playwright against Airflow's own
`airflow api-server` (SQLite, no scheduler, no emulator: triggering only creates the run). Users meet the DAG
here first, so the form must trigger with its defaults and refuse a bad value with the schema's message.

`.ci/run` installs Chromium and sets GEMMA_PIPELINE_REQUIRE_BROWSER=1, so CI fails instead of skipping.
Set GEMMA_PIPELINE_SCREENSHOT=PATH to keep a screenshot of the form (docs/images/trigger-form.png).
"""

from __future__ import annotations

import json
import os

import pytest
from gemma_pipeline.plan import form as trigger_form

from tests.support import airflow_ui
from tests.support.browser import CHROMIUM, CHROMIUM_FLAGS, browser_or_skip

DAG_ID = "gemma_lora_finetune"


@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
    browser_or_skip()
    home = tmp_path_factory.mktemp("airflow-ui")
    env = airflow_ui.clean_env(home)
    airflow_ui.airflow(env, "db", "migrate")
    airflow_ui.airflow(env, "dags", "reserialize")  # what the DAG processor would do: the form reads the serialized DAG
    with airflow_ui.api_server(home) as url:
        yield url, env


@pytest.fixture
def form(api_server):
    from playwright.sync_api import sync_playwright

    url, _ = api_server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/dags/{DAG_ID}", wait_until="networkidle")
        page.get_by_role("button", name="Trigger").first.click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_role("button", name=trigger_form.RUN, exact=True).wait_for()
        yield page, dialog
        browser.close()


def _runs(env: dict[str, str]) -> list[dict]:
    out = airflow_ui.airflow(env, "dags", "list-runs", DAG_ID, "-o", "json")
    listing = [line for line in out.splitlines() if line.startswith("[")]  # warnings may share stdout
    assert listing, out[-2000:]
    return json.loads(listing[-1])


def test_defaults_trigger_a_run(api_server, form):
    _, env = api_server
    page, dialog = form
    trigger = dialog.get_by_role("button", name="Trigger")
    # The Params in sections, run-level first, in the order gemma_pipeline.plan.form declares them.
    sections = list(dict.fromkeys(schema["section"] for _, schema in trigger_form.specs().values()))
    shown = [b.inner_text() for b in dialog.get_by_role("button").all()]
    assert [s for s in shown if s in sections] == sections and len(sections) >= 6, shown
    dialog.get_by_role("button", name=trigger_form.RUN, exact=True).click()  # open the run-level section
    dialog.locator('input[name="element_bucket"]').wait_for()
    # Every optional param (run_name, context_field, template) is optional in the form's eyes.
    for name in ("run_name", "context_field", "template"):
        assert dialog.locator(f'input[name="element_{name}"]').input_value() == ""
    assert trigger.is_enabled()
    if os.environ.get("GEMMA_PIPELINE_SCREENSHOT"):
        page.screenshot(path=os.environ["GEMMA_PIPELINE_SCREENSHOT"])
    before = len(_runs(env))
    trigger.click()
    dialog.wait_for(state="hidden", timeout=30_000)  # the form closes once the API accepted the run
    runs = _runs(env)
    assert len(runs) == before + 1, runs
    assert runs[0]["dag_id"] == DAG_ID


def test_bad_value_shows_the_schema_message(api_server, form):
    _, env = api_server
    page, dialog = form
    before = len(_runs(env))
    dialog.get_by_role("button", name=trigger_form.RUN, exact=True).click()
    dialog.locator('input[name="element_bucket"]').fill("Not_A_Bucket")
    dialog.get_by_role("button", name="Trigger").click()
    message = dialog.get_by_text("Invalid input for param bucket")
    message.wait_for(timeout=30_000)
    assert "'Not_A_Bucket' does not match" in dialog.inner_text()
    assert len(_runs(env)) == before  # nothing was created
