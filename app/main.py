"""The workbench's web app: ``python -m app ui`` (:mod:`app.serve`: localhost, no usage statistics, from any
directory), or ``streamlit run app/main.py`` from the repository root (``.streamlit/config.toml`` says the same).

Pages live in the top-level ``pages/`` folder and are registered here explicitly with ``st.navigation``. Edits run
in a separate worker process (:mod:`app.worker`) started on demand; this process only reads the run store and
queues jobs (:mod:`app.jobs`). Settings come from the environment (:mod:`app.settings`).

``import app`` finds the project because it is installed (``pip install -e .``, scripts/setup.sh) or because
``python3 -m streamlit`` puts the current directory (the repository root) on the path.
"""
from __future__ import annotations

import streamlit as st

from app import settings, ui
from app.worker import worker_alive

st.set_page_config(page_title="Editbench · knowledge-editing workbench", page_icon=":material/edit_note:",
                   layout="wide")
if ui.bound_everywhere_unasked():
    st.error("This workbench was started without its settings and listens on every network interface, so anyone "
             "who can reach this machine could use it. Stop it and start it with `python -m app ui` (this machine "
             "only), or pass `--server.address` yourself to choose an address on purpose.")
    st.stop()
navigation = st.navigation(ui.all_pages())
ui.housekeeping()
with st.sidebar:
    st.caption(f"Run store: `{settings.runs_dir()}`")
    alive = worker_alive(settings.runs_dir(), settings.device_setting())
    st.caption(f"Worker ({settings.device_setting()}): {'running' if alive else 'starts with the first job'}")
navigation.run()
