"""The workbench's web app: ``streamlit run app/main.py`` (binds to localhost; see ``.streamlit/config.toml``).

Pages live in the top-level ``pages/`` folder and are registered here explicitly with ``st.navigation``. Edits run
in a separate worker process (:mod:`app.worker`) started on demand; this process only reads the run store and
queues jobs (:mod:`app.jobs`). Settings come from the environment (:mod:`app.settings`).
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import streamlit as st  # noqa: E402

from app import settings, ui  # noqa: E402
from app.worker import worker_alive  # noqa: E402

st.set_page_config(page_title="Editbench · knowledge-editing workbench", page_icon=":material/edit_note:",
                   layout="wide")
navigation = st.navigation(ui.all_pages())
ui.housekeeping()
with st.sidebar:
    st.caption(f"Run store: `{settings.runs_dir()}`")
    alive = worker_alive(settings.runs_dir(), settings.device_setting())
    st.caption(f"Worker ({settings.device_setting()}): {'running' if alive else 'starts with the first job'}")
navigation.run()
