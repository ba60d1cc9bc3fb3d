"""Figures the analysis layer does not draw (the playground's probabilities, empty states) and figure export.

Every other figure of the pages comes from :mod:`analysis.plots` (one palette: a colour per METHOD everywhere).
"""
from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

TEMPLATE = "plotly_white"


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


def to_png(fig: go.Figure) -> bytes | None:
    """PNG bytes when Kaleido (and a Chrome for it) is available, else None."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return None
    try:
        return fig.to_image(format="png")
    except Exception:  # kaleido present but no browser, etc.
        return None


def png_available() -> bool:
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["method_colour", "probs_figure", "empty_figure", "to_png", "png_available"]
