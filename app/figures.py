"""Figures the analysis layer does not draw (the playground's probabilities, empty states) and figure export: PNG via
Kaleido, which renders in a headless Chrome (the system Chromium; ``$BROWSER_PATH`` points at another one).

Every other figure of the pages comes from :mod:`analysis.plots` (one palette: a colour per METHOD everywhere).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

TEMPLATE = "plotly_white"
logger = logging.getLogger(__name__)


def method_colour(method: str | None) -> str:
    """The colour of a method (the analysis layer's palette: stable across pages, figures and processes)."""
    from analysis.plots import method_color
    return method_color(method)


def empty_figure(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 14, "color": "#666"})
    fig.update_layout(template=TEMPLATE, height=240, xaxis={"visible": False}, yaxis={"visible": False})
    return fig


def probs_figure(before: Sequence[dict], after: Sequence[dict], *, title: str = "") -> go.Figure:
    """Top-k next-token probabilities before and after an edit, side by side (playground)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["before", "after"], horizontal_spacing=0.18)
    for col, top, colour in ((1, before, "#7f7f7f"), (2, after, "#D55E00")):
        toks = [repr(t["token"])[1:-1] or "∅" for t in top][::-1]
        fig.add_trace(go.Bar(x=[t["prob"] for t in top][::-1], y=toks, orientation="h", marker={"color": colour},
                             showlegend=False, hovertemplate="%{y}: %{x:.3f}<extra></extra>"), row=1, col=col)
    fig.update_xaxes(range=[0, 1], title_text="probability")
    fig.update_layout(template=TEMPLATE, height=260, title=title or None, margin={"t": 40, "l": 90, "r": 20, "b": 40})
    return fig


#: where a Chrome for Kaleido is looked for, after ``$BROWSER_PATH`` (Kaleido's own override): the names on ``PATH``,
#: then Debian's Chromium (``scripts/setup.sh --browser`` installs it)
CHROME_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
SYSTEM_CHROMIUM = "/usr/bin/chromium"


class PngExportError(RuntimeError):
    """A figure could not be exported as PNG; the message says why (no Kaleido, no Chrome, Kaleido failed)."""


def chromium_path() -> str | None:
    """The Chrome / Chromium executable Kaleido drives: ``$BROWSER_PATH`` when set (None when it is not an
    executable), else the first of :data:`CHROME_NAMES` on ``PATH``, else :data:`SYSTEM_CHROMIUM` when present."""
    env = os.environ.get("BROWSER_PATH", "").strip()
    if env:
        return env if os.path.isfile(env) and os.access(env, os.X_OK) else None
    for name in CHROME_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return SYSTEM_CHROMIUM if os.access(SYSTEM_CHROMIUM, os.X_OK) else None


def png_unavailable_reason() -> str | None:
    """Why PNG export cannot work here (None when it can). Cheap: imports nothing, starts no browser."""
    if importlib.util.find_spec("kaleido") is None:
        return "PNG export needs Kaleido (`pip install -r requirements.txt`)"
    if chromium_path() is None:
        where = f"BROWSER_PATH={os.environ['BROWSER_PATH']!r} is not an executable" \
            if os.environ.get("BROWSER_PATH", "").strip() else "no Chrome/Chromium found"
        return f"PNG export needs a Chrome for Kaleido: {where} (`bash scripts/setup.sh --browser` installs Chromium)"
    return None


def png_available() -> bool:
    return png_unavailable_reason() is None


def to_png(fig: go.Figure, *, scale: float = 2.0) -> bytes:
    """The figure as PNG bytes, rendered by Kaleido in the Chrome of :func:`chromium_path` (one headless browser per
    call: seconds, so callers make it on demand). MathJax is off: it would be fetched from a CDN.

    Raises:
        PngExportError: Kaleido or a Chrome is missing, or the export failed.
    """
    reason = png_unavailable_reason()
    if reason:
        raise PngExportError(reason)
    import kaleido
    layout = fig.layout
    opts = {"format": "png", "width": layout.width or 900, "height": layout.height or 500, "scale": scale}
    try:
        return kaleido.calc_fig_sync(fig.to_dict(), opts=opts, kopts={"path": chromium_path(), "mathjax": False})
    except Exception as exc:  # the browser failed to start, timed out, ...
        logger.warning("PNG export failed: %s", exc)
        raise PngExportError(f"PNG export failed: {exc}") from exc


__all__ = ["method_colour", "probs_figure", "empty_figure", "to_png", "png_available", "png_unavailable_reason",
           "chromium_path", "PngExportError"]
