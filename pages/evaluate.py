"""Evaluate: fit on a labelled MVTec-layout category, score its test set, report ROC AUC and PRO."""

import pandas as pd
import streamlit as st

from anomaly.app import cache, entry, figures, widgets
from anomaly.app.widgets import plain
from anomaly.backbones import BACKBONES
from anomaly.datasets import mvtec_from_items

entry.through_entrypoint()

RESULT = "evaluation"

st.title("Evaluate")
st.caption("For a labelled category in the MVTec AD layout: `train/good/`, `test/good/`, `test/<defect>/`, "
           "`ground_truth/<defect>/<name>_mask.png` (masks optional). The bank is fitted on `train/good`; "
           "every test image is scored with its pixel map.")

backbone = st.selectbox("Backbone", BACKBONES, key="evaluate_backbone")
collection = widgets.choose_inputs("evaluate", "Evaluate", "/data/mvtec/bottle")
if collection is not None:
    widgets.show_problems(collection.errors, "Some of the input could not be used.", error=True)
    if collection.items:
        with widgets.user_errors("Evaluation"):
            category = mvtec_from_items(collection.items, "the input")
            extractor = cache.extractor(backbone)
            digests = cache.digests(collection.items)
            with st.status(f"Evaluating: {len(category.train):,} normal images, {len(category.test):,} test "
                           "images…", expanded=True) as status:
                st.session_state[RESULT] = cache.evaluation(cache.batch_key(collection.items, digests), backbone,
                                                            _category=category, _extractor=extractor)
                status.update(label="Evaluation done", state="complete", expanded=False)

if RESULT not in st.session_state:
    st.stop()
report, curves = st.session_state[RESULT]

st.divider()
st.header("Results")
st.caption(f"{report.train_images:,} normal images, {report.test_images:,} test images · backbone "
           f"{report.backbone} ({plain(report.weights)}) · K = {report.k}, κ = {report.kappa}")


def shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


cells = st.columns(4)
cells[0].metric("Image ROC AUC (kNN score)", shown(report.image_auroc_knn))
cells[1].metric("Image ROC AUC (map maximum)", shown(report.image_auroc_map_max))
cells[2].metric("Pixel ROC AUC", shown(report.pixel_auroc), help="Needs ground-truth masks.")
cells[3].metric("PRO (up to 30% FPR)", shown(report.pro), help="Per-region overlap, normalised area up to FPR 0.3.")

image_curves = {name: curve for name, curve in curves.items() if name != "pixel"}
left, right = st.columns(2)
if image_curves:
    left.plotly_chart(figures.roc_figure(
        image_curves, {"image, kNN score": report.image_auroc_knn, "image, map maximum": report.image_auroc_map_max},
        "Image-level ROC"))
if "pixel" in curves:
    right.plotly_chart(figures.roc_figure({"pixel": curves["pixel"]}, {"pixel": report.pixel_auroc},
                                          "Pixel-level ROC"))
    right.caption("Drawn from an even subsample of at most one million pixels; the AUC is computed on all pixels.")
else:
    right.info("No ground-truth masks with defect pixels: pixel metrics are not available.")

st.subheader("Per defect type (each against the good test images)")
breakdown = pd.DataFrame.from_dict(report.per_defect, orient="index").rename_axis("defect type").reset_index()
st.dataframe(breakdown, hide_index=True)
st.caption(f"Time: fit {report.seconds['fit']} s, scoring with maps {report.seconds['score_with_maps']} s "
           f"({report.seconds['per_test_image']} s per test image).")
widgets.show_problems(report.errors, f"{len(report.errors):,} file(s) could not be read and were left out.")
