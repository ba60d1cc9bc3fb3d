"""When does sequential editing collapse, and which weight indicator saw it coming?

From one run's long-form metric rows (the run store's ``metrics_frame``: ``n_edits, kind, layer, param, metric,
protocol, value, case_id``):

1. COLLAPSE of each performance signal: the first checkpoint where it falls below
   ``floor + fraction · (start − floor)``, with ``start`` its value at its first checkpoint and ``floor`` the value
   that means "nothing left" (0 for retention reliability and locality; the chance accuracy for general abilities,
   read from the run's ``<task>/chance`` rows when present). Default ``fraction = 0.5``: half of what the model could
   do above the floor is gone — for reliability, most edits made so far are lost; for a 2-way general-ability task
   with baseline 1.0, accuracy 0.75, halfway to chance. The run's collapse step is the earliest of the signals' steps
   (or the one named by ``collapse_on``).
2. DEPARTURE of each weight indicator (per layer and parameter): fit the early trend on the first ``k_fit``
   checkpoints — a straight line in ``n_edits`` of log(value) (``trend="linear"``; growth at a constant rate) or its
   mean (``trend="constant"``) — and flag the first point (followed by ``patience − 1`` more) whose residual leaves
   the band ``max(z · σ_fit, log(1 + rel_tol))`` in the indicator's direction of concern (norm and condition number
   up, effective rank down, angles either way). Using log space makes the threshold relative; a flat early trend
   (σ_fit ≈ 0) still needs a ``rel_tol`` change.
3. LEAD TIME = collapse step − departure step: positive when the indicator departed before performance collapsed.

``detect_collapse`` returns one row per signal with the columns ``indicator, kind ("performance" | "indicator"),
layer, param, step, collapse_step, lead_edits`` plus ``baseline, floor, threshold, value_at_step, last_n_edits``
and, for the run store, ``n_edits`` (= step, or the last checkpoint when nothing happened), ``metric``
("collapse:<signal>" / "departure:<signal>[@L<layer>]") and ``value`` (1.0 when the event happened, else 0.0), the
shape ``app.engine`` turns into ``kind="collapse"`` rows and the pages into markers.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

GENERAL_CHANCE_DEFAULT = 0.5


@dataclass(frozen=True)
class Signal:
    """A series selected from the rows: ``kind`` and a ``metric`` regular expression (full match); ``protocol``
    preferred when the rows have several. ``direction`` (indicators): "up", "down" or "both"."""

    name: str
    kind: str | None
    metric: str
    protocol: str | None = None
    floor: float | None = 0.0
    direction: str = "both"
    per_layer: bool = False


#: performance signals; a general-ability signal's name gets the task, e.g. "general/builtin/accuracy"
PERFORMANCE: tuple[Signal, ...] = (
    Signal("retention/reliability", "retention", "reliability", protocol="tf_token_acc", floor=0.0),
    Signal("locality", "locality", "locality", protocol="tf_token_acc", floor=0.0),
    Signal("general", "general", r"[^/]+/accuracy", floor=None),  # floor: the task's chance rows
)
#: early-warning indicators
INDICATORS: tuple[Signal, ...] = (
    Signal("weights/fro", "weights", "fro", direction="up", per_layer=True),
    Signal("weights/cond", "weights", "cond", direction="up", per_layer=True),
    Signal("weights/effective_rank", "weights", "effective_rank", direction="down", per_layer=True),
    Signal("update_angle/angle_flat", "update_angle", "angle_flat", direction="both", per_layer=True),
)
OUT_COLUMNS = ["indicator", "kind", "layer", "param", "step", "collapse_step", "lead_edits", "baseline", "floor",
               "threshold", "value_at_step", "last_n_edits", "n_edits", "metric", "value"]


# ---------------------------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------------------------
def _select(df: pd.DataFrame, sig: Signal) -> pd.DataFrame:
    m = df
    if sig.kind is not None and "kind" in m.columns:
        m = m[m["kind"] == sig.kind]
    pat = re.compile(sig.metric)
    m = m[m["metric"].astype(str).map(lambda s: bool(pat.fullmatch(s)))]
    if m.empty:
        return m
    if "protocol" in m.columns and m["protocol"].notna().any():
        protos = sorted(set(m["protocol"].dropna()))
        want = sig.protocol if sig.protocol in protos else protos[0]
        m = m[m["protocol"] == want]
    if "case_id" in m.columns and m["case_id"].isna().any():
        m = m[m["case_id"].isna()]  # the run's aggregate rows
    return m


def _series(m: pd.DataFrame) -> pd.Series:
    """Mean value per n_edits (over cases / layers), sorted, finite values only."""
    s = m.groupby("n_edits")["value"].mean().sort_index()
    return s[np.isfinite(s.to_numpy(dtype=np.float64))]


# ---------------------------------------------------------------------------------------------------------------
# the two detectors
# ---------------------------------------------------------------------------------------------------------------
def first_drop(series: pd.Series, *, fraction: float = 0.5, floor: float = 0.0) -> tuple[float, float, float]:
    """(step, start, threshold): the first ``n_edits`` whose value is below ``floor + fraction·(start − floor)``
    (NaN when it never is, or when the start is not above the floor)."""
    if series.empty:
        return math.nan, math.nan, math.nan
    start = float(series.iloc[0])
    thr = floor + fraction * (start - floor)
    if not start > floor:
        return math.nan, start, thr
    below = series[series < thr]
    return (float(below.index[0]) if len(below) else math.nan), start, thr


def departure(series: pd.Series, *, k_fit: int = 4, z: float = 3.0, rel_tol: float = 0.1, patience: int = 2,
              direction: str = "both", trend: str = "linear") -> tuple[float, float]:
    """(step, tolerance): the first ``n_edits`` after the fit window where the series leaves its early trend (see
    the module docstring); NaN when it never does or there are not enough points (k_fit + 1)."""
    if direction not in ("up", "down", "both"):
        raise ValueError(f"unknown direction {direction!r}; valid: up, down, both")
    if trend not in ("linear", "constant"):
        raise ValueError(f"unknown trend {trend!r}; valid: linear, constant")
    x = series.index.to_numpy(dtype=np.float64)
    y = series.to_numpy(dtype=np.float64)
    k = max(2 if trend == "constant" else 3, k_fit)
    if y.size <= k:
        return math.nan, math.nan
    logy = bool((y > 0).all())
    t = np.log(y) if logy else y
    xf, tf = x[:k], t[:k]
    if trend == "linear":
        A = np.stack([np.ones_like(xf), xf], axis=1)
        coef, *_ = np.linalg.lstsq(A, tf, rcond=None)
        pred = coef[0] + coef[1] * x
        dof = max(1, k - 2)
    else:
        pred = np.full_like(x, tf.mean())
        dof = max(1, k - 1)
    sigma = float(np.sqrt(((tf - pred[:k]) ** 2).sum() / dof))
    rel = math.log1p(rel_tol) if logy else rel_tol * max(float(np.abs(tf).mean()), 1e-12)
    tol = max(z * sigma, rel)
    r = t - pred
    if direction == "up":
        out = r > tol
    elif direction == "down":
        out = r < -tol
    else:
        out = np.abs(r) > tol
    out[:k] = False
    for i in range(k, y.size):
        need = min(patience, y.size - i)
        if out[i:i + need].all():
            return float(x[i]), tol
    return math.nan, tol


# ---------------------------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------------------------
def _chance_floor(df: pd.DataFrame, metric: str, default: float) -> float:
    task = metric.rsplit("/", 1)[0]
    rows = df[(df["metric"] == f"{task}/chance")]
    if "kind" in rows.columns:
        rows = rows[rows["kind"] == "general"]
    vals = rows["value"].dropna()
    return float(vals.iloc[0]) if len(vals) else default


def _detect_one(df: pd.DataFrame, performance: Sequence[Signal], indicators: Sequence[Signal], fraction: float,
                general_chance: float, collapse_on: str | None, k_fit: int, z: float, rel_tol: float, patience: int,
                trend: str) -> list[dict]:
    last_n = float(df["n_edits"].max()) if len(df) else math.nan
    perf_rows: list[dict] = []
    for sig in performance:
        sel = _select(df, sig)
        if sel.empty:
            continue
        metrics = sorted(set(sel["metric"])) if sig.floor is None else [None]
        for metric in metrics:
            part = sel if metric is None else sel[sel["metric"] == metric]
            s = _series(part)
            floor = sig.floor if sig.floor is not None else _chance_floor(df, metric, general_chance)
            step, start, thr = first_drop(s, fraction=fraction, floor=floor)
            name = sig.name if metric is None else f"{sig.name}/{metric}"
            perf_rows.append({"indicator": name, "kind": "performance", "layer": None, "param": None, "step": step,
                              "baseline": start, "floor": floor, "threshold": thr,
                              "value_at_step": float(s.loc[step]) if not math.isnan(step) else math.nan})
    steps = {r["indicator"]: r["step"] for r in perf_rows}
    if collapse_on is not None:
        collapse = steps.get(collapse_on, math.nan)
    else:
        finite = [v for v in steps.values() if not math.isnan(v)]
        collapse = min(finite) if finite else math.nan
    ind_rows: list[dict] = []
    for sig in indicators:
        sel = _select(df, sig)
        if sel.empty:
            continue
        cols = [c for c in ("layer", "param") if c in sel.columns] if sig.per_layer else []
        groups = sel.groupby(cols, dropna=False, sort=True) if cols else [((), sel)]
        for key, part in groups:
            key = key if isinstance(key, tuple) else (key,)
            info = dict(zip(cols, key))
            s = _series(part)
            step, tol = departure(s, k_fit=k_fit, z=z, rel_tol=rel_tol, patience=patience, direction=sig.direction,
                                  trend=trend)
            layer = info.get("layer")
            layer = None if layer is None or (isinstance(layer, float) and math.isnan(layer)) or layer is pd.NA \
                else int(layer)
            param = info.get("param")
            param = None if param is None or (isinstance(param, float) and math.isnan(param)) else param
            ind_rows.append({"indicator": sig.name, "kind": "indicator", "layer": layer, "param": param,
                             "step": step, "baseline": float(s.iloc[0]) if len(s) else math.nan, "floor": math.nan,
                             "threshold": tol,
                             "value_at_step": float(s.loc[step]) if not math.isnan(step) else math.nan})
    out = []
    for r in perf_rows + ind_rows:
        step = r["step"]
        lead = collapse - step if not (math.isnan(collapse) or math.isnan(step)) else math.nan
        event = not math.isnan(step)
        prefix = "collapse" if r["kind"] == "performance" else "departure"
        label = r["indicator"] if r["layer"] is None else f"{r['indicator']}@L{r['layer']}"
        out.append({**r, "collapse_step": collapse, "lead_edits": lead, "last_n_edits": last_n,
                    "n_edits": step if event else last_n, "metric": f"{prefix}:{label}",
                    "value": 1.0 if event else 0.0})
    return out


def detect_collapse(rows_df: pd.DataFrame | Iterable[Mapping], *, fraction: float = 0.5,
                    performance: Sequence[Signal] = PERFORMANCE, indicators: Sequence[Signal] = INDICATORS,
                    general_chance: float = GENERAL_CHANCE_DEFAULT, collapse_on: str | None = None, k_fit: int = 4,
                    z: float = 3.0, rel_tol: float = 0.1, patience: int = 2, trend: str = "linear") -> pd.DataFrame:
    """Collapse step of each performance signal, departure step of each weight indicator and their lead time.

    Args:
        rows_df: one run's metric rows (several runs: pass a ``run_id`` column; the result gets one too).
        fraction: collapse threshold as a fraction of the start above the floor (module docstring).
        performance / indicators: the signals to look at (defaults: ``PERFORMANCE``, ``INDICATORS``).
        general_chance: floor of a general-ability task without ``<task>/chance`` rows.
        collapse_on: the performance signal that defines the collapse step (default: the earliest to collapse).
        k_fit, z, rel_tol, patience, trend: the departure rule (:func:`departure`).

    Returns:
        the columns listed in the module docstring, performance rows first.
    """
    df = rows_df.copy() if isinstance(rows_df, pd.DataFrame) else pd.DataFrame(list(rows_df))
    if df.empty:
        return pd.DataFrame(columns=OUT_COLUMNS)
    for c in ("n_edits", "metric", "value"):
        if c not in df.columns:
            raise ValueError(f"metric rows need a {c!r} column")
    df = df[df["n_edits"].notna()].copy()
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype("float64")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    kw = dict(performance=performance, indicators=indicators, fraction=fraction, general_chance=general_chance,
              collapse_on=collapse_on, k_fit=k_fit, z=z, rel_tol=rel_tol, patience=patience, trend=trend)
    if "run_id" in df.columns and df["run_id"].nunique() > 1:
        frames = []
        for run_id, part in df.groupby("run_id", sort=True):
            f = pd.DataFrame(_detect_one(part, **kw), columns=OUT_COLUMNS)
            f.insert(0, "run_id", run_id)
            frames.append(f)
        return pd.concat(frames, ignore_index=True)
    return pd.DataFrame(_detect_one(df, **kw), columns=OUT_COLUMNS)


def _fmt_n(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{int(round(v))}"


def collapse_summary_text(df: pd.DataFrame) -> str:
    """A few lines for the CLI: when (and by which signal) the run collapsed, and each indicator's lead time."""
    if df is None or len(df) == 0:
        return "no performance or weight signals recorded"
    lines = []
    if "run_id" in df.columns and df["run_id"].nunique() > 1:
        return "\n\n".join(f"run {rid}:\n" + collapse_summary_text(part.drop(columns="run_id"))
                           for rid, part in df.groupby("run_id", sort=True))
    perf = df[df["kind"] == "performance"]
    ind = df[df["kind"] == "indicator"]
    last = df["last_n_edits"].max() if "last_n_edits" in df.columns else math.nan
    collapse = df["collapse_step"].iloc[0]
    if isinstance(collapse, float) and math.isnan(collapse):
        lines.append(f"no collapse up to {_fmt_n(last)} edits")
    else:
        first = perf[perf["step"] == collapse]["indicator"].tolist()
        lines.append(f"collapse at {_fmt_n(collapse)} edits (first: {', '.join(first)})")
    for r in perf.itertuples(index=False):
        if not r.baseline > r.floor:
            what = f"started at its floor ({r.baseline:.3f} <= {r.floor:.3f}): nothing to lose"
        elif math.isnan(r.step):
            what = f"held (start {r.baseline:.3f}, threshold {r.threshold:.3f})"
        else:
            what = (f"fell to {r.value_at_step:.3f} at {_fmt_n(r.step)} edits "
                    f"(start {r.baseline:.3f}, threshold {r.threshold:.3f})")
        lines.append(f"  {r.indicator:<34} {what}")
    if len(ind):
        lines.append("early indicators (departure from their early trend):")
        for r in ind.sort_values(["step", "indicator"], na_position="last").itertuples(index=False):
            where = r.indicator + (f" L{int(r.layer)}" if r.layer is not None and not pd.isna(r.layer) else "")
            if math.isnan(r.step):
                lines.append(f"  {where:<34} no departure")
                continue
            lead = ""
            if not math.isnan(r.lead_edits):
                lead = (f", {_fmt_n(r.lead_edits)} edits before the collapse" if r.lead_edits > 0 else
                        " (with the collapse)" if r.lead_edits == 0 else
                        f", {_fmt_n(-r.lead_edits)} edits after the collapse")
            lines.append(f"  {where:<34} departed at {_fmt_n(r.step)} edits{lead}")
    return "\n".join(lines)


__all__ = ["detect_collapse", "collapse_summary_text", "first_drop", "departure", "Signal", "PERFORMANCE",
           "INDICATORS", "OUT_COLUMNS"]
