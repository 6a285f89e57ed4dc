"""Controls the pages share: synced thresholds, pagination, input pickers, image grids, error display."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import streamlit as st

from ..backbones import WeightsUnavailable
from ..bank import BankError
from ..imageio import ImageLoadError
from ..sources import IMAGE_EXTENSIONS, Collection, collect_inputs, items_from_upload
from . import session

UPLOAD_TYPES = sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS) + ["zip"]
USER_ERRORS = (BankError, WeightsUnavailable, ImageLoadError, ValueError, OSError)
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~<>$:&\"'=^@%])")


def plain(text: object) -> str:
    """User text (file names, messages that quote them) made literal for Markdown renderers."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


def require_bank() -> session.BankState:
    """This session's bank state, or a pointer to where to make one and the end of this page run."""
    state = session.bank_state()
    if state is None:
        st.info("Build or load a normal bank first (or run the demo from the Home page).")
        st.page_link("pages/bank.py", label="Go to Normal bank", icon=":material/inventory_2:")
        st.page_link("pages/home.py", label="Go to the demo", icon=":material/home:")
        st.stop()
    return state


@contextmanager
def user_errors(action: str) -> Iterator[None]:
    """Show a failure the user can act on as one st.error line instead of a traceback."""
    try:
        yield
    except USER_ERRORS as exc:
        st.error(f"**{action} failed.** {plain(exc)}")


def show_problems(lines: Sequence[str], summary: str, error: bool = False) -> None:
    """A one-line summary with the full list in an expander (nothing is rendered as HTML)."""
    if not lines:
        return
    (st.error if error else st.warning)(summary)
    with st.expander(f"Details ({len(lines)})"):
        st.markdown("\n".join(f"- {plain(line)}" for line in lines))


def threshold_control(label: str, key: str, suggested: float, upper: float, help: str) -> float:
    """A slider and a number input kept in sync, both bound to ``st.session_state[key]``.

    The value lives under a plain key, so it survives page switches; the widgets are
    re-seeded from it on every run and copy changes back through their callbacks.
    """
    value = float(st.session_state.setdefault(key, suggested))
    top = max(upper, value, suggested, 1e-6) * 1.05
    step = float(10 ** math.floor(math.log10(top / 200)))
    fmt = "%.4g"  # four significant digits at any scale (tau ~ 10, theta ~ 1000)
    slider_key, number_key = f"{key}_slider", f"{key}_number"
    st.session_state[slider_key] = value
    st.session_state[number_key] = value

    def copy(source: str) -> None:
        st.session_state[key] = float(st.session_state[source])

    def reset() -> None:
        st.session_state[key] = suggested

    left, middle, right = st.columns([5, 2, 2], vertical_alignment="bottom")
    left.slider(label, 0.0, top, step=step, format=fmt, key=slider_key, on_change=copy, args=(slider_key,), help=help)
    middle.number_input(f"{label} (exact)", min_value=0.0, step=step, format=fmt, key=number_key, on_change=copy,
                        args=(number_key,))
    right.button(f"Reset to suggested ({suggested:.4g})", key=f"{key}_reset", on_click=reset)
    return float(st.session_state[key])


def paginate(count: int, per_page: int, key: str) -> range:
    """The index range of the current page; draws a page picker when there is more than one page."""
    pages = max(1, math.ceil(count / per_page))
    if pages == 1:
        return range(count)
    column, note = st.columns([1, 4], vertical_alignment="bottom")
    page = int(column.number_input(f"Page (1–{pages})", min_value=1, max_value=pages, step=1, key=key))
    shown = range((page - 1) * per_page, min(count, page * per_page))
    note.caption(f"Showing {shown.start + 1}–{shown.stop} of {count}")
    return shown


def image_grid(pictures: Sequence[np.ndarray], captions: Sequence[str], per_row: int = 6) -> None:
    """Pictures in rows of ``per_row`` columns, each with a (literal) caption."""
    for start in range(0, len(pictures), per_row):
        columns = st.columns(per_row)
        for column, picture, caption in zip(columns, pictures[start : start + per_row], captions[start : start + per_row]):
            column.image(picture, caption=caption_text(caption))


def pair_grid(pairs: Sequence[tuple[np.ndarray, str, np.ndarray, str, str]], per_row: int = 3) -> None:
    """Pairs of pictures side by side in bordered boxes: (left, caption, right, caption, note below)."""
    for start in range(0, len(pairs), per_row):
        for column, (left, left_caption, right, right_caption, note) in zip(st.columns(per_row),
                                                                         pairs[start : start + per_row]):
            box = column.container(border=True)
            one, two = box.columns(2)
            one.image(left, caption=caption_text(left_caption))
            two.image(right, caption=caption_text(right_caption))
            box.caption(caption_text(note))


def caption_text(lines: str) -> str:
    """Escape each line of a caption and keep the line breaks."""
    return "  \n".join(plain(line) for line in lines.split("\n"))


def choose_inputs(key: str, action: str, folder_hint: str) -> Collection | None:
    """Upload (many images or a .zip) or a folder on the server; a Collection once ``action`` is clicked."""
    source = st.radio("Images from", ["Upload", "Folder on the server"], horizontal=True, key=f"{key}_source")
    if source == "Upload":
        files = st.file_uploader("Images or a .zip archive (folders inside the zip are kept)", type=UPLOAD_TYPES,
                                 accept_multiple_files=True, key=f"{key}_files")
    else:
        folder = st.text_input("Folder path on the server (searched recursively; .zip files also work)",
                               key=f"{key}_folder", placeholder=folder_hint)
    if not st.button(action, type="primary", key=f"{key}_go"):
        return None
    if source == "Upload":
        if not files:
            st.warning("Nothing uploaded yet: choose some images or a .zip archive first.")
            return None
        collection = Collection()
        for upload in files:
            collection.extend(items_from_upload(upload.name, upload.getvalue()))
        return collection
    if not folder.strip():
        st.warning("Enter a folder path on the server first.")
        return None
    return collect_inputs([folder.strip()])
