"""Progress bars with counts, for every step that can take more than a second."""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from ..features import Progress


def counter(label: str, unit: str = "images") -> Progress:
    """A progress bar that reads "label: done / total unit"; returns its ``progress(done, total)``."""
    bar = st.progress(0.0, text=f"{label}: starting…")

    def update(done: int, total: int) -> None:
        bar.progress(min(1.0, done / total) if total else 1.0, text=f"{label}: {done:,} / {total:,} {unit}")

    return update


def stages(labels: dict[str, str]) -> Callable[[str, int, int], None]:
    """One bar per named stage, created when the stage first reports (``stage(name, done, total)``)."""
    bars: dict[str, Progress] = {}

    def update(name: str, done: int, total: int) -> None:
        if name not in bars:
            bars[name] = counter(labels.get(name, name))
        bars[name](done, total)

    return update
