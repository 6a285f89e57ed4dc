"""Every page runs inside dashboard.py, so it gets the page config, the navigation and the sidebar.

Streamlit treats an app with a ``pages/`` folder as an old-style multipage app until the
process first calls ``st.navigation``; until then a requested page file runs *alone* (a
deep link such as /inspect on a freshly started server; every AppTest run). Each page
calls :func:`through_entrypoint` first: in that mode it ends the old-style mode (as
``st.navigation`` does), runs dashboard.py, which opens this same page inside the
navigation, and stops the bare run. It is one run, so a button click is not lost.
If Streamlit drops the flag this reads, the call does nothing.
"""

from __future__ import annotations

import runpy

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager
from streamlit.runtime.scriptrunner import get_script_run_ctx


def through_entrypoint() -> None:
    ctx = get_script_run_ctx()
    if ctx is None or not getattr(PagesManager, "uses_pages_directory", False):
        return
    PagesManager.uses_pages_directory = False
    runpy.run_path(ctx.main_script_path, run_name="__main__")
    st.stop()
