"""What the dashboard computes once and shares: across reruns, pages and browser sessions.

* ``st.cache_resource`` holds immutable shared objects: the backbone (keyed by name and
  weights) and normal banks (keyed by fingerprint, with their faiss index built before
  they are shared; nothing mutates a bank afterwards).
* ``st.cache_data`` holds per-upload results keyed by content hashes (plus the bank
  fingerprint and model settings); every caller gets its own copy.

Cached functions that take long draw their own progress bar: Streamlit replays it,
finished, on a cache hit. Arguments starting with ``_`` are the objects the key stands for.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Sequence

import numpy as np
import streamlit as st

from .. import features, search
from ..backbones import FeatureExtractor, load_extractor
from ..bank import BankError, NormalBank
from ..datasets import MVTecCategory
from ..evaluation import Report, evaluate
from ..imageio import ImageLoadError, load_image
from ..metrics import roc_curve_points
from ..sources import InputItem
from ..spade import SPADE, ImageResult
from . import findings
from .progress import counter, stages
from .render import to_uint8


@st.cache_resource(show_spinner="Loading the backbone…", max_entries=4)
def extractor(backbone: str, weights: str | None = None) -> FeatureExtractor:
    """The feature extractor, loaded once per process; ``"auto"`` may fall back (see ``.notice``)."""
    return load_extractor(backbone, weights)


@st.cache_resource(show_spinner=False)
def warm_up() -> threading.Thread:
    """The compiled loops (image decoding and resizing, then the pixel search) compiling in the background,
    started once per process as the dashboard opens: with an empty numba cache that takes about 25 s,
    which the first upload and the first bank's calibration maps would otherwise wait for while the user
    is still choosing images."""
    def run() -> None:
        try:
            features.warm_up()
            search.warm_up()
        except Exception as exc:  # the first real use compiles instead, and reports its own errors
            logging.getLogger(__name__).warning("warm-up of the compiled loops failed: %s", exc)

    # Not a daemon (which it would inherit from the script's thread): the interpreter waits for it at exit.
    # A daemon thread still inside a torch call there aborted the process ("terminate called without an
    # active exception").
    thread = threading.Thread(target=run, name="warm-up", daemon=False)
    thread.start()
    return thread


@st.cache_resource(show_spinner=False, max_entries=16)
def _shared_bank(fingerprint: str, _bank: NormalBank) -> NormalBank:
    _ = _bank.index  # built now, before other sessions can search it concurrently
    return _bank


def share_bank(bank: NormalBank) -> NormalBank:
    """The one shared instance of a bank with this fingerprint (the first one seen)."""
    return _shared_bank(bank.fingerprint, bank)


def item_digest(item: InputItem) -> str:
    """Hash of an input's bytes (or of its read error), so equal content shares cached work."""
    try:
        data = item.read_bytes()
    except ImageLoadError as exc:
        data = f"unreadable: {exc}".encode()
    return hashlib.sha256(data).hexdigest()


_QUIET_HASHING = 100
"""Up to this many inputs are hashed without a progress bar (well under a second)."""


def digests(items: Sequence[InputItem]) -> list[str]:
    """Content hashes of the inputs (reading every file), with a progress bar for long lists."""
    report = counter("Reading and hashing the inputs", "files") if len(items) > _QUIET_HASHING else None
    found = []
    for done, item in enumerate(items, start=1):
        found.append(item_digest(item))
        if report is not None and (done % 50 == 0 or done == len(items)):
            report(done, len(items))
    return found


def batch_key(items: Sequence[InputItem], digests: Sequence[str]) -> str:
    """Key of a list of inputs: their names (results carry them) and content hashes, in order."""
    digest = hashlib.sha256()
    for item, content in zip(items, digests, strict=True):
        digest.update(f"{item.path}\0{item.relpath}\0{content}\n".encode())
    return digest.hexdigest()


def model_key(model: SPADE) -> str:
    """Everything besides the bank and the inputs that changes a score or a map."""
    identity = model.extractor.identity
    return f"{identity.name}|{identity.weights}|k={model.k}|kappa={model.kappa}|sigma={model.sigma}|{model.image_score}"


@st.cache_resource(show_spinner=False, max_entries=4)
def fit_bank(
    content: str, backbone: str, calibration_images: int, _items: Sequence[InputItem], _extractor: FeatureExtractor
) -> NormalBank:
    """Fit a bank on the normal images (keyed by their content hash and the backbone)."""
    model = SPADE(extractor=_extractor, calibration_images=calibration_images)
    model.fit(_items, progress=counter("Extracting features of the normal images"),
              calibration_progress=counter("Calibrating the pixel threshold on normal images", "leave-one-out maps"))
    return model.bank


def load_bank_bytes(name: str, data: bytes) -> NormalBank:
    """A bank from uploaded bytes: written to a private temporary file, memory-mapped, unlinked."""
    handle, path = tempfile.mkstemp(prefix="spade-upload-", suffix=".bank")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        return NormalBank.load(path)
    except BankError as exc:
        raise BankError(str(exc).replace(path, name)) from None  # name the user's file, not ours
    finally:
        os.unlink(path)  # the memory maps keep the data readable


@st.cache_data(show_spinner=False, max_entries=32)
def score_batch(content: str, fingerprint: str, settings: str, _model: SPADE, _items: Sequence[InputItem]) -> list[ImageResult]:
    """Image scores and neighbours of a batch (no pixel maps)."""
    return list(_model.score(_items, progress=counter("Scoring")))


@st.cache_data(show_spinner=False, max_entries=512)
def anomaly_map(content: str, fingerprint: str, settings: str, _model: SPADE, _item: InputItem) -> np.ndarray | None:
    """The pixel anomaly map of one image (None if it cannot be read)."""
    return _model.explain(_item).anomaly_map


@st.cache_data(show_spinner=False, max_entries=64)
def picture(content: str, _item: InputItem) -> np.ndarray:
    """An input decoded for display, uint8 RGB at full size (raises ImageLoadError)."""
    return to_uint8(load_image(_item.read_bytes(), _item.path))


@st.cache_data(show_spinner=False, max_entries=64)
def suggestions(fingerprint: str, settings: str, _model: SPADE) -> tuple[float | None, float | None]:
    """The bank's suggested (tau, theta) for this model: tau can take a leave-one-out pass over the bank."""
    return _model.suggested_tau(), _model.suggested_theta()


@st.cache_data(show_spinner=False, max_entries=64)
def leave_one_out(fingerprint: str, k: int, _bank: NormalBank) -> np.ndarray:
    """Each normal image's kNN score against the others, for this K (stored in the bank when K matches)."""
    return np.asarray(_bank.loo_scores_for(k))


@st.cache_data(show_spinner=False, max_entries=16)
def nearest_other(fingerprint: str, _bank: NormalBank) -> tuple[np.ndarray, np.ndarray]:
    """Each normal image's nearest other normal image (see :func:`.findings.nearest_other`)."""
    return findings.nearest_other(_bank)


@st.cache_data(show_spinner=False, max_entries=8)
def evaluation(content: str, backbone: str, _category: MVTecCategory, _extractor: FeatureExtractor) -> tuple[Report, dict]:
    """Fit on the category's train/good, score its test set with maps, and the curves to plot."""
    model = SPADE(extractor=_extractor)
    report, scored = evaluate(_category, model, stage=stages({"fit": "Extracting normal features",
                                                             "calibrate": "Calibrating the pixel threshold",
                                                             "score": "Scoring test images with pixel maps"}))
    return report, _roc_curves(scored)


_MAX_CURVE_PIXELS = 1_000_000


def _roc_curves(scored) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(fpr, tpr) per curve; the pixel curve uses an even subsample of pixels (its AUC in the report is exact)."""
    labels = np.array([s.label for s in scored])
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if len(set(labels.tolist())) == 2:
        for name, values in (("image, kNN score", [s.result.knn_score for s in scored]),
                             ("image, map maximum", [s.result.map_max for s in scored])):
            fpr, tpr, _ = roc_curve_points(labels, np.asarray(values, np.float64))
            curves[name] = (fpr, tpr)
    with_masks = [s for s in scored if s.mask is not None and s.result.anomaly_map is not None]
    if with_masks:
        total = sum(s.mask.size for s in with_masks)
        step = max(1, int(np.ceil(total / _MAX_CURVE_PIXELS)))
        truth = np.concatenate([s.mask.ravel() for s in with_masks])[::step]
        values = np.concatenate([s.result.anomaly_map.ravel() for s in with_masks])[::step]
        if 0 < truth.sum() < truth.size:
            fpr, tpr, _ = roc_curve_points(truth.astype(int), values.astype(np.float64))
            curves["pixel"] = (fpr, tpr)
    return curves
