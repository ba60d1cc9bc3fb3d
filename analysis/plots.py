"""Plotly figures from the analysis DataFrames (compute once, plot separately: scikit-learn's Display idea).

Every function takes a DataFrame produced by this package plus VISUAL arguments only (which column to colour by,
log axes, titles); none computes a diagnostic. Colours: one per method, the same everywhere (``method_color``, in
the registry's method order; the app's figures use it too), other categories (layers, checkpoints, groups) take the
palette in order of appearance.
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

#: colour-blind-friendly (Okabe-Ito, then Tableau 10)
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000",
           "#4E79A7", "#F28E2B", "#59A14F", "#B07AA1", "#76B7B2", "#EDC948", "#FF9DA7", "#9C755F")
TEMPLATE = "plotly_white"
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def method_order() -> list[str]:
    """The registered methods in table / figure order (:func:`editors.registry.methods_in_order`)."""
    from editors.registry import methods_in_order  # imports the editors (and torch) only when a figure needs it
    return methods_in_order()


def method_color(method: str | None) -> str:
    """The colour of a method, stable across figures, sessions and processes: a registered method takes the palette
    by its place in :func:`method_order`, any other name a colour from its hash."""
    m = (method or "").lower()
    order = method_order()
    if m in order:
        return PALETTE[order.index(m) % len(PALETTE)]
    return PALETTE[int(hashlib.sha1(m.encode()).hexdigest(), 16) % len(PALETTE)]


def _colors(values: Sequence, column: str | None) -> dict:
    """Category -> colour: methods by name, anything else by order of appearance."""
    uniq = list(dict.fromkeys(values))
    if column == "method":
        return {v: method_color(str(v)) for v in uniq}
    return {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(uniq)}


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _label(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _facets(df: pd.DataFrame, facet: str | None) -> list:
    return list(dict.fromkeys(df[facet])) if facet and facet in df.columns else [None]


def _grid(n: int, cols: int) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return math.ceil(n / cols), cols


def _line_styles(df: pd.DataFrame, color: str | None, dash: str | None) -> tuple[dict, dict]:
    """Category -> colour for the ``color`` column and category -> dash pattern for the ``dash`` column (``{}``
    for a column that is None or missing)."""
    colors = _colors(df[color], color) if color and color in df.columns else {}
    dashes = {v: DASHES[i % len(DASHES)] for i, v in enumerate(dict.fromkeys(df[dash]))} \
        if dash and dash in df.columns else {}
    return colors, dashes


def _panel_groups(df: pd.DataFrame, panels: Sequence, facet: str | None, ncols: int, color: str | None,
                  dash: str | None, *, sort: bool = False):
    """For each panel (a ``facet`` value; None: all of ``df``) laid out row-major on ``ncols`` columns, each group of
    its rows by the ``color`` and ``dash`` columns present: ``(row, col, panel, keys, key, info, rows)`` with ``keys``
    the grouping columns, ``key`` the group's values (a tuple, ``()`` when there are no keys) and ``info`` the
    mapping column -> value."""
    for k, panel in enumerate(panels):
        r, c = k // ncols + 1, k % ncols + 1
        part = df if panel is None else df[df[facet] == panel]
        keys = [col for col in (color, dash) if col and col in part.columns]
        groups = part.groupby(keys, dropna=False, sort=sort) if keys else [((), part)]
        for key, g in groups:
            key = key if isinstance(key, tuple) else (key,)
            yield r, c, panel, keys, key, dict(zip(keys, key)), g


# ---------------------------------------------------------------------------------------------------------------
# curves over edits
# ---------------------------------------------------------------------------------------------------------------
def curve_figure(curves: pd.DataFrame, *, x: str = "n_edits", y: str = "mean", color: str = "method",
                 dash: str | None = None, facet: str | None = None, band: bool = True, collapse=None,
                 log_y: bool = False, cols: int = 2, title: str | None = None, x_title: str = "edits",
                 y_title: str | None = None, height: int | None = None) -> go.Figure:
    """Lines with bands (``lo``/``hi`` columns of :func:`analysis.curves.metric_curves`) against edits.

    ``collapse``: markers drawn as vertical dotted lines — a :func:`analysis.collapse.detect_collapse` frame (its
    performance rows with a step; coloured by ``method`` when it has that column), a mapping label -> n_edits, or a
    list of n_edits.
    """
    panels = _facets(curves, facet)
    rows, ncols = _grid(len(panels), cols)
    fig = make_subplots(rows=rows, cols=ncols, subplot_titles=[_label(p) for p in panels] if facet else None,
                        shared_xaxes=True, horizontal_spacing=0.08, vertical_spacing=0.12)
    colors, dashes = _line_styles(curves, color, dash)
    shown: set = set()
    for r, c, _, _, key, info, g in _panel_groups(curves, panels, facet, ncols, color, dash):
        g = g.sort_values(x)
        col = colors.get(info.get(color), PALETTE[0])
        name = " · ".join(_label(v) for v in key) or y
        if band and {"lo", "hi"} <= set(g.columns) and (g["hi"] - g["lo"]).abs().sum() > 0:
            fig.add_trace(go.Scatter(x=list(g[x]) + list(g[x])[::-1], y=list(g["hi"]) + list(g["lo"])[::-1],
                                     fill="toself", fillcolor=_rgba(col, 0.18), line={"width": 0},
                                     hoverinfo="skip", showlegend=False, legendgroup=name, name=f"{name} band"),
                          row=r, col=c)
        fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="lines+markers", name=name, legendgroup=name,
                                 showlegend=name not in shown, marker={"size": 5},
                                 line={"color": col, "dash": dashes.get(info.get(dash), "solid")}),
                      row=r, col=c)
        shown.add(name)
    for step, label, col in _collapse_markers(collapse):
        fig.add_vline(x=step, line={"color": col, "dash": "dot", "width": 1.5}, row="all", col="all")
        fig.add_annotation(x=step, y=1.0, yref="paper", text=label, showarrow=False, textangle=-90,
                           xanchor="right", yanchor="top", font={"size": 10, "color": col})
    fig.update_layout(template=TEMPLATE, title=title, height=height or max(320, 300 * rows),
                      # below the x-axis title, not over it
                      legend={"orientation": "h", "yanchor": "top", "y": -0.12 - 0.25 / rows},
                      margin={"b": 110})
    fig.update_xaxes(title_text=x_title, row=rows)
    if y_title:
        fig.update_yaxes(title_text=y_title, col=1)
    if log_y:
        fig.update_yaxes(type="log")
    if x == "n_edits":
        integer_edit_axis(fig, float(curves[x].max()) if len(curves) else None)
    return fig


def _collapse_markers(collapse) -> list[tuple[float, str, str]]:
    if collapse is None:
        return []
    if isinstance(collapse, pd.DataFrame):
        df = collapse
        if "kind" in df.columns:
            df = df[df["kind"] == "performance"]
        df = df[df["step"].notna()] if "step" in df.columns else df.iloc[0:0]
        out = []
        for r in df.to_dict("records"):
            m = r.get("method")
            label = f"{m}: {r.get('indicator', 'collapse')}" if m else str(r.get("indicator", "collapse"))
            out.append((float(r["step"]), label, method_color(m) if m else "#555555"))
        return out
    if isinstance(collapse, Mapping):
        return [(float(v), str(k), "#555555") for k, v in collapse.items() if v is not None and not pd.isna(v)]
    return [(float(v), "collapse", "#555555") for v in collapse if v is not None and not pd.isna(v)]


# ---------------------------------------------------------------------------------------------------------------
# distributions, maps, projections
# ---------------------------------------------------------------------------------------------------------------
def histogram_figure(df: pd.DataFrame, *, x: str = "angle", color: str | None = None, facet: str | None = None,
                     nbins: int = 60, histnorm: str | None = "probability", vlines: Sequence[float] = (),
                     cols: int = 2, title: str | None = None, x_title: str | None = None,
                     height: int | None = None, y_title: str | None = None) -> go.Figure:
    """Overlaid histograms of ``x`` per ``color`` group, one panel per ``facet`` value; ``vlines`` marks values
    (e.g. GeoEdit's φ1 = 85°, φ2 = 95°). The y axis is named after ``histnorm`` unless ``y_title`` is given."""
    panels = _facets(df, facet)
    rows, ncols = _grid(len(panels), cols)
    fig = make_subplots(rows=rows, cols=ncols, subplot_titles=[_label(p) for p in panels] if facet else None)
    colors = _colors(df[color], color) if color and color in df.columns else {}
    lo, hi = float(np.nanmin(df[x])) if len(df) else 0.0, float(np.nanmax(df[x])) if len(df) else 1.0
    size = (hi - lo) / nbins if hi > lo else 1.0
    shown: set = set()
    for k, panel in enumerate(panels):
        r, c = k // ncols + 1, k % ncols + 1
        part = df if panel is None else df[df[facet] == panel]
        groups = part.groupby(color, dropna=False, sort=False) if color and color in part.columns else [(x, part)]
        for key, g in groups:
            key = key[0] if isinstance(key, tuple) else key
            name = _label(key)
            fig.add_trace(go.Histogram(x=g[x], name=name, legendgroup=name, showlegend=name not in shown,
                                       histnorm=histnorm, opacity=0.6, xbins={"start": lo, "end": hi + size,
                                                                              "size": size},
                                       marker={"color": colors.get(key, PALETTE[0])}), row=r, col=c)
            shown.add(name)
    for v in vlines:
        fig.add_vline(x=v, line={"color": "#555555", "dash": "dash", "width": 1}, row="all", col="all")
    fig.update_layout(template=TEMPLATE, barmode="overlay", title=title, height=height or max(320, 280 * rows))
    fig.update_xaxes(title_text=x_title or x, row=rows)
    fig.update_yaxes(title_text=y_title or {"probability": "fraction", "percent": "percent",
                                            "probability density": "density"}.get(histnorm or "", "count"), col=1)
    return fig


def heatmap_figure(df: pd.DataFrame, *, x: str = "neuron", y: str = "layer", z: str = "value",
                   colorscale: str = "Viridis", log_z: bool = False, title: str | None = None,
                   x_title: str | None = None, y_title: str | None = None, height: int | None = None,
                   colorbar_title: str | None = None, ticks_at_x: bool = False) -> go.Figure:
    """Heatmap of ``z`` on the ``y`` × ``x`` grid (mean over duplicate cells), e.g. layer × neuron magnitudes.
    ``colorbar_title`` names the colour bar (default ``z``); ``ticks_at_x`` puts one tick at every ``x`` present
    (e.g. the checkpoints of a layer × edits map) instead of round numbers."""
    table = df.pivot_table(index=y, columns=x, values=z, aggfunc="mean").sort_index()
    vals = table.to_numpy(dtype=np.float64)
    if log_z:
        vals = np.log10(np.where(vals > 0, vals, np.nan))
    fig = go.Figure(go.Heatmap(z=vals, x=list(table.columns), y=[_label(v) for v in table.index],
                               colorscale=colorscale,
                               colorbar={"title": {"text": (f"log10 {colorbar_title or z}" if log_z
                                                            else colorbar_title or z), "side": "right"}}))
    fig.update_layout(template=TEMPLATE, title=title, height=height or max(300, 26 * len(table.index) + 140),
                      xaxis_title=x_title or x, yaxis_title=y_title or y)
    fig.update_yaxes(type="category")
    if ticks_at_x:
        fig.update_xaxes(tickmode="array", tickvals=list(table.columns), ticktext=[str(c) for c in table.columns])
    return fig


def _kde(v: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Gaussian KDE with Scott's bandwidth (display only)."""
    v = v[np.isfinite(v)]
    if v.size < 2 or np.std(v) == 0:
        return np.zeros_like(grid)
    bw = 1.06 * np.std(v) * v.size ** (-1 / 5)
    d = (grid[:, None] - v[None, :]) / bw
    return np.exp(-0.5 * d ** 2).sum(1) / (v.size * bw * math.sqrt(2 * math.pi))


def scatter_with_marginals(df: pd.DataFrame, *, x: str = "x", y: str = "y", color: str = "which",
                           marginal: str = "kde", hover: str | None = None, title: str | None = None,
                           height: int = 560, x_title: str | None = None, y_title: str | None = None,
                           under: str | None = "before") -> go.Figure:
    """2-D projection (``analysis.hidden.project``) with marginal densities of each group on top and right
    (``marginal`` "kde" as in MOSE Fig. 5 / AGRADE Fig. 3, or "histogram"). The group ``under`` is drawn first,
    with larger open markers, so its points stay visible under the others'."""
    if marginal not in ("kde", "histogram"):
        raise ValueError(f"unknown marginal {marginal!r}; valid: kde, histogram")
    fig = make_subplots(rows=2, cols=2, column_widths=[0.8, 0.2], row_heights=[0.2, 0.8], shared_xaxes=True,
                        shared_yaxes=True, horizontal_spacing=0.02, vertical_spacing=0.02)
    colors = _colors(df[color], color) if color in df.columns else {}
    xs, ys = df[x].to_numpy(dtype=np.float64), df[y].to_numpy(dtype=np.float64)
    pad_x, pad_y = 0.05 * (np.ptp(xs) or 1.0), 0.05 * (np.ptp(ys) or 1.0)
    gx = np.linspace(xs.min() - pad_x, xs.max() + pad_x, 200) if xs.size else np.zeros(0)
    gy = np.linspace(ys.min() - pad_y, ys.max() + pad_y, 200) if ys.size else np.zeros(0)
    groups = list(df.groupby(color, sort=False)) if color in df.columns else [("states", df)]
    groups.sort(key=lambda kg: (kg[0][0] if isinstance(kg[0], tuple) else kg[0]) != under)  # stable
    for key, g in groups:
        key = key[0] if isinstance(key, tuple) else key
        name, col = _label(key), colors.get(key, PALETTE[0])
        text = g[hover].astype(str) if hover and hover in g.columns else None
        marker = ({"color": col, "size": 10, "opacity": 0.9, "symbol": "circle-open", "line": {"width": 2}}
                  if key == under else {"color": col, "size": 6, "opacity": 0.7})
        fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="markers", name=name, legendgroup=name, text=text,
                                 marker=marker), row=2, col=1)
        if marginal == "kde":
            fig.add_trace(go.Scatter(x=gx, y=_kde(g[x].to_numpy(dtype=np.float64), gx), mode="lines",
                                     line={"color": col}, fill="tozeroy", fillcolor=_rgba(col, 0.2),
                                     showlegend=False, legendgroup=name, hoverinfo="skip"), row=1, col=1)
            fig.add_trace(go.Scatter(x=_kde(g[y].to_numpy(dtype=np.float64), gy), y=gy, mode="lines",
                                     line={"color": col}, fill="tozerox", fillcolor=_rgba(col, 0.2),
                                     showlegend=False, legendgroup=name, hoverinfo="skip"), row=2, col=2)
        else:
            fig.add_trace(go.Histogram(x=g[x], marker={"color": col}, opacity=0.6, showlegend=False,
                                       legendgroup=name, histnorm="probability density"), row=1, col=1)
            fig.add_trace(go.Histogram(y=g[y], marker={"color": col}, opacity=0.6, showlegend=False,
                                       legendgroup=name, histnorm="probability density"), row=2, col=2)
    fig.update_layout(template=TEMPLATE, title=title, height=height, barmode="overlay",
                      legend={"orientation": "h", "y": -0.08})
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    fig.update_yaxes(showticklabels=False, row=2, col=2)
    fig.update_xaxes(title_text=x_title or x, row=2, col=1)
    fig.update_yaxes(title_text=y_title or y, row=2, col=1)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------------------
def spectrum_figure(df: pd.DataFrame, *, x: str = "index", y: str = "sigma", color: str = "n_edits",
                    dash: str | None = "which", facet: str | None = None, log_y: bool = True, cols: int = 2,
                    title: str | None = None, height: int | None = None) -> go.Figure:
    """Singular-value spectra (``analysis.weights.spectrum_frame``): σ_i against i, one line per ``color`` value
    (e.g. checkpoint) and ``dash`` value (W or ΔW)."""
    panels = _facets(df, facet)
    rows, ncols = _grid(len(panels), cols)
    fig = make_subplots(rows=rows, cols=ncols, subplot_titles=[_label(p) for p in panels] if facet else None)
    colors, dashes = _line_styles(df, color, dash)
    for r, c, _, _, key, info, g in _panel_groups(df, panels, facet, ncols, color, dash):
        vals = g.sort_values(x)
        yv = vals[y].to_numpy(dtype=np.float64)
        if log_y:
            yv = np.where(yv > 0, yv, np.nan)
        fig.add_trace(go.Scatter(x=vals[x], y=yv, mode="lines", name=" · ".join(_label(v) for v in key) or y,
                                 line={"color": colors.get(info.get(color), PALETTE[0]),
                                       "dash": dashes.get(info.get(dash), "solid")}), row=r, col=c)
    fig.update_layout(template=TEMPLATE, title=title, height=height or max(320, 300 * rows))
    fig.update_xaxes(title_text="index i", row=rows)
    fig.update_yaxes(title_text="σ_i", col=1)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


LOG_METRICS = ("cond", "delta_cond", "spectral", "delta_spectral")

#: readable names (with the symbol) of the weight diagnostics of :func:`analysis.weights.matrix_stats`
WEIGHT_METRIC_LABELS = {
    "fro": "Frobenius norm ‖W‖_F", "spectral": "spectral norm σ_max(W)", "nuclear": "nuclear norm Σσᵢ(W)",
    "cond": "condition number κ(W) = σ_max / σ_min", "effective_rank": "effective rank of W",
    "max": "largest entry of W", "min": "smallest entry of W", "mean": "mean entry of W",
    "median": "median entry of W", "delta_fro": "Frobenius norm of the change ‖ΔW‖_F",
    "delta_spectral": "spectral norm of the change σ_max(ΔW)", "delta_nuclear": "nuclear norm of the change Σσᵢ(ΔW)",
    "delta_cond": "condition number of the change κ(ΔW)", "delta_effective_rank": "effective rank of the change ΔW",
    "delta_rank": "numerical rank of the change ΔW", "rel_change": "relative change ‖ΔW‖_F / ‖W0‖_F",
}


def metric_label(metric: str) -> str:
    """A weight metric's readable name (the name itself when none is known)."""
    return WEIGHT_METRIC_LABELS.get(metric, metric)


def integer_edit_axis(fig: go.Figure, max_edits: float | None = None) -> go.Figure:
    """Edit counts are whole numbers: integer tick labels from 0 (every edit when there are at most 12)."""
    fig.update_xaxes(tickformat="d", rangemode="tozero")
    if max_edits is not None and max_edits <= 12:
        fig.update_xaxes(dtick=1, tick0=0)
    return fig


def weights_figure(df: pd.DataFrame, *, metrics: Sequence[str] | None = None, x: str = "n_edits",
                   color: str = "layer", dash: str | None = None, log_metrics: Sequence[str] = LOG_METRICS,
                   cols: int = 3, title: str | None = None, height: int | None = None) -> go.Figure:
    """Weight diagnostics (``weight_stats_frame`` rows, or the run store's ``weights`` rows) against edits: one
    panel per metric, one line per ``color`` value (layer, or method); ``log_metrics`` get a log y axis."""
    metrics = list(metrics) if metrics is not None else list(dict.fromkeys(df["metric"]))
    rows, ncols = _grid(len(metrics), cols)
    fig = make_subplots(rows=rows, cols=ncols, subplot_titles=[metric_label(m) for m in metrics],
                        horizontal_spacing=0.07, vertical_spacing=0.14)
    colors, dashes = _line_styles(df, color, dash)
    shown: set = set()
    for r, c, metric, keys, key, info, g in _panel_groups(df, metrics, "metric", ncols, color, dash, sort=True):
        g = g.groupby(x, as_index=False)["value"].mean().sort_values(x)
        name = " · ".join(f"{col} {_label(v)}" if col == "layer" else _label(v) for col, v in zip(keys, key))
        fig.add_trace(go.Scatter(x=g[x], y=g["value"], mode="lines+markers", name=name or metric,
                                 legendgroup=name, showlegend=name not in shown, marker={"size": 4},
                                 line={"color": colors.get(info.get(color), PALETTE[0]),
                                       "dash": dashes.get(info.get(dash), "solid")}), row=r, col=c)
        shown.add(name)
    for k, metric in enumerate(metrics):
        if metric in log_metrics:
            fig.update_yaxes(type="log", row=k // ncols + 1, col=k % ncols + 1)
    fig.update_layout(template=TEMPLATE, title=title, height=height or max(320, 280 * rows),
                      legend={"orientation": "h", "y": -0.22})
    fig.update_xaxes(title_text="edits made (n)", row=rows)
    if len(metrics) == 1:
        fig.update_yaxes(title_text=metric_label(metrics[0]) + (" (log scale)" if metrics[0] in log_metrics else ""))
    return integer_edit_axis(fig, float(df[x].max()) if len(df) else None)


__all__ = ["metric_label", "integer_edit_axis", "WEIGHT_METRIC_LABELS",
           "method_color", "curve_figure", "histogram_figure", "heatmap_figure", "scatter_with_marginals",
           "spectrum_figure", "weights_figure", "PALETTE", "method_order"]
