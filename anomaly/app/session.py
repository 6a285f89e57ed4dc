"""What one browser session has built, kept in ``st.session_state`` (never shared).

Only plain keys are used here (not widget keys), so nothing is lost when a page
switch removes the widgets that produced it. Banks referenced here are the shared,
immutable instances from :mod:`.cache`; everything else belongs to this session.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import streamlit as st

from ..bank import NormalBank
from ..sources import InputItem
from ..spade import SPADE, ImageResult
from . import cache

_BANK = "bank_state"
_BATCH = "batch"
TAU = "tau"
THETA = "theta"
INSPECT = "inspect_index"


@dataclass(frozen=True)
class BankState:
    bank: NormalBank  # shared and immutable
    backbone: str  # the name passed to cache.extractor() to score against this bank
    source: str  # where it came from, for the user
    notice: str | None = None  # why this backbone (set when "auto" chose or fell back)


@dataclass
class Batch:
    """A scored batch: inputs, their results and ground truth when the upload carried it."""

    source: str
    fingerprint: str  # bank it was scored against
    items: list[InputItem]
    digests: list[str]  # content hashes (keys for per-image caches)
    results: list[ImageResult]
    labels: list[int | None]  # 0 good, 1 defect, None unknown
    defects: list[str | None]
    masks: list[InputItem | None]
    errors: list[str]  # problems not tied to one image (bad zip, empty folder)
    note: str | None = None
    maps: dict[int, np.ndarray] = field(default_factory=dict)  # pixel maps computed so far, by index

    @property
    def valid(self) -> list[int]:
        return [i for i, r in enumerate(self.results) if r.error is None]

    def scores(self) -> np.ndarray:
        return np.array([self.results[i].score for i in self.valid], np.float64)

    @property
    def labelled(self) -> bool:
        return any(self.labels[i] is not None for i in self.valid)

    def by_score(self) -> list[int]:
        """Readable images, highest score first."""
        return sorted(self.valid, key=lambda i: -self.results[i].score)


def bank_state() -> BankState | None:
    return st.session_state.get(_BANK)


def set_bank(state: BankState) -> None:
    """Use a new bank; thresholds go back to its suggestions."""
    st.session_state[_BANK] = state
    for key in (TAU, THETA):
        st.session_state.pop(key, None)


def batch() -> Batch | None:
    return st.session_state.get(_BATCH)


def set_batch(new: Batch) -> None:
    st.session_state[_BATCH] = new
    st.session_state.pop(INSPECT, None)


def model(state: BankState) -> SPADE:
    """A SPADE around the session's bank and the shared extractor (cheap: nothing is computed)."""
    return SPADE.from_bank(state.bank, extractor=cache.extractor(state.backbone))


def suggested(state: BankState, spade: SPADE) -> tuple[float | None, float | None]:
    """The bank's suggested (tau, theta), computed once per bank and model settings."""
    return cache.suggestions(state.bank.fingerprint, cache.model_key(spade), _model=spade)


def tau(state: BankState, spade: SPADE) -> float | None:
    """This session's image threshold: the one the user set, else the bank's suggestion."""
    return st.session_state.get(TAU, suggested(state, spade)[0])
