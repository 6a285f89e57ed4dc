"""Inspect one image: its nearest normal images, its anomaly map and the mask at the pixel threshold theta."""

from functools import partial

import numpy as np
import streamlit as st

from anomaly.app import cache, entry, figures, progress, render, session, widgets
from anomaly.app.widgets import plain
from anomaly.datasets import load_mask
from anomaly.postprocess import binary_mask

entry.through_entrypoint()

SHOWN_NEIGHBOURS = 8
DISPLAY_SIDE = 768  # pixels sent to the browser per picture (downloads keep the full size)

st.title("Inspect")
state, batch = session.bank_state(), session.batch()
if state is None or batch is None:
    st.info("Score a batch first: the images to inspect come from it.")
    st.page_link("pages/score.py", label="Go to Score a batch", icon=":material/analytics:")
    st.stop()
if batch.fingerprint != state.bank.fingerprint:
    st.warning("The batch was scored against another normal bank: score it again on the Score page.")
    st.stop()
order = batch.by_score()
if not order:
    st.warning("No image of this batch could be read, so there is nothing to inspect.")
    st.stop()

model = session.model(state)
bank = state.bank
settings = cache.model_key(model)
suggested_theta = session.suggested(state, model)[1]
tau = session.tau(state, model) or 0.0

# ---- which image: pick from the list (highest score first) or step with previous / next ----
rank = {image: position for position, image in enumerate(order)}
index = st.session_state.get(session.INSPECT, order[0])
index = index if index in rank else order[0]
st.session_state[session.INSPECT] = st.session_state["inspect_pick"] = index
position = rank[index]


def show(target: int) -> None:
    st.session_state[session.INSPECT] = target


back, pick, forward = st.columns([1, 6, 1], vertical_alignment="bottom")
back.button("Previous", icon=":material/arrow_back:", disabled=position == 0, on_click=show,
            args=(order[max(0, position - 1)],), width="stretch")
pick.selectbox("Image (highest score first)", order, key="inspect_pick",
               on_change=lambda: show(st.session_state["inspect_pick"]),
               format_func=lambda i: f"{rank[i] + 1}. {batch.results[i].relpath}  (score {batch.results[i].score:.4g})")
forward.button("Next", icon=":material/arrow_forward:", disabled=position == len(order) - 1, on_click=show,
               args=(order[min(len(order) - 1, position + 1)],), width="stretch")

result, item = batch.results[index], batch.items[index]
verdict = "anomalous" if result.score > tau else "normal"
label = batch.labels[index]
truth = "" if label is None else f" · label: {'good' if label == 0 else plain(batch.defects[index])}"
st.markdown(f"**{plain(result.relpath)}** · rank {position + 1} of {len(order)} · kNN score **{result.score:.4g}** "
            f"(τ = {tau:.4g}) → **{verdict}**{truth}")

# ---- the pixel map: computed on demand, cached by content, kept in the session ----
if index not in batch.maps:
    with st.spinner(f"Computing the anomaly map of {plain(result.relpath)}…"):
        batch.maps[index] = cache.anomaly_map(batch.digests[index], bank.fingerprint, settings,
                                              _model=model, _item=item)
anomaly_map = batch.maps[index]
suggested_theta = suggested_theta or float(anomaly_map.max())
theta = widgets.threshold_control(
    "Pixel threshold θ", session.THETA, suggested_theta,
    upper=max([2 * suggested_theta] + [float(m.max()) for m in batch.maps.values()]),
    help="A pixel is anomalous when its score (mean squared feature distance to its nearest normal pixels) "
         "is above θ. Starts at the bank's suggestion, from leave-one-out maps of normal images.")
high = 2 * suggested_theta

picture = cache.picture(batch.digests[index], _item=item)
mask = binary_mask(anomaly_map, theta)
gt = load_mask(batch.masks[index], anomaly_map.shape) if batch.masks[index] is not None else None
columns = st.columns([1.3, 2.2, 1.8, 1.1, 1.1] if gt is not None else [1.3, 2.2, 1.8, 1.1], gap="medium")

columns[0].image(render.shrink(picture, DISPLAY_SIDE), caption=widgets.caption_text(f"Test image\n{result.relpath}"),
                 width="stretch")

with columns[1]:
    st.markdown(f"**Nearest normal images** (closest first, {len(result.neighbours)} used)")
    top = list(zip(result.neighbours[:SHOWN_NEIGHBOURS], result.neighbour_distances[:SHOWN_NEIGHBOURS]))
    widgets.image_grid([render.thumbnail(bank.thumbnails[n], bank.sizes[n], 120) for n, _ in top],
                       [f"#{rank + 1} d²={d:.4g}" for rank, (n, d) in enumerate(top)], per_row=4)
    st.caption("d²: squared distance between global features. File names are in the list of all neighbours below.")

small = render.shrink(picture, 256)
small_map = render.shrink(anomaly_map, max(small.shape[:2]))
with columns[2]:
    st.plotly_chart(figures.heatmap_figure(small, small_map, high, "Anomaly map"), config={"displaylogo": False})
    st.caption(f"Colour scale 0 to {high:.4g} (2 × suggested θ); hover for each pixel's score. "
               f"Maximum here: {anomaly_map.max():.4g}.")
columns[3].image(render.shrink(render.mask_picture(mask), DISPLAY_SIDE), width="stretch",
                 caption=f"Binary mask at θ = {theta:.4g}: {100 * mask.mean():.1f} % of pixels")
if gt is not None:
    union = np.logical_or(mask, gt).sum()
    overlap = f"IoU with the mask: {np.logical_and(mask, gt).sum() / union:.2f}" if union else "no defect pixels"
    columns[4].image(render.shrink(render.mask_picture(gt), DISPLAY_SIDE), width="stretch",
                     caption=widgets.caption_text(f"Ground truth ({batch.defects[index]})\n{overlap}"))

with st.expander(f"All {len(result.neighbours)} nearest normal images"):
    widgets.image_grid([render.thumbnail(bank.thumbnails[n], bank.sizes[n], 120) for n in result.neighbours],
                       [f"#{rank + 1} d² = {d:.4g}\n{bank.paths[n].rsplit('/', 1)[-1]}"
                        for rank, (n, d) in enumerate(zip(result.neighbours, result.neighbour_distances))],
                       per_row=10)

stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in result.relpath.rsplit(".", 1)[0])[-80:]
downloads = st.columns([2, 2, 4])
downloads[0].download_button("Anomaly map overlay (PNG)", partial(render.overlay_png, picture, anomaly_map, high),
                             file_name=f"{stem}_map.png", mime="image/png", on_click="ignore",
                             icon=":material/download:")
downloads[1].download_button("Binary mask (PNG)", partial(render.mask_png, mask),
                             file_name=f"{stem}_mask.png", mime="image/png", on_click="ignore",
                             icon=":material/download:")

# ---- maps for every flagged image at once ----
flagged = [i for i in order if batch.results[i].score > tau]
missing = [i for i in flagged if i not in batch.maps]
with downloads[2]:
    if st.button(f"Compute maps for all {len(flagged)} flagged images ({len(missing)} left)", disabled=not missing,
                 icon=":material/bolt:", key="maps_for_flagged"):
        report = progress.counter("Computing anomaly maps of flagged images")
        for done, i in enumerate(missing, start=1):
            batch.maps[i] = cache.anomaly_map(batch.digests[i], bank.fingerprint, settings,
                                              _model=model, _item=batch.items[i])
            report(done, len(missing))
        st.rerun()
