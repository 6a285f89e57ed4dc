"""Score a batch: scores, the image threshold tau, the distribution against the normals, CSV export."""

from functools import partial

import streamlit as st

from anomaly.app import cache, entry, figures, session, tables, widgets, workflows
from anomaly.app.widgets import plain

entry.through_entrypoint()

st.title("Score a batch")
state = widgets.require_bank()

batch = session.batch()
with st.expander("Score new images", expanded=batch is None):
    collection = widgets.choose_inputs("score", "Score", "/data/mvtec/bottle/test")
    if collection is not None:
        widgets.show_problems(collection.errors, "Some of the input could not be used.", error=True)
        if collection.items:
            test = workflows.scoring_set(collection, "the input")
            with widgets.user_errors("Scoring"):
                with st.status(f"Scoring {len(test.items):,} images…", expanded=True) as status:
                    scored = workflows.score(test, state, f"{len(test.items):,} inputs", collection.errors)
                    status.update(label=f"Scored {len(test.items):,} images", state="complete", expanded=False)
                session.set_batch(scored)
                batch = scored

if batch is None:
    st.stop()
if batch.fingerprint != state.bank.fingerprint:
    st.warning("This batch was scored against another normal bank than the current one.")
    if st.button("Score it again against the current bank", type="primary"):
        with widgets.user_errors("Scoring"), st.status("Scoring again…", expanded=True):
            session.set_batch(workflows.rescore(batch, state))
            st.rerun()
    st.stop()

model = session.model(state)
loo = cache.leave_one_out(state.bank.fingerprint, model.k, state.bank)
scores = batch.scores()
suggested = session.suggested(state, model)[0] or 0.0
st.caption(f"Batch: {plain(batch.source)} · bank: {plain(state.source)}")
if batch.note:
    st.info(plain(batch.note))

tau = widgets.threshold_control(
    "Image threshold τ", session.TAU, suggested, upper=max(float(scores.max(initial=0)), float(loo.max(initial=0))),
    help="An image is anomalous when its kNN score (mean squared feature distance to its K nearest normal "
         "images) is above τ. Starts at the bank's suggestion, which flags about 1% of the normals.")

errors = [r.error for r in batch.results if r.error is not None]
counts = st.columns(4)
counts[0].metric("Images scored", f"{len(scores):,}")
counts[1].metric("Flagged anomalous", f"{int((scores > tau).sum()):,}")
counts[2].metric("Below τ", f"{int((scores <= tau).sum()):,}")
counts[3].metric("Unreadable", f"{len(errors):,}")
widgets.show_problems(errors, f"{len(errors):,} file(s) could not be read; the rest of the batch was scored.")
widgets.show_problems(batch.errors, "Some of the input could not be used.", error=True)

valid = batch.valid
if batch.labelled:
    groups = {"test: good": [batch.results[i].score for i in valid if batch.labels[i] == 0],
              "test: defect": [batch.results[i].score for i in valid if batch.labels[i] == 1],
              "test batch": [batch.results[i].score for i in valid if batch.labels[i] is None]}
else:
    groups = {"test batch": list(scores)}
groups["normal bank (leave-one-out)"] = loo
log = st.toggle("Logarithmic score axis", value=figures.wide_spread(groups), key="score_log",
                help="On by default when the scores span more than a factor of 20.")
st.plotly_chart(figures.score_histogram(groups, tau, "kNN scores of the batch against the normal bank", log=log))

confusion = tables.confusion(batch, tau)
if confusion is not None:
    st.subheader("Against the labels")
    cells = st.columns(5)
    cells[0].metric("Image ROC AUC", "n/a" if confusion.auroc is None else f"{confusion.auroc:.3f}",
                    help="Needs both good and defective images; independent of τ.")
    cells[1].metric("Defects flagged (TP)", confusion.true_positives)
    cells[2].metric("Defects missed (FN)", confusion.false_negatives)
    cells[3].metric("Good flagged (FP)", confusion.false_positives)
    cells[4].metric("Good passed (TN)", confusion.true_negatives)

st.subheader("Results")
table = tables.results_table(batch, tau)
st.caption("Highest score first; click a column header to sort differently, select a row to inspect that image.")
picked = st.dataframe(
    table, hide_index=True, on_select="rerun", selection_mode="single-row", key="score_table",
    column_config={tables.SCORE_COLUMN: st.column_config.NumberColumn(format="%.4g"),
                   "anomalous": st.column_config.CheckboxColumn(f"anomalous at τ={tau:.4g}")},
)
download, inspect, _ = st.columns([2, 3, 4])
download.download_button("Download results (CSV)", partial(tables.csv_bytes, table), file_name="scores.csv",
                         mime="text/csv", on_click="ignore", icon=":material/download:")
rows = picked.selection.rows
if rows:
    index = int(table.iloc[rows[0]]["#"])
    if batch.results[index].error is None and inspect.button(
            f"Inspect {plain(batch.results[index].relpath)}", type="primary", icon=":material/image_search:"):
        st.session_state[session.INSPECT] = index
        st.switch_page("pages/inspect.py")
