"""SPADE anomaly detection dashboard: ``streamlit run dashboard.py`` (works offline).

Navigation only; each page lives in pages/ and the shared glue in anomaly/app/.
Set ANOMALY_DEMO_SMALL=1 for a tiny built-in demo (tests, slow machines).
"""

import streamlit as st

from anomaly.app import cache, session
from anomaly.app.widgets import plain

st.set_page_config(page_title="SPADE anomaly detection", page_icon=":material/search_insights:", layout="wide")

page = st.navigation([
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/bank.py", title="Normal bank", icon=":material/inventory_2:"),
    st.Page("pages/score.py", title="Score a batch", icon=":material/analytics:"),
    st.Page("pages/inspect.py", title="Inspect", icon=":material/image_search:"),
    st.Page("pages/sanity.py", title="Dataset sanity check", icon=":material/fact_check:"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/query_stats:"),
])

summary = st.sidebar.empty()


def summarise_session() -> None:
    """What this session holds; drawn before the page and again after it, so it shows what the page did."""
    state, batch = session.bank_state(), session.batch()
    with summary.container():
        st.caption("This session")
        if state is None:
            st.caption("No normal bank yet.")
        else:
            st.caption(f"Bank: {len(state.bank):,} normal images, {plain(state.bank.identity.name)}")
        if batch is not None:
            st.caption(f"Batch: {len(batch.results):,} images scored")


cache.warm_up()
summarise_session()
page.run()
summarise_session()  # not reached when a page stops early, which it does only when it changed nothing
