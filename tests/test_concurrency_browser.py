"""Two browser sessions against one running dashboard each keep their own work.

Browser context A runs the built-in demo while context B, at the same time, uploads its own
normal images, builds its own bank and then scores its own small batch. Each must see only its
own bank, batch and threshold, also after switching pages. The heavy caches are shared across
sessions; session state must not be. Skips when /usr/bin/chromium is absent; screenshots go to
tests/artifacts/ (gitignored).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from anomaly.app import workflows
from browser_support import ARTIFACTS, CHROMIUM, launch_chromium, settle, streamlit_app
from imagegen import write_images

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed")
pytest.importorskip("playwright.sync_api")

DEMO = workflows.SMALL_DEMO
DEMO_TEST_IMAGES = DEMO.n_test_good + DEMO.n_test_defect
B_NORMALS = 5  # B's bank size, unlike the demo's bank (8)
B_QUERIES = 3  # B's batch size, unlike the demo's batch (5)
SLOW_MS = 240_000
assert B_NORMALS != DEMO.n_train and B_QUERIES != DEMO_TEST_IMAGES


def metric(page, label: str):
    return page.get_by_test_id("stMetric").filter(has_text=label).get_by_test_id("stMetricValue")


def sidebar(page):
    return page.get_by_test_id("stSidebar")


def open_page(page, name: str, heading: str | None = None) -> None:
    from playwright.sync_api import expect

    page.get_by_test_id("stSidebarNav").get_by_role("link", name=name).click()
    expect(page.get_by_role("heading", name=heading or name)).to_be_visible()
    settle(page, SLOW_MS)
    expect(page.get_by_test_id("stException")).to_have_count(0)


def upload(page, files: list[Path]) -> None:
    """Give the page's first image uploader these files and wait until they are sent."""
    from playwright.sync_api import expect

    page.get_by_test_id("stFileUploaderDropzoneInput").first.set_input_files([str(f) for f in files])
    expect(page.get_by_test_id("stFileChipIconSpinner")).to_have_count(0)
    expect(page.get_by_test_id("stFileChipName").first).to_be_visible()
    settle(page, SLOW_MS)


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / name))


def test_two_browser_sessions_keep_their_own_bank_batch_and_threshold(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)
    normals = write_images(tmp_path / "b_normal", range(500, 500 + B_NORMALS))
    queries = write_images(tmp_path / "b_query", range(600, 600 + B_QUERIES - 1)) + write_images(
        tmp_path / "b_query", [699], defect=True)

    with streamlit_app({"ANOMALY_DEMO_SMALL": "1"}, ARTIFACTS / "streamlit_concurrency.log") as app, \
            sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            a, b = (browser.new_context(viewport={"width": 1500, "height": 1500}).new_page() for _ in range(2))
            for tab in (a, b):
                tab.set_default_timeout(60_000)
            a.goto(app.url)
            b.goto(f"{app.url}/bank")
            expect(a.get_by_role("heading", name="SPADE anomaly detection")).to_be_visible()
            expect(b.get_by_role("heading", name="Normal bank")).to_be_visible()
            settle(b, SLOW_MS)

            # A starts the demo; while it computes on the server, B uploads and builds its own bank.
            a.get_by_role("button", name="Run the demo").click()
            upload(b, normals)
            b.get_by_role("button", name="Build the bank").click()

            expect(a.get_by_role("heading", name="Score a batch")).to_be_visible(timeout=SLOW_MS)
            expect(metric(b, "Normal images")).to_have_text(str(B_NORMALS), timeout=SLOW_MS)
            settle(a, SLOW_MS)
            settle(b, SLOW_MS)
            for tab in (a, b):
                expect(tab.get_by_test_id("stException")).to_have_count(0)
            shot(a, "concurrency_a_score.png")
            shot(b, "concurrency_b_bank.png")

            expect(metric(a, "Images scored")).to_have_text(str(DEMO_TEST_IMAGES))
            expect(sidebar(a)).to_contain_text(f"Bank: {DEMO.n_train} normal images")
            expect(sidebar(a)).to_contain_text(f"Batch: {DEMO_TEST_IMAGES} images scored")

            # B has no batch: its Score page offers to score, and shows none of A's demo batch.
            # (The sidebar is drawn before the page, so it is checked only after a page switch.)
            open_page(b, "Score a batch")
            expect(sidebar(b)).to_contain_text(f"Bank: {B_NORMALS} normal images")
            expect(sidebar(b)).not_to_contain_text("Batch:")
            expect(metric(b, "Images scored")).to_have_count(0)
            expect(b.get_by_text("demo dataset")).to_have_count(0)

            # A moves its tau; B scores its own batch and keeps its own suggested tau.
            exact_a = a.get_by_label("Image threshold τ (exact)")
            exact_a.fill("1000000")
            exact_a.press("Enter")
            expect(metric(a, "Flagged anomalous")).to_have_text("0")
            upload(b, queries)
            b.get_by_role("button", name="Score", exact=True).click()
            expect(metric(b, "Images scored")).to_have_text(str(B_QUERIES), timeout=SLOW_MS)
            settle(b, SLOW_MS)
            reset_b = b.get_by_role("button", name=re.compile("Reset to suggested"))
            suggested_b = float(re.search(r"\(([0-9.e+-]+)\)", reset_b.inner_text()).group(1))
            assert float(b.get_by_label("Image threshold τ (exact)").input_value()) == pytest.approx(
                suggested_b, rel=1e-3)
            expect(b.get_by_text("demo dataset")).to_have_count(0)
            shot(b, "concurrency_b_score.png")

            # Switching pages keeps each session's own bank, batch and tau.
            open_page(a, "Normal bank")
            expect(metric(a, "Normal images")).to_have_text(str(DEMO.n_train))
            open_page(b, "Normal bank")
            expect(metric(b, "Normal images")).to_have_text(str(B_NORMALS))
            expect(sidebar(b)).to_contain_text(f"Batch: {B_QUERIES} images scored")
            expect(sidebar(a)).to_contain_text(f"Batch: {DEMO_TEST_IMAGES} images scored")
            open_page(a, "Inspect")
            expect(a.get_by_text(re.compile(rf"rank 1 of {DEMO_TEST_IMAGES}\b"))).to_be_visible(timeout=SLOW_MS)
            open_page(b, "Inspect")
            expect(b.get_by_text(re.compile(rf"rank 1 of {B_QUERIES}\b"))).to_be_visible(timeout=SLOW_MS)
            shot(a, "concurrency_a_inspect.png")
            shot(b, "concurrency_b_inspect.png")
            open_page(a, "Score a batch")
            expect(metric(a, "Images scored")).to_have_text(str(DEMO_TEST_IMAGES))
            expect(metric(a, "Flagged anomalous")).to_have_text("0")
            expect(a.get_by_text("demo dataset, test/").first).to_be_visible()
            open_page(b, "Home", "SPADE anomaly detection")
            expect(b.get_by_text(f"This session has a normal bank of {B_NORMALS} images and a scored batch "
                                 f"of {B_QUERIES} images.")).to_be_visible()
        finally:
            browser.close()
