"""The console in a real browser: Debian's headless Chromium driven by Playwright (from
PyPI; its own browser download is not used). Logs in, uploads a real radiograph, sees the
verdict and the heat map (the image has loaded pixels) and switches it off, opens the
worklist and an instance page after real C-STOREs, and saves screenshots.

Screenshots go to ``$CXR_TEST_SCREENSHOTS`` (default ``var/test-screenshots`` in the
repository, which git ignores)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CXR_DATA, REPO
from tests.web.conftest import COVID_PNG, PHI_NAME, WebStack

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

SHOTS = Path(os.environ.get("CXR_TEST_SCREENSHOTS", REPO / "var" / "test-screenshots"))


def chromium_path() -> str:
    for name in ("chromium", "chromium-headless-shell", "chromium-browser"):
        exe = shutil.which(name) or (
            f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None
        )
        if exe:
            return exe
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does this)")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=chromium_path(),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: object, stack: WebStack) -> Iterator[object]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})  # type: ignore[attr-defined]
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))

    def on_console(m: object) -> None:
        if m.type != "error":  # type: ignore[attr-defined]
            return
        # the 4xx of a bad upload is the page itself answering (tested for), not an error
        if m.text.startswith("Failed to load resource") and m.location["url"].endswith("/try"):  # type: ignore[attr-defined]
            return
        errors.append(f"{m.text} {m.location}")  # type: ignore[attr-defined]

    pg.on("console", on_console)
    pg.goto(stack.base_url + "/worklist")
    assert "/login" in pg.url  # not logged in yet
    pg.fill("input[name=username]", "admin")
    pg.fill("input[name=password]", stack.admin_password)
    pg.click("button[type=submit]")
    pg.wait_for_url("**/worklist")
    yield pg
    ctx.close()
    assert not errors, errors  # no script error, no CSP violation


def _loaded(pg: object, selector: str) -> int:
    """naturalWidth of a loaded image (0 when it did not load)."""
    pg.wait_for_function(  # type: ignore[attr-defined]
        "s => { const i = document.querySelector(s); return i && i.complete; }", arg=selector
    )
    return int(pg.eval_on_selector(selector, "i => i.naturalWidth"))  # type: ignore[attr-defined]


def test_try_it_shows_the_verdict_and_a_switchable_heat_map(page: object) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg = page
    pg.click("nav >> text=Try it")  # type: ignore[attr-defined]
    pg.set_input_files("#file", str(CXR_DATA / COVID_PNG))  # type: ignore[attr-defined]
    pg.click("#upload-form button[type=submit]")  # type: ignore[attr-defined]
    pg.wait_for_selector("#verdict")  # type: ignore[attr-defined]
    assert "COVID-19 suspected" in pg.inner_text("#verdict")  # type: ignore[attr-defined]
    assert pg.locator("#probabilities meter").count() == 3  # type: ignore[attr-defined]
    assert "2.0.0" in pg.inner_text("#result")  # type: ignore[attr-defined]
    assert "not for diagnostic use" in pg.inner_text("body").lower()  # type: ignore[attr-defined]
    assert _loaded(pg, "#cam-image") > 100
    assert pg.is_visible("#cam-image") and not pg.is_visible("#plain-image")  # type: ignore[attr-defined]
    pg.screenshot(path=str(SHOTS / "try-it-heatmap-on.png"), full_page=True)  # type: ignore[attr-defined]
    pg.uncheck("#show-cam")  # type: ignore[attr-defined]
    assert not pg.is_visible("#cam-image") and pg.is_visible("#plain-image")  # type: ignore[attr-defined]
    assert _loaded(pg, "#plain-image") > 100
    pg.screenshot(path=str(SHOTS / "try-it-heatmap-off.png"), full_page=True)  # type: ignore[attr-defined]


def test_try_it_with_a_text_file_says_why(page: object, tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n" * 20)
    pg = page
    pg.goto(pg.url.split("/worklist")[0] + "/try")  # type: ignore[attr-defined]
    pg.set_input_files("#file", str(bad))  # type: ignore[attr-defined]
    pg.click("#upload-form button[type=submit]")  # type: ignore[attr-defined]
    pg.wait_for_selector("#upload-error")  # type: ignore[attr-defined]
    assert "not a PNG, JPEG or DICOM" in pg.inner_text("#upload-error")  # type: ignore[attr-defined]


def test_worklist_instance_dashboard_model_and_docs(page: object, stack: WebStack) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg = page
    rows = pg.locator("table.worklist tbody tr")  # type: ignore[attr-defined]
    assert rows.count() == 4
    urgent = pg.locator("table.worklist tbody tr.urgent")  # type: ignore[attr-defined]
    assert urgent.count() == 1 and "COVID-19 suspected" in urgent.inner_text()
    assert stack.sops["covid"] in urgent.inner_text()
    assert PHI_NAME not in pg.content() and "Zyxquor" not in pg.content()  # type: ignore[attr-defined]
    # the rows refresh by themselves
    pg.wait_for_function(  # type: ignore[attr-defined]
        "() => document.getElementById('worklist').dataset.refreshedAt", timeout=25_000
    )
    assert pg.locator("table.worklist tbody tr").count() == 4  # type: ignore[attr-defined]
    pg.screenshot(path=str(SHOTS / "worklist.png"), full_page=True)  # type: ignore[attr-defined]
    # filter by verdict
    pg.select_option("select[name=verdict]", ["Normal"])  # type: ignore[attr-defined]
    pg.click("form.filters button[type=submit]")  # type: ignore[attr-defined]
    pg.wait_for_url("**verdict=Normal**")  # type: ignore[attr-defined]
    assert pg.locator("table.worklist tbody tr.urgent").count() == 0  # type: ignore[attr-defined]
    assert pg.locator("table.worklist tbody tr").count() == 3  # type: ignore[attr-defined]

    pg.goto(f"{stack.base_url}/worklist")  # type: ignore[attr-defined]
    pg.click(f"a[href='/instances/{stack.sops['covid']}']")  # type: ignore[attr-defined]
    pg.wait_for_selector("#timeline")  # type: ignore[attr-defined]
    text = pg.inner_text("main")  # type: ignore[attr-defined]
    assert "received" in text and "delivered" in text and "WEB_PACS@127.0.0.1" in text
    assert "COVID" in text and "forward" in text
    assert _loaded(pg, "#sc-preview") > 100  # rendered from the stored Secondary Capture
    assert PHI_NAME not in pg.content()  # type: ignore[attr-defined]
    pg.screenshot(path=str(SHOTS / "instance.png"), full_page=True)  # type: ignore[attr-defined]

    pg.click("nav >> text=Dashboard")  # type: ignore[attr-defined]
    pg.wait_for_selector("#health")  # type: ignore[attr-defined]
    assert pg.locator("svg.chart rect").count() > 2  # type: ignore[attr-defined]
    assert "database" in pg.inner_text("#health")  # type: ignore[attr-defined]
    assert "C-ECHO success" in pg.inner_text("#health")  # type: ignore[attr-defined]
    assert "all worker processes up" in pg.inner_text("#health")  # type: ignore[attr-defined]
    pg.screenshot(path=str(SHOTS / "dashboard.png"), full_page=True)  # type: ignore[attr-defined]

    pg.click("nav >> text=Model")  # type: ignore[attr-defined]
    pg.wait_for_selector("#model-card")  # type: ignore[attr-defined]
    assert "Research use only" in pg.inner_text("#model-card")  # type: ignore[attr-defined]
    assert _loaded(pg, ".plots img") > 100
    pg.screenshot(path=str(SHOTS / "model.png"), full_page=True)  # type: ignore[attr-defined]

    pg.click("nav >> text=API")  # type: ignore[attr-defined]
    pg.wait_for_selector("#swagger-ui .opblock", timeout=30_000)  # type: ignore[attr-defined]
    assert "/api/v1/predict" in pg.inner_text("#swagger-ui")  # type: ignore[attr-defined]
    pg.screenshot(path=str(SHOTS / "api-docs.png"), full_page=True)  # type: ignore[attr-defined]


def test_admin_retries_from_the_instance_page(page: object, stack: WebStack) -> None:
    """The refused study ends delivery_failed; the admin's Retry button (a POST with the
    page's CSRF token) delivers it once the PACS takes it."""
    uid = stack.sops["refused2"]  # the API test retries the other refused study
    assert stack.states()[uid] == "delivery_failed"
    pg = page
    pg.goto(f"{stack.base_url}/instances/{uid}")  # type: ignore[attr-defined]
    assert "delivery_failed" in pg.inner_text("#state")  # type: ignore[attr-defined]
    with stack.pacs.lock:
        stack.pacs.refuse.discard(stack.studies["refused2"])
    pg.click("#retry")  # type: ignore[attr-defined]
    pg.wait_for_selector("#notice")  # type: ignore[attr-defined]
    assert "delivery_failed -> classified" in pg.inner_text("#notice")  # type: ignore[attr-defined]
    stack.wait_states({uid: {"delivered"}})
    pg.reload()  # type: ignore[attr-defined]
    assert "delivered" in pg.inner_text("#state")  # type: ignore[attr-defined]
    assert "web:admin retry" in pg.inner_text("#timeline")  # type: ignore[attr-defined]
