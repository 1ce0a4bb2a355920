"""The Prefect UI, driven as a user drives it: Deployments -> `finetune` -> Run -> Custom run, the typed form
filled (config file, steps, model name), Submit, the flow-run page followed until it shows Completed.

Playwright drives Debian's Chromium (`make browser`, which `make test` runs first: apt-get install chromium
chromium-driver); it never downloads a browser. The session's operations stack (tests/conftest.py
``ops_stack``) serves the UI. The finished run's page is kept as a test artifact under
``outputs/test-artifacts/prefect-ui-finished-run.png`` (a failure: ``prefect-ui-failure.png``); ``outputs/``
is gitignored. Selectors are roles and visible text of the Prefect 3.9 UI (its default, "v2", React UI).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import expect, sync_playwright

from lora_pipeline.run_request import RunOverrides
from tests.helpers.stack import REPO, prefect_call

pytestmark = pytest.mark.slow
MODEL_NAME = "ui-tiny"  # no other test registers this name in the session's MLflow server
ARTIFACTS = REPO / "outputs" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: Headless Chromium on a closed network: without the background-networking flags it refuses connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FINAL_STATE = re.compile(r"^(Completed|Failed|Crashed|Cancelled|TimedOut)$")
RUN_TIMEOUT_S = 600


@contextlib.contextmanager
def browser_page() -> Iterator:
    """A Chromium page (1400x1000). Playwright's sync API runs its own event loop: the Prefect client
    (asyncio) is used only after the block."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)  # two shared CPU cores: the first render of a page can be slow
            yield page
        finally:
            browser.close()


@contextlib.contextmanager
def screenshot_on_failure(page) -> Iterator[None]:
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / "prefect-ui-failure.png", full_page=True)
        raise


def ui_url(stack: dict) -> str:
    """The UI's address, after checking that the UI talks to this stack's API (not Prefect's default port)."""
    api_url = stack["PREFECT_API_URL"]
    ui = api_url.removesuffix("/api")
    with urllib.request.urlopen(f"{ui}/ui-settings", timeout=30) as response:
        served = json.loads(response.read())["api_url"]
    assert served == api_url, (f"the Prefect UI at {ui} sends the browser to {served}, not to its own API {api_url}: "
                               "the server needs PREFECT_UI_API_URL (or PREFECT_SERVER_API_PORT) in its environment")
    return ui


def parameter(page, label: str):
    """One parameter of the run form: the innermost block holding its label and its type tabs."""
    return page.locator("div").filter(has=page.get_by_text(label, exact=True)).filter(
        has=page.get_by_role("tablist")).last


def start_custom_run(page, ui: str, config_path: str) -> str:
    """Deployments -> finetune -> Run -> Custom run, fill the form, Submit, "View run"; the flow run's id."""
    page.goto(f"{ui}/")
    page.get_by_role("link", name="Deployments", exact=True).click()
    deployment = page.get_by_role("link", name="finetune", exact=True).and_(
        page.locator("[href*='/deployments/deployment/']"))  # the row's other "finetune" link is the flow
    deployment.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Custom run").click()

    parameter(page, "config_path (Optional)").get_by_role("textbox").fill(config_path)
    parameter(page, "overrides (Optional)").get_by_role("tab", name="RunOverrides").click()
    steps = parameter(page, "Train Max Steps (Optional)")
    steps.get_by_role("tab", name="int").click()
    steps.get_by_role("spinbutton").fill("4")
    model_name = parameter(page, "Registry Model Name (Optional)")
    model_name.get_by_role("tab", name="str").click()
    model_name.get_by_role("textbox").fill(MODEL_NAME)
    page.get_by_role("button", name="Submit").click()

    page.get_by_role("button", name="View run").click()  # on the "<run name> scheduled to start now" toast
    page.wait_for_url(re.compile(r"/runs/flow-run/[0-9a-f-]{36}"))
    return re.search(r"/runs/flow-run/([0-9a-f-]{36})", page.url).group(1)


def wait_for_final_state(page, timeout: float = RUN_TIMEOUT_S) -> str:
    """The state badge of the flow-run page once it is final. The page polls the API itself while the run is
    active; should it stall, it is reloaded every two minutes (a reload re-renders the run graph from scratch)."""
    badge = page.get_by_text(FINAL_STATE).first  # the header's badge comes before any task run's or log line
    deadline = time.monotonic() + timeout
    while True:
        try:
            expect(badge).to_be_visible(timeout=120_000)
            return badge.inner_text().strip()
        except AssertionError:
            assert time.monotonic() < deadline, f"the flow-run page did not show a final state in {timeout:.0f} s"
            page.reload()


def reload_settled(page) -> None:
    """Reload the flow-run page and wait until it has drawn the run graph: the live page keeps the "scheduled"
    toast, a stale task-run count and a graph caught mid-zoom. Best effort: only the screenshot depends on it."""
    with contextlib.suppress(PlaywrightTimeoutError):
        with page.expect_response(lambda response: "/graph-v2" in response.url, timeout=30_000):
            page.reload()
        page.wait_for_load_state("networkidle", timeout=15_000)
        page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")


def test_a_run_started_from_the_prefect_ui_form_completes_and_registers(ops_stack, ops_config_root):
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium: `make browser` installs Debian's chromium + chromium-driver (apt-get, as root)")
    config_path = str(ops_config_root / "config.yaml")
    ui = ui_url(ops_stack)
    with browser_page() as page, screenshot_on_failure(page):
        flow_run_id = start_custom_run(page, ui, config_path)
        # A fresh load of the run's own page: right after the redirect the deployment page (whose run list may
        # show other runs' "Failed" badges, e.g. a refused run of another test) can still be on screen.
        page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
        final = wait_for_final_state(page)
        assert final == "Completed", f"the UI shows flow run {flow_run_id} {final}"
        reload_settled(page)
        expect(page.get_by_text(FINAL_STATE).first).to_have_text("Completed")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / "prefect-ui-finished-run.png", full_page=True)

    async def read(client):
        deployment = await client.read_deployment_by_name("finetune/finetune")
        return deployment, await client.read_flow_run(flow_run_id)

    deployment, flow_run = prefect_call(ops_stack, read)
    assert flow_run.deployment_id == deployment.id and flow_run.state.is_completed(), flow_run.state
    # Exactly what was typed; the form sends the overrides it left at "None" as null.
    assert flow_run.parameters == {
        "config_path": config_path,
        "overrides": RunOverrides(train_max_steps=4, registry_model_name=MODEL_NAME).model_dump()}
    import mlflow

    versions = mlflow.MlflowClient(ops_stack["MLFLOW_TRACKING_URI"]).search_model_versions(f"name = '{MODEL_NAME}'")
    assert [v.tags.get("flow_run_id") for v in versions] == [flow_run_id], versions
