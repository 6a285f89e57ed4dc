"""The dashboard's multi-step actions: build or load a bank, score a batch, run the demo.

Each returns what the session keeps; heavy steps go through :mod:`.cache` (so a repeat
with the same content is instant) and draw progress bars with counts.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import streamlit as st

from ..bank import NormalBank
from ..datasets import MVTecCategory, labels_from_relpaths, load_mvtec_category, mvtec_from_items
from ..demo import make_demo_dataset
from ..sources import Collection, InputItem
from ..spade import SPADE
from . import cache, session

CALIBRATION_IMAGES: int = inspect.signature(SPADE).parameters["calibration_images"].default


@dataclass(frozen=True)
class ScoringSet:
    items: list[InputItem]
    labels: list[int | None]
    defects: list[str | None]
    masks: list[InputItem | None]
    note: str | None = None


def scoring_set(collection: Collection, name: str) -> ScoringSet:
    """The images to score, with labels and masks when the input follows the MVTec layout.

    The MVTec layout (test/ and ground_truth/, with or without train/) gives its test images with masks;
    otherwise a folder named ``good`` means normal and any other folder a defect type.
    """
    try:
        category = mvtec_from_items(collection.items, name, require_train=False)
    except ValueError:
        labels = labels_from_relpaths(collection.items)
        defects = [None if label is None else PurePosixPath(item.relpath).parent.name
                   for item, label in zip(collection.items, labels)]
        return ScoringSet(collection.items, labels, defects, [None] * len(labels))
    return labelled_test_set(category, note=f"MVTec layout found: scoring its {len(category.test)} test images "
                                            f"(train/ is not scored).")


def labelled_test_set(category: MVTecCategory, note: str | None = None) -> ScoringSet:
    test = category.test
    return ScoringSet([t.item for t in test], [t.label for t in test], [t.defect for t in test],
                      [t.mask for t in test], note)


def build_bank(items: Sequence[InputItem], backbone: str, source: str,
               calibration_images: int = CALIBRATION_IMAGES) -> session.BankState:
    """Fit (or fetch from the cache) a bank on normal images; raises BankError if none is readable."""
    extractor = cache.extractor(backbone)
    key = cache.batch_key(items, cache.digests(items))
    bank = cache.share_bank(cache.fit_bank(key, backbone, calibration_images, _items=items, _extractor=extractor))
    return session.BankState(bank, backbone, source, extractor.notice)


def adopt_bank(bank: NormalBank, backbone: str, source: str) -> session.BankState:
    """Use a loaded bank; ``"auto"`` means the bank's own backbone, anything else must match it."""
    name = bank.identity.name if backbone == "auto" else backbone
    extractor = cache.extractor(name)
    bank.check_compatible(extractor.identity, source)
    notice = f"Using {name}, the backbone this bank was built with." if backbone == "auto" else extractor.notice
    return session.BankState(cache.share_bank(bank), name, source, notice)


def score(test: ScoringSet, state: session.BankState, source: str, errors: Sequence[str] = ()) -> session.Batch:
    """Score a test set against the session's bank (cached by content, bank and settings)."""
    model = session.model(state)
    digests = cache.digests(test.items)
    results = cache.score_batch(cache.batch_key(test.items, digests), state.bank.fingerprint, cache.model_key(model),
                                _model=model, _items=test.items)
    return session.Batch(source=source, fingerprint=state.bank.fingerprint, items=list(test.items), digests=digests,
                         results=results, labels=list(test.labels), defects=list(test.defects),
                         masks=list(test.masks), errors=list(errors), note=test.note)


def rescore(batch: session.Batch, state: session.BankState) -> session.Batch:
    """The same inputs scored against another bank."""
    test = ScoringSet(batch.items, batch.labels, batch.defects, batch.masks, batch.note)
    return score(test, state, batch.source, batch.errors)


@dataclass(frozen=True)
class DemoSettings:
    n_train: int
    n_test_good: int
    n_test_defect: int
    size: int
    calibration_images: int


FULL_DEMO = DemoSettings(n_train=40, n_test_good=8, n_test_defect=16, size=256, calibration_images=4)
SMALL_DEMO = DemoSettings(n_train=8, n_test_good=2, n_test_defect=3, size=64, calibration_images=2)


def demo_settings() -> DemoSettings:
    """ANOMALY_DEMO_SMALL=1 makes a tiny demo (tests, slow machines)."""
    return SMALL_DEMO if os.environ.get("ANOMALY_DEMO_SMALL") == "1" else FULL_DEMO


def run_demo() -> None:
    """Generate the synthetic dataset, build the bank from train/good, score test/ (labels and masks known)."""
    settings = demo_settings()
    total = settings.n_train + settings.n_test_good + settings.n_test_defect
    with st.status("Running the demo…", expanded=True) as status:
        st.write(f"**1/3** Generating the synthetic dataset ({total} images of {settings.size}×{settings.size} px, "
                 f"with defect masks)…")
        root = make_demo_dataset(n_train=settings.n_train, n_test_good=settings.n_test_good,
                                 n_test_defect=settings.n_test_defect, size=settings.size)
        category = load_mvtec_category(root)
        st.write(f"**2/3** Building the normal bank from {len(category.train)} normal images…")
        state = build_bank(category.train, "auto", f"demo dataset, train/good ({len(category.train)} images)",
                           settings.calibration_images)
        session.set_bank(state)
        st.write(f"**3/3** Scoring {len(category.test)} labelled test images…")
        test = labelled_test_set(category)
        session.set_batch(score(test, state, f"demo dataset, test/ ({len(test.items)} images)"))
        status.update(label="Demo ready", state="complete", expanded=False)


def bank_file_bytes(bank: NormalBank) -> bytes:
    """The bank as a file's bytes, for a download (written by the library's own atomic save)."""
    with tempfile.TemporaryDirectory(prefix="spade-download-") as folder:
        path = Path(folder) / "bank.safetensors"
        bank.save(path)
        return path.read_bytes()


def save_bank(bank: NormalBank, path: str) -> Path:
    """Save to a new file on the server; refuses to overwrite so no one's file is clobbered."""
    target = Path(path).expanduser()
    if target.exists():
        raise ValueError(f"{target}: already exists; choose a new file name")
    if not target.parent.is_dir():
        raise ValueError(f"{target.parent}: no such folder")
    bank.save(target)
    return target
