"""Streamlit helpers shared by the pages: the page list, cached store / queue / views, the run picker synced with
``st.query_params`` (shareable views), figure display with downloads, empty states.

Pages import this module and :mod:`app.views` / :mod:`app.figures`; they never import torch or editors.
"""
from __future__ import annotations

import os
import urllib.parse
from typing import Any, Sequence

import pandas as pd
import streamlit as st

from . import backend, figures, views
from .jobs import JobQueue
from .settings import ROOT, runs_dir
from .store import RunStore

PAGES_DIR = os.path.join(ROOT, "pages")

#: (file in pages/, title, icon); the first is the default page
PAGE_SPECS = (
    ("runs.py", "Runs", ":material/list:"),
    ("new_run.py", "New run", ":material/play_arrow:"),
    ("playground.py", "Playground", ":material/science:"),
    ("metrics.py", "Metrics", ":material/monitoring:"),
    ("weights.py", "Weights", ":material/grid_on:"),
    ("geometry.py", "Geometry", ":material/architecture:"),
    ("hidden_states.py", "Hidden states", ":material/scatter_plot:"),
    ("general.py", "General abilities", ":material/school:"),
)


def page(file: str) -> "st.Page":
    spec = next(s for s in PAGE_SPECS if s[0] == file)
    default = file == PAGE_SPECS[0][0]
    # the default page is served at "/" but would still reserve its own name, which /runs must reach (_runs_alias)
    return st.Page(os.path.join(PAGES_DIR, file), title=spec[1], icon=spec[2], default=default,
                   url_path="index" if default else None)


def _runs_alias() -> None:
    """``/runs``: the Runs page is the default page, served at ``/``; its name in the URL opens it too."""
    st.switch_page(page(PAGE_SPECS[0][0]), query_params=dict(st.query_params))


def all_pages() -> list:
    """Every page, plus the hidden ``/runs`` alias of the default page (not in the menu)."""
    return [page(f) for f, _, _ in PAGE_SPECS] + [st.Page(_runs_alias, title="Runs", url_path="runs",
                                                          visibility="hidden")]


# ---------------------------------------------------------------------------------------------------------------
# resources (global per runs directory; neither holds a model)
# ---------------------------------------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def _store(path: str) -> RunStore:
    return RunStore(path)


@st.cache_resource(show_spinner=False)
def _queue(path: str) -> JobQueue:
    return JobQueue(path)


def store() -> RunStore:
    return _store(runs_dir())


def queue() -> JobQueue:
    return _queue(runs_dir())


def bound_everywhere_unasked() -> bool:
    """Is the server listening on every interface (``server.address`` empty) without anybody having set it (no
    config file, flag or environment variable: :mod:`app.serve` always sets it)?"""
    from streamlit import config
    return not config.get_option("server.address") and config.get_where_defined("server.address") == "<default>"


def housekeeping() -> None:
    """Dead workers -> failed jobs; queued jobs without a worker -> start one. Cheap; called on every rerun."""
    try:
        backend.housekeeping(store(), queue())
    except Exception as exc:  # never break a page for this
        st.toast(f"worker check failed: {exc}")


@st.cache_data(show_spinner=False, max_entries=256)
def _cached_view(path: str, fn_name: str, versions: tuple, args: tuple, kwargs: tuple):
    return getattr(views, fn_name)(_store(path), *args, **dict(kwargs))


def view(fn_name: str, run_ids: Sequence[str], *args: Any, **kwargs: Any):
    """``views.<fn_name>(store, *args, **kwargs)``, cached until one of ``run_ids`` gets new rows."""
    versions = views.run_versions(store(), list(run_ids))
    return _cached_view(runs_dir(), fn_name, versions, args, tuple(sorted(kwargs.items())))


@st.cache_data(show_spinner=False, max_entries=64)
def _cached_projection(path: str, run_id: str, n_edits: int, layer: int, method: str, created: float):
    return views.hidden_projection(_store(path), run_id, n_edits, layer, method)


def projection(run_id: str, n_edits: int, layer: int, method: str):
    """``views.hidden_projection``, cached by run + checkpoint + layer + projection. The states of a stored
    checkpoint never change, so rows the run writes later (``view`` would recompute) keep the cached one; the
    run's creation time is in the key so that a deleted run's id reused by a merge is not served stale."""
    run = store().get_run(run_id)
    return _cached_projection(runs_dir(), run_id, int(n_edits), int(layer), method, float(run["created"]))


# ---------------------------------------------------------------------------------------------------------------
# layout helpers
# ---------------------------------------------------------------------------------------------------------------
def header(title: str, explanation: str) -> None:
    st.title(title)
    st.caption(explanation)


def meaning(*keys: str) -> None:
    """One-sentence meanings of the numbers shown (EVALUATION.md)."""
    lines = [views.MEANINGS[k] for k in keys if k in views.MEANINGS]
    if lines:
        st.caption("  \n".join(lines))


def no_runs() -> None:
    st.info("No runs yet — start one on **New run** (or try a single edit in the **Playground**).")
    c1, c2 = st.columns(2)
    c1.page_link(page("new_run.py"), label="Start a run on New run", icon=":material/play_arrow:")
    c2.page_link(page("playground.py"), label="Open the Playground", icon=":material/science:")


def qp_list(name: str) -> list[str]:
    raw = st.query_params.get(name, "")
    return [x for x in raw.split(",") if x]


def qp_int(name: str, default: int | None = None) -> int | None:
    try:
        return int(st.query_params.get(name, ""))
    except ValueError:
        return default


def qp_choice(name: str, options: Sequence[Any], default: Any) -> int:
    """The index in ``options`` of the URL's ``?name=`` (compared as text), else of ``default``: a widget's
    starting choice when a shared link is opened."""
    texts = [str(o) for o in options]
    want = st.query_params.get(name)
    return texts.index(want) if want in texts else texts.index(str(default))


def qp_subset(name: str, options: Sequence[str], default: Sequence[str]) -> list[str]:
    """The URL's ``?name=a,b`` kept to ``options`` (a multiselect's starting value), else ``default``."""
    wanted = [x for x in qp_list(name) if x in options]
    return wanted or list(default)


def qp_set(**values: Any) -> None:
    """Write view state into the URL (None removes a key)."""
    for k, v in values.items():
        if v is None or v == "" or v == []:
            if k in st.query_params:
                del st.query_params[k]
        else:
            v = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
            if st.query_params.get(k) != v:
                st.query_params[k] = v


def run_picker(*, multi: bool = True, key: str = "runs", label: str | None = None,
               statuses: Sequence[str] | None = None) -> list[str]:
    """Pick runs (default: from ``?runs=`` in the URL, else the newest run); keeps the URL in sync.
    Returns [] (after drawing the empty state) when the store has no runs."""
    runs = views.runs_frame(store())
    if statuses is not None:
        runs = runs[runs["status"].isin(list(statuses))]
    if runs.empty:
        no_runs()
        return []
    names = dict(zip(runs["run_id"], runs["name"] + " — " + runs["status"]))
    wanted = [r for r in qp_list("runs") if r in names]
    if not wanted:
        wanted = [views.with_data_first(runs)]
    if multi:
        sel = st.multiselect(label or "Runs (several to compare)", list(names), default=wanted,
                             format_func=names.get, key=key)
    else:
        one = st.selectbox(label or "Run", list(names), index=list(names).index(wanted[0]), format_func=names.get,
                           key=key)
        sel = [one] if one else []
    qp_set(runs=sel)
    return sel


def share_link() -> None:
    """The URL that reopens this view (page + query params)."""
    try:
        base = st.context.url or ""
    except Exception:
        base = ""
    query = urllib.parse.urlencode(st.query_params.to_dict(), safe=",")
    url = (base.split("?")[0] if base else "") + (f"?{query}" if query else "")
    with st.expander("Share this view"):
        st.caption("This link reopens the same page with the same runs and choices (protocol, curves, step, "
                   "layer, projection, fact).")
        st.code(url or "(open the app in a browser to get a link)", language=None)


def show_figure(fig, name: str, *, key: str | None = None) -> None:
    """Draw a plotly figure with HTML and PNG download buttons (PNG: when Kaleido and a Chrome are present; else a
    caption says why)."""
    st.plotly_chart(fig, key=key)
    c1, c2 = st.columns([1, 3])
    # the file is made only when the button is clicked (a callable): a page never pays for unused downloads
    c1.download_button("Download figure (HTML)", lambda: fig.to_html(include_plotlyjs=True, full_html=True),
                       file_name=f"{name}.html", mime="text/html", key=f"dl-html-{key or name}",
                       on_click="ignore", icon=":material/download:")
    # PNG: Kaleido renders it in a headless Chromium (a few seconds), so it too is made only on click
    reason = figures.png_unavailable_reason()
    if reason is None:
        c2.download_button("PNG", lambda: figures.to_png(fig), file_name=f"{name}.png", mime="image/png",
                           key=f"dl-png-{key or name}", on_click="ignore")
    else:
        c2.caption(f"{reason}: download HTML, or use the chart's camera icon.")


def fmt_prob(p: float | None, signed: bool = False) -> str:
    """A probability for people: 3 decimals, or scientific notation when tiny."""
    if p is None:
        return "–"
    sign = "+" if signed else ""
    return f"{p:{sign}.3f}" if abs(p) >= 1e-3 or p == 0 else f"{p:{sign}.1e}"


def status_badge(status: str) -> str:
    colour = {"finished": "green", "running": "blue", "queued": "gray", "diverged": "orange", "failed": "red",
              "cancelled": "gray", "interrupted": "orange"}.get(status, "gray")
    return f":{colour}-badge[{status}]"


def method_config_widgets(method: str, key_prefix: str) -> dict[str, Any]:
    """One widget per config field of ``method`` (default and help from the registry's ``field_help``); returns the
    overrides (only fields changed from their defaults; text values are coerced and checked by ``make_config``)."""
    fields = backend.method_fields(method)
    values: dict[str, Any] = {}
    cols = st.columns(2)
    for i, f in enumerate(fields):
        name, default, help_text = f["name"], f["default"], f["help"] or None
        key = f"{key_prefix}-{method}-{name}"
        col = cols[i % 2]
        if isinstance(default, bool):
            values[name] = col.checkbox(name, value=default, help=help_text, key=key)
        elif isinstance(default, int) and not isinstance(default, bool):
            values[name] = int(col.number_input(name, value=default, step=1, help=help_text, key=key))
        else:
            values[name] = col.text_input(name, value=backend.field_to_text(default), help=help_text, key=key)
    return backend.changed_overrides(fields, values)


def frame_download(df: pd.DataFrame, name: str, key: str) -> None:
    st.download_button("Download data (CSV)", lambda: df.to_csv(index=False), file_name=f"{name}.csv",
                       mime="text/csv", key=key, on_click="ignore", icon=":material/download:")


__all__ = ["page", "all_pages", "store", "queue", "housekeeping", "view", "projection", "header", "meaning", "no_runs",
           "run_picker", "qp_int", "qp_set", "qp_list", "qp_choice", "qp_subset", "share_link", "show_figure",
           "status_badge", "frame_download", "method_config_widgets", "fmt_prob", "PAGE_SPECS"]
