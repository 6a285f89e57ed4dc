"""The dashboard in a real browser: ``streamlit run dashboard.py`` driven by Playwright and chromium.

Runs the tiny demo (ANOMALY_DEMO_SMALL=1), moves tau, and inspects images; screenshots go
to tests/artifacts/ (gitignored). Skips when /usr/bin/chromium is absent (CI installs it).

ANOMALY_DOCS_SCREENSHOTS=1 runs the full-size demo instead and rewrites docs/score.png and
docs/inspect.png, the README's screenshots.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from anomaly.app import workflows
import browser_support
from browser_support import ARTIFACTS, CHROMIUM, ROOT, launch_chromium, streamlit_app

DOCS = os.environ.get("ANOMALY_DOCS_SCREENSHOTS") == "1"
DEMO = workflows.FULL_DEMO if DOCS else workflows.SMALL_DEMO
TEST_IMAGES = DEMO.n_test_good + DEMO.n_test_defect
SLOW_MS = 600_000 if DOCS else 240_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed")
pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    env = {"ANOMALY_DEMO_SMALL": "0" if DOCS else "1"}
    with streamlit_app(env, ARTIFACTS / "streamlit.log") as app:
        yield app.url


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            tab = browser.new_page(viewport={"width": 1600, "height": 1000})
            tab.set_default_timeout(60_000)
            yield tab
        finally:
            browser.close()


def settle(page) -> None:
    browser_support.settle(page, SLOW_MS)


def screenshot(page, name: str, docs_copy: bool = False) -> None:
    """The whole page: the viewport is grown to the content (Streamlit scrolls an inner element)."""
    height = page.evaluate("document.querySelector('[data-testid=stMainBlockContainer]').scrollHeight")
    page.set_viewport_size({"width": 1600, "height": min(int(height) + 40, 4000)})
    settle(page)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    if docs_copy and DOCS:
        page.screenshot(path=str(ROOT / "docs" / name), full_page=True)
    page.set_viewport_size({"width": 1600, "height": 1000})


def flagged(page):
    card = page.get_by_test_id("stMetric").filter(has_text="Flagged anomalous")
    return card.get_by_test_id("stMetricValue")


def test_a_deep_link_on_a_fresh_server_opens_the_page_inside_the_navigation(server, page):
    """Runs first: before any st.navigation call, Streamlit would run pages/evaluate.py alone."""
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)
    page.goto(f"{server}/evaluate")
    expect(page.get_by_role("heading", name="Evaluate")).to_be_visible()
    navigation = page.get_by_test_id("stSidebarNav")
    expect(navigation.get_by_role("link", name="Dataset sanity check")).to_be_visible()
    expect(navigation.get_by_role("link", name="dashboard")).to_have_count(0)
    expect(page.get_by_test_id("stSidebar").get_by_text("This session")).to_be_visible()
    screenshot(page, "evaluate_deep_link.png")


def test_demo_threshold_and_inspect_in_a_real_browser(server, page):
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)
    page.goto(server)
    expect(page.get_by_role("heading", name="SPADE anomaly detection")).to_be_visible()
    page.get_by_role("button", name="Run the demo").click()
    expect(page.get_by_role("heading", name="Score a batch")).to_be_visible(timeout=SLOW_MS)
    settle(page)
    expect(page.get_by_test_id("stMetric").filter(has_text="Images scored")).to_contain_text(str(TEST_IMAGES))
    expect(page.locator(".js-plotly-plot")).to_have_count(1)
    expect(page.get_by_text("kNN scores of the batch against the normal bank")).to_be_visible()
    screenshot(page, "score.png", docs_copy=True)

    # tau: the slider (keyboard) and the number input both re-threshold, and stay in sync.
    slider = page.get_by_role("slider").first
    slider.focus()
    slider.press("Home")
    expect(flagged(page)).to_have_text(str(TEST_IMAGES))
    exact = page.get_by_label("Image threshold τ (exact)")
    expect(exact).to_have_value(re.compile(r"^0(\.0+)?$"))
    exact.fill("1000000")
    exact.press("Enter")
    expect(flagged(page)).to_have_text("0")
    reset = page.get_by_role("button", name=re.compile("Reset to suggested"))
    suggested = float(re.search(r"\(([0-9.e+-]+)\)", reset.inner_text()).group(1))
    reset.click()
    settle(page)
    assert float(exact.input_value()) == pytest.approx(suggested, rel=1e-3)
    screenshot(page, "score_after_tau.png")

    page.get_by_test_id("stSidebarNav").get_by_role("link", name="Inspect").click()
    expect(page.get_by_role("heading", name="Inspect")).to_be_visible()
    expect(page.get_by_text("Nearest normal images", exact=True)).to_be_visible(timeout=SLOW_MS)
    settle(page)
    expect(page.get_by_text("#1 d²=", exact=False).first).to_be_visible()
    expect(page.get_by_text("Anomaly map", exact=True)).to_be_visible()
    expect(page.locator(".js-plotly-plot")).to_have_count(1)
    expect(page.get_by_text(re.compile("Binary mask at θ"))).to_be_visible()
    expect(page.get_by_text(re.compile("Ground truth"))).to_be_visible()
    screenshot(page, "inspect.png", docs_copy=True)

    page.get_by_role("button", name="Next").click()
    expect(page.get_by_text(re.compile(r"rank 2 of"))).to_be_visible(timeout=SLOW_MS)
    settle(page)
    screenshot(page, "inspect_next.png")
    for name in ("Normal bank", "Dataset sanity check"):
        page.get_by_test_id("stSidebarNav").get_by_role("link", name=name).click()
        expect(page.get_by_role("heading", name=name)).to_be_visible()
        settle(page)
        expect(page.get_by_test_id("stException")).to_have_count(0)
        screenshot(page, f"{name.split()[0].lower()}.png")
