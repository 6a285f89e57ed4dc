"""Dataset sanity check: suspicious normals, near-duplicates, unreadable files, sizes, test/train leakage."""

import streamlit as st

from anomaly.app import cache, entry, figures, findings, render, session, widgets
from anomaly.app.widgets import plain

entry.through_entrypoint()

st.title("Dataset sanity check")
state = widgets.require_bank()

bank = state.bank
model = session.model(state)
loo = cache.leave_one_out(bank.fingerprint, model.k, bank)
tau = session.tau(state, model)
nearest, others = cache.nearest_other(bank.fingerprint, bank)
typical = findings.typical_distance(nearest)
duplicate_below = findings.DUPLICATE_FRACTION * typical
st.caption(f"Normal bank: {len(bank):,} images from {plain(state.source)}. Distances are squared distances "
           f"between global features; a typical normal image's nearest other normal is {typical:.4g} away.")


def name(index: int) -> str:
    return bank.paths[index].rsplit("/", 1)[-1]


def thumb(index: int):
    return render.thumbnail(bank.thumbnails[index], bank.sizes[index])


st.header("Normals that look least like the others")
st.caption("Highest leave-one-out scores (each image against the other normals): likely mislabelled, "
           "contaminated or unusual captures. Above τ means the bank itself would flag it.")
if len(loo):
    ranked = findings.least_typical(loo)
    above = sum(1 for i in ranked if tau is not None and loo[i] > tau)
    st.write(f"{above:,} of {len(bank):,} normal images score above τ = {tau or 0:.4g}.")
    shown = widgets.paginate(len(ranked), 12, key="sanity_outliers_page")
    widgets.image_grid([thumb(ranked[r]) for r in shown],
                       [f"{r + 1}. score {loo[ranked[r]]:.4g}{' (above τ)' if tau is not None and loo[ranked[r]] > tau else ''}"
                        f"\n{name(ranked[r])}" for r in shown], per_row=6)
else:
    st.write("A single-image bank has nothing to compare with.")

st.header("Near-duplicate pairs among the normals")
pairs = findings.closest_pairs(nearest, others)
duplicates = [p for p in pairs if p.distance <= duplicate_below]
st.caption(f"Closest pairs found with the bank's faiss index. A pair closer than {duplicate_below:.4g} "
           f"({findings.DUPLICATE_FRACTION:.0%} of the typical distance) counts as a near-duplicate: "
           "it adds nothing to the bank and may hide leakage.")
if pairs:
    st.write(f"{len(duplicates):,} near-duplicate pair(s); closest pairs first:")
    shown = widgets.paginate(len(pairs), 6, key="sanity_pairs_page")
    widgets.pair_grid([
        (thumb(p.first), name(p.first), thumb(p.second), name(p.second),
         f"d² = {p.distance:.4g}{' · near-duplicate' if p.distance <= duplicate_below else ''}")
        for p in (pairs[i] for i in shown)])

st.header("Images that failed to load")
if bank.skipped:
    widgets.show_problems(bank.skipped, f"{len(bank.skipped):,} input(s) were skipped when the bank was built.")
else:
    st.success("Every normal input could be read.")

st.header("Image sizes")
table = findings.size_table(bank.sizes)
sizes, chart = st.columns([2, 3])
with sizes:
    st.dataframe(table, hide_index=True)
    if len(table) > 1:
        st.warning(f"{len(table)} different sizes: every image is resized to the network input, so different "
                   "aspect ratios are stretched differently.")
    else:
        st.success("All normal images have the same size.")
chart.plotly_chart(figures.sizes_figure(bank.sizes))

st.header("Test images that are (nearly) in the bank")
batch = session.batch()
if batch is None or batch.fingerprint != bank.fingerprint:
    st.info("Score a batch against this bank to check it for leakage.")
    st.stop()
leaks = [p for p in findings.train_test_pairs(batch.results) if p.distance <= duplicate_below]
st.caption(f"A test image whose nearest normal image is closer than {duplicate_below:.4g} is probably a copy of "
           "it: its score says nothing about generalisation.")
if not leaks:
    st.success(f"None of the {len(batch.valid):,} scored images is a near-copy of a normal image.")
else:
    st.warning(f"{len(leaks):,} test image(s) are near-copies of normal images.")
    shown = widgets.paginate(len(leaks), 6, key="sanity_leaks_page")
    widgets.pair_grid([
        (render.shrink(cache.picture(batch.digests[p.first], _item=batch.items[p.first]), 160),
         f"test: {batch.results[p.first].relpath}", thumb(p.second), f"normal: {name(p.second)}",
         f"d² = {p.distance:.4g}")
        for p in (leaks[i] for i in shown)])
