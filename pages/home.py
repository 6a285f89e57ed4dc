"""Home: what the tool does, the one-click demo, and where to go next."""

import streamlit as st

from anomaly.app import entry, session, widgets, workflows

entry.through_entrypoint()

st.title("SPADE anomaly detection")
st.markdown(
    "Find unusual images, and the unusual pixels in them, using **normal images only**. "
    "SPADE compares each test image with its K nearest normal images in a pretrained network's feature space; "
    "scores are **squared feature distances** (higher = less normal)."
)

demo, guide = st.columns([2, 3], gap="large")
with demo:
    st.subheader("Try the demo")
    settings = workflows.demo_settings()
    st.write(
        f"Generates a synthetic brushed-metal dataset ({settings.n_train} normal images, "
        f"{settings.n_test_good + settings.n_test_defect} labelled test images with scratches, stains and cracks, "
        "and their defect masks), builds the normal bank and scores the test images. No files needed."
    )
    started = st.button("Run the demo", type="primary", icon=":material/play_arrow:", key="run_demo")
    finished = False
    if started:
        with widgets.user_errors("The demo"):
            workflows.run_demo()
            finished = True
    if finished:
        st.switch_page("pages/score.py")

with guide:
    st.subheader("Use your own images")
    st.page_link("pages/bank.py", label="1. Normal bank: build from normal images, or load a saved bank",
                 icon=":material/inventory_2:")
    st.page_link("pages/score.py", label="2. Score a batch: scores, threshold τ, histogram, CSV",
                 icon=":material/analytics:")
    st.page_link("pages/inspect.py", label="3. Inspect: neighbours, anomaly map, mask at θ",
                 icon=":material/image_search:")
    st.page_link("pages/sanity.py", label="4. Dataset sanity check: outliers, duplicates, leakage",
                 icon=":material/fact_check:")
    st.page_link("pages/evaluate.py", label="5. Evaluate on a labelled MVTec-layout folder",
                 icon=":material/query_stats:")

state, batch = session.bank_state(), session.batch()
if state is not None:
    st.success(f"This session has a normal bank of {len(state.bank):,} images"
               + (f" and a scored batch of {len(batch.results):,} images." if batch else "."))
