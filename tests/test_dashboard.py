"""The Streamlit dashboard, driven headless with streamlit.testing.v1.AppTest.

Every test runs the real pages in this process with a tiny demo (ANOMALY_DEMO_SMALL=1).
Streamlit's caches are process-wide, as on a server, so after the first demo later ones
are cache hits; session state is per AppTest, as it is per browser tab.
"""

from __future__ import annotations

import io
import threading
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import hostile
from anomaly import SPADE, collect_inputs, features, search
from anomaly.app import cache, findings, tables, workflows
from anomaly.backbones import FeatureExtractor
from anomaly.demo import make_demo_dataset
from imagegen import png_bytes, texture

APP = str(Path(__file__).resolve().parents[1] / "dashboard.py")
TIMEOUT = 300
SMALL = workflows.SMALL_DEMO
TEST_IMAGES = SMALL.n_test_good + SMALL.n_test_defect


@pytest.fixture(autouse=True)
def small_demo(monkeypatch):
    monkeypatch.setenv("ANOMALY_DEMO_SMALL", "1")


@pytest.fixture
def forward_calls(monkeypatch) -> list[int]:
    """Batch sizes of every backbone forward pass made while the test runs."""
    calls: list[int] = []
    original = FeatureExtractor.forward

    def counting(self, x):
        calls.append(int(x.shape[0]))
        return original(self, x)

    monkeypatch.setattr(FeatureExtractor, "forward", counting)
    return calls


def fresh() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    return at


def demo() -> AppTest:
    at = fresh()
    at.button(key="run_demo").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Score a batch"
    return at


def goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def texts(elements) -> str:
    """The elements' text with the app's Markdown escapes removed."""
    return "\n".join(str(e.value) for e in elements).replace("\\", "")


def captions(at: AppTest) -> str:
    """Image captions (markdown-escaped by the app) with the escapes removed."""
    return "\n".join(c for image in at.image for c in image.captions).replace("\\", "")


def good_pngs(count: int, start: int = 0) -> list[tuple[str, bytes, str]]:
    return [(f"good_{i}.png", png_bytes(texture(i)), "image/png") for i in range(start, start + count)]


# ---- home and demo ---------------------------------------------------------------------------


def test_home_offers_the_demo_and_every_page():
    at = fresh()
    assert at.title[0].value == "SPADE anomaly detection"
    assert at.button(key="run_demo").label == "Run the demo"
    assert len(at.get("page_link")) == 5


def test_opening_the_dashboard_compiles_the_loops_once_in_the_background(monkeypatch):
    for earlier in [t for t in threading.enumerate() if t.name == "warm-up"]:
        earlier.join()  # an earlier test's real warm-up would otherwise call the stand-ins below
    calls: list[str] = []
    for module in (features, search):
        monkeypatch.setattr(module, "warm_up", lambda name=module.__name__: calls.append(
            f"{name} on {threading.current_thread().name}"))
    cache.warm_up.clear()
    fresh()
    fresh()  # a rerun, or a second browser tab: nothing more
    thread = cache.warm_up()
    thread.join(timeout=60)
    assert calls == ["anomaly.features on warm-up", "anomaly.search on warm-up"]
    assert not thread.daemon  # a daemon still in torch at exit aborts the interpreter
    cache.warm_up.clear()  # the next opening warms up for real again


@pytest.mark.parametrize("page", ["pages/bank.py", "pages/score.py", "pages/inspect.py", "pages/sanity.py",
                                  "pages/evaluate.py"])
def test_every_page_runs_inside_the_navigation_even_without_a_bank(page):
    at = goto(fresh(), page)
    assert "This session" in texts(at.sidebar.caption)  # dashboard.py ran around the page
    assert at.title[0].value


def test_demo_builds_the_bank_and_scores_the_labelled_test_set():
    at = demo()
    assert metric(at, "Images scored") == str(TEST_IMAGES)
    assert metric(at, "Unreadable") == "0"
    assert metric(at, "Image ROC AUC") not in ("", "n/a")
    assert len(at.get("plotly_chart")) == 1
    table = at.dataframe[0].value
    assert len(table) == TEST_IMAGES and set(table["label"].str.split(":").str[0]) == {"good", "defect"}
    goto(at, "pages/bank.py")
    assert metric(at, "Normal images") == str(SMALL.n_train)
    assert "efficientnet_lite0" in texts(at.markdown)
    assert len(at.get("plotly_chart")) == 1  # leave-one-out histogram


def test_tau_rethresholds_live_without_extracting_features(forward_calls):
    at = demo()
    before = len(forward_calls)
    at.slider(key="tau_slider").set_value(0.0).run()
    assert metric(at, "Flagged anomalous") == str(TEST_IMAGES)
    assert at.number_input(key="tau_number").value == 0.0
    at.number_input(key="tau_number").set_value(1e6).run()
    assert metric(at, "Flagged anomalous") == "0"
    assert at.slider(key="tau_slider").value == pytest.approx(1e6)
    assert at.dataframe[0].value["anomalous"].sum() == 0
    goto(at, "pages/bank.py")
    goto(at, "pages/score.py")  # the threshold survives a page switch
    assert at.number_input(key="tau_number").value == pytest.approx(1e6)
    at.button(key="tau_reset").click().run()
    assert at.number_input(key="tau_number").value == pytest.approx(at.session_state["tau"])
    assert at.session_state["tau"] < 1e6
    assert len(forward_calls) == before, "moving tau must not run the backbone"


# ---- inspect ---------------------------------------------------------------------------------


def test_a_row_picked_in_the_table_opens_in_inspect():
    at = demo()
    table = at.dataframe[0].value
    assert list(table["score (squared distance)"]) == sorted(table["score (squared distance)"], reverse=True)
    at.session_state["score_table"] = {"selection": {"rows": [2], "columns": [], "cells": []}}
    at.run()
    picked = int(table.iloc[2]["#"])
    name = at.session_state["batch"].results[picked].relpath
    button = next(b for b in at.button if b.label.replace("\\", "") == f"Inspect {name}")
    button.click().run()
    assert at.title[0].value == "Inspect"
    assert at.session_state["inspect_index"] == picked
    assert f"rank 3 of {TEST_IMAGES}" in texts(at.markdown)


def test_inspect_shows_neighbours_the_map_and_masks(forward_calls):
    at = goto(demo(), "pages/inspect.py")
    shown = captions(at)
    assert "Test image" in shown and "#1 d²=" in shown and "#8 d²=" in shown
    assert "Binary mask at θ =" in shown and "Ground truth" in shown  # top-scored demo image is a defect
    assert len(at.get("plotly_chart")) == 1  # the heatmap overlay
    first = at.session_state["inspect_index"]
    batch = at.session_state["batch"]
    assert first == batch.by_score()[0] and first in batch.maps

    calls = len(forward_calls)
    at.slider(key="theta_slider").set_value(0.0).run()
    assert "100.0 % of pixels" in captions(at)
    assert len(forward_calls) == calls, "moving theta must not recompute the map"

    at.button[1].click().run()  # Next
    assert at.session_state["inspect_index"] == batch.by_score()[1]
    at.selectbox(key="inspect_pick").set_value(batch.by_score()[-1]).run()
    assert at.session_state["inspect_index"] == batch.by_score()[-1]

    at.button(key="maps_for_flagged").click().run()
    batch = at.session_state["batch"]
    flagged = [i for i in batch.valid if batch.results[i].score > at.session_state["tau"]]
    assert set(flagged) <= set(batch.maps)


# ---- errors the user can cause --------------------------------------------------------------------


def test_bank_from_uploads_skips_unreadable_files_and_says_so():
    at = goto(fresh(), "pages/bank.py")
    files = good_pngs(4) + [("broken.png", hostile.truncated_png(), "image/png"),
                            ("empty.png", hostile.empty_file(), "image/png")]
    at.file_uploader(key="bank_build_files").set_value(files)
    at.button(key="bank_build_go").click().run()
    assert not at.exception
    assert metric(at, "Normal images") == "4"
    assert f"pixel search: {search.describe('auto')}" in texts(at.markdown)  # how this CPU runs it
    warning = texts(at.warning)
    assert "2 normal input(s) could not be read" in warning
    skipped = at.session_state["bank_state"].bank.skipped
    assert any("broken.png" in s for s in skipped) and any("empty.png" in s for s in skipped)


def test_empty_upload_and_a_zip_without_images_are_explained():
    at = goto(fresh(), "pages/bank.py")
    at.button(key="bank_build_go").click().run()
    assert "Nothing uploaded yet" in texts(at.warning)
    notes = io.BytesIO()
    with zipfile.ZipFile(notes, "w") as archive:
        archive.writestr("readme.txt", "no images here")
    at.file_uploader(key="bank_build_files").set_value(("notes.zip", notes.getvalue(), "application/zip"))
    at.button(key="bank_build_go").click().run()
    assert not at.exception
    assert "no images found in the zip archive" in texts(at.markdown)
    assert "bank_state" not in at.session_state


def test_unreadable_test_image_gets_its_row_and_the_rest_is_scored():
    at = demo()
    upload = good_pngs(2, start=100) + [("garbage.png", hostile.random_bytes(), "image/png")]
    at.file_uploader(key="score_files").set_value(upload)
    at.button(key="score_go").click().run()
    assert not at.exception
    assert metric(at, "Images scored") == "2" and metric(at, "Unreadable") == "1"
    assert "1 file(s) could not be read" in texts(at.warning)
    table = at.dataframe[0].value
    assert table.loc[table["file"] == "garbage.png", "error"].str.len().item() > 0
    assert table.loc[table["file"] != "garbage.png", "error"].eq("").all()


def zipped(folder: Path, prefix: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*.png")):
            archive.write(path, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return buffer.getvalue()


def test_labels_and_masks_come_from_the_folders_of_an_uploaded_zip():
    root = make_demo_dataset(n_train=SMALL.n_train, n_test_good=SMALL.n_test_good,
                             n_test_defect=SMALL.n_test_defect, size=SMALL.size)
    at = demo()
    at.file_uploader(key="score_files").set_value(("category.zip", zipped(root, "category"), "application/zip"))
    at.button(key="score_go").click().run()
    assert "MVTec layout found" in texts(at.info)
    assert metric(at, "Images scored") == str(TEST_IMAGES) and metric(at, "Image ROC AUC") != "n/a"
    batch = at.session_state["batch"]
    assert all((mask is not None) == (label == 1) for mask, label in zip(batch.masks, batch.labels))

    # Only good/defect folders (no train/, no masks): labels still come from the folder names.
    at.file_uploader(key="score_files").set_value(("test.zip", zipped(root / "test", "batch"), "application/zip"))
    at.button(key="score_go").click().run()
    batch = at.session_state["batch"]
    assert sorted(set(batch.labels)) == [0, 1] and set(batch.defects) == {"good", "scratch", "spot", "crack"}
    assert metric(at, "Image ROC AUC") != "n/a" and not at.exception


def test_a_random_file_is_not_loaded_as_a_bank_and_the_current_bank_stays():
    at = demo()
    bank = at.session_state["bank_state"].bank
    goto(at, "pages/bank.py")
    at.file_uploader(key="bank_file").set_value(("junk.safetensors", hostile.random_bytes(4096), "application/octet-stream"))
    at.button(key="bank_load_go").click().run()
    error = texts(at.error)
    assert "Loading the bank failed" in error and "junk.safetensors" in error and "not a bank file" in error
    assert at.session_state["bank_state"].bank is bank


def test_a_bank_from_another_backbone_is_refused(tmp_path: Path):
    root = make_demo_dataset(n_train=3, n_test_good=1, n_test_defect=0, size=64)
    other = SPADE(backbone="resnet18", weights="random", calibration_images=0).fit(
        collect_inputs([root / "train" / "good"]).items)
    other.bank.save(tmp_path / "resnet.safetensors")
    at = goto(fresh(), "pages/bank.py")
    at.selectbox(key="bank_backbone").set_value("efficientnet_lite0")
    at.radio(key="bank_load_source").set_value("Path on the server").run()
    at.text_input(key="bank_path").set_value(str(tmp_path / "resnet.safetensors"))
    at.button(key="bank_load_go").click().run()
    error = texts(at.error)
    assert "built with resnet18" in error and "efficientnet_lite0" in error
    assert "bank_state" not in at.session_state


# ---- saving, sharing and isolation ------------------------------------------------------------------


def test_saved_bank_loads_in_another_session_as_the_same_shared_object(tmp_path: Path):
    first = goto(demo(), "pages/bank.py")
    target = tmp_path / "bank.safetensors"
    first.text_input(key="bank_save_path").set_value(str(target))
    first.button(key="bank_save_go").click().run()
    assert target.is_file() and "Saved" in texts(first.success)
    first.button(key="bank_save_go").click().run()
    assert "already exists" in texts(first.error)

    second = goto(fresh(), "pages/bank.py")
    second.radio(key="bank_load_source").set_value("Path on the server").run()
    second.text_input(key="bank_path").set_value(str(target))
    second.button(key="bank_load_go").click().run()
    assert not second.error
    assert second.session_state["bank_state"].bank is first.session_state["bank_state"].bank


def test_two_sessions_do_not_see_each_others_results():
    first = demo()
    second = goto(fresh(), "pages/score.py")
    assert "Build or load a normal bank first" in texts(second.info)
    assert "batch" not in second.session_state

    goto(second, "pages/bank.py")
    second.file_uploader(key="bank_build_files").set_value(good_pngs(3, start=50))
    second.button(key="bank_build_go").click().run()
    assert metric(second, "Normal images") == "3"
    assert first.session_state["bank_state"].bank is not second.session_state["bank_state"].bank
    first.run()
    assert metric(first, "Images scored") == str(TEST_IMAGES)
    assert len(first.session_state["bank_state"].bank) == SMALL.n_train


# ---- dataset sanity and evaluation ----------------------------------------------------------------


def test_sanity_page_finds_outliers_sizes_and_train_test_leakage():
    at = goto(demo(), "pages/sanity.py")
    headers = texts(at.header)
    for title in ("Normals that look least like the others", "Near-duplicate pairs among the normals",
                  "Images that failed to load", "Image sizes", "Test images that are (nearly) in the bank"):
        assert title in headers
    assert "Every normal input could be read." in texts(at.success)
    assert f"{SMALL.size}" in at.dataframe[0].value.to_string()
    assert "None of the" in texts(at.success)

    # Scoring the training images themselves is the clearest leak there is.
    root = make_demo_dataset(n_train=SMALL.n_train, n_test_good=SMALL.n_test_good,
                             n_test_defect=SMALL.n_test_defect, size=SMALL.size)
    goto(at, "pages/score.py")
    at.radio(key="score_source").set_value("Folder on the server").run()
    at.text_input(key="score_folder").set_value(str(root / "train" / "good"))
    at.button(key="score_go").click().run()
    goto(at, "pages/sanity.py")
    assert f"{SMALL.n_train} test image(s) are near-copies of normal images" in texts(at.warning)


def test_evaluate_page_reports_image_and_pixel_metrics():
    root = make_demo_dataset(n_train=SMALL.n_train, n_test_good=SMALL.n_test_good,
                             n_test_defect=SMALL.n_test_defect, size=SMALL.size)
    at = goto(fresh(), "pages/evaluate.py")
    at.radio(key="evaluate_source").set_value("Folder on the server").run()
    at.text_input(key="evaluate_folder").set_value(str(root))
    at.button(key="evaluate_go").click().run()
    assert not at.exception and not at.error
    for label in ("Image ROC AUC (kNN score)", "Image ROC AUC (map maximum)", "Pixel ROC AUC", "PRO (up to 30% FPR)"):
        assert metric(at, label) != "n/a"
    assert len(at.get("plotly_chart")) == 2
    assert set(at.dataframe[0].value["defect type"]) == {"scratch", "spot", "crack"}


# ---- pure helpers behind the pages ------------------------------------------------------------------


def test_csv_export_defuses_spreadsheet_formulas():
    import pandas as pd

    data = tables.csv_bytes(pd.DataFrame({"file": ["=cmd|'/c calc'!A1", "ok.png"], "score": [1.0, 2.0]}))
    assert b"'=cmd" in data and b"ok.png" in data


def test_nearest_other_matches_brute_force():
    import numpy as np

    root = make_demo_dataset(n_train=SMALL.n_train, n_test_good=1, n_test_defect=0, size=SMALL.size)
    bank = SPADE(calibration_images=0).fit(collect_inputs([root / "train" / "good"]).items).bank
    distances, others = findings.nearest_other(bank)
    features = np.asarray(bank.global_features, np.float64)
    full = ((features[:, None, :] - features[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(full, np.inf)
    assert np.array_equal(others, full.argmin(1))
    assert np.allclose(distances, full.min(1), rtol=1e-4)
