"""Normal bank: build one from normal images or load a saved one; see, save and download it."""

from functools import partial

import streamlit as st

from anomaly import search
from anomaly.app import cache, entry, figures, render, session, widgets, workflows
from anomaly.app.widgets import plain
from anomaly.backbones import BACKBONES
from anomaly.bank import NormalBank

entry.through_entrypoint()

st.title("Normal bank")
st.caption("The bank holds the features of images known to be normal; every test image is compared with it.")

backbone = st.selectbox(
    "Backbone", BACKBONES, key="bank_backbone",
    help="auto: wide_resnet50_2 when its ImageNet weights are available, otherwise efficientnet_lite0 "
         "(bundled, works offline). A loaded bank with auto uses the backbone it was built with.",
)
build, load = st.tabs(["Build from normal images", "Load a saved bank"])

with build:
    collection = widgets.choose_inputs("bank_build", "Build the bank", "/data/mvtec/bottle/train/good")
    if collection is not None:
        widgets.show_problems(collection.errors, "Some of the input could not be used.", error=True)
        if collection.items:
            with widgets.user_errors("Building the bank"):
                with st.status(f"Building the normal bank from {len(collection.items):,} inputs…",
                               expanded=True) as status:
                    state = workflows.build_bank(collection.items, backbone,
                                                 f"{len(collection.items):,} inputs ({backbone})")
                    status.update(label=f"Normal bank ready: {len(state.bank):,} images", state="complete",
                                  expanded=False)
                session.set_bank(state)

with load:
    where = st.radio("Bank file from", ["Upload", "Path on the server"], horizontal=True, key="bank_load_source")
    if where == "Upload":
        upload = st.file_uploader("Bank file (saved by this page or by `python -m anomaly fit`)", key="bank_file")
    else:
        path = st.text_input("Bank file path on the server", key="bank_path", placeholder="/data/banks/bottle.safetensors")
    if st.button("Load the bank", type="primary", key="bank_load_go"):
        if (where == "Upload" and upload is None) or (where != "Upload" and not path.strip()):
            st.warning("Choose a bank file first.")
        else:
            with widgets.user_errors("Loading the bank"):
                with st.spinner("Reading the bank…"):
                    if where == "Upload":
                        bank, source = cache.load_bank_bytes(upload.name, upload.getvalue()), upload.name
                    else:
                        bank, source = NormalBank.load(path.strip()), path.strip()
                    session.set_bank(workflows.adopt_bank(bank, backbone, source))

state = session.bank_state()
if state is None:
    st.info("No bank in this session yet: build or load one above, or run the demo from the Home page.")
    st.stop()

bank, identity = state.bank, state.bank.identity
model = session.model(state)
st.divider()
st.header("Current bank")
st.caption(f"From: {plain(state.source)} · fingerprint `{bank.fingerprint}`")
cols = st.columns(3)
cols[0].metric("Normal images", f"{len(bank):,}")
cols[1].metric("Global feature size", f"{bank.global_features.shape[1]:,}")
cols[2].metric("Bank size", f"{bank.nbytes() / 2**20:,.1f} MiB")
st.markdown(f"**Backbone in use:** {plain(identity.name)} · weights: {plain(identity.weights)} · "
            f"input {identity.image_size}×{identity.image_size} px · K = {model.k} nearest normal images · "
            f"pixel search: {search.describe(model.precision)}")
if state.notice:
    st.info(plain(state.notice))
widgets.show_problems(bank.skipped, f"{len(bank.skipped):,} normal input(s) could not be read and were skipped.")

loo = cache.leave_one_out(bank.fingerprint, model.k, bank)
suggested_tau, suggested_theta = session.suggested(state, model)
tau = session.tau(state, model)
if len(loo):
    st.plotly_chart(figures.score_histogram(
        {"normal bank (leave-one-out)": loo}, tau,
        "Leave-one-out kNN scores of the normal images (each against the others)"))
    st.caption(f"Suggested τ = {suggested_tau:.4g}: flags about 1% of the normal images themselves. "
               f"Suggested pixel threshold θ = {suggested_theta or 0:.4g}.")
else:
    st.caption("A single-image bank has no leave-one-out scores, so no threshold can be suggested.")

st.subheader("Save")
download, server = st.columns(2)
download.download_button("Download the bank file", data=partial(workflows.bank_file_bytes, bank),
                         file_name=f"bank-{bank.fingerprint}.safetensors", mime="application/octet-stream",
                         on_click="ignore", icon=":material/download:")
with server:
    target = st.text_input("Or save on the server (new file)", key="bank_save_path",
                           placeholder="/data/banks/bottle.safetensors")
    if st.button("Save on the server", key="bank_save_go"):
        with widgets.user_errors("Saving the bank"):
            saved = workflows.save_bank(bank, target.strip())
            st.success(f"Saved {plain(saved)}")

st.subheader("Normal images")
shown = widgets.paginate(len(bank), 24, key="bank_page")
widgets.image_grid([render.thumbnail(bank.thumbnails[i], bank.sizes[i]) for i in shown],
                   [f"{i + 1}. {bank.paths[i].rsplit('/', 1)[-1]}\n{bank.sizes[i][1]}×{bank.sizes[i][0]} px"
                    for i in shown], per_row=8)
