"""Frames of the sweep parts of the Runs and Metrics pages (no Streamlit here; the pages compose).

* :func:`sweeps_overview`: one row per sweep with its progress (trials done / running / waiting / failed /
  cancelled, edits, the ETA estimate of :func:`app.sweep.sweep_progress`);
* :func:`sweep_curves`: a sweep's retention / immediate / locality curves, ONE curve per grid point with the band
  over its seeds (:func:`analysis.curves.metric_curves` grouped by point: mean ± std over the seeds' runs, or
  min-max);
* :func:`sweep_table`: the sweep table of :func:`app.sweep.sweep_summary` with ``mean ± std`` cells.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from .store import RunStore
from .sweep_core import (
    DONE,
    SweepStore,
    mean_std_view,
    point_text,
    sweep_progress,
    sweep_summary,
    sweep_tables_exist,
)
from .views import CURVE_KINDS, aggregate_metrics

OVERVIEW_COLUMNS = ("sweep_id", "trials", "done", "running", "waiting", "failed", "cancelled", "edits", "eta",
                    "progress", "executor", "created")


def has_sweeps(store: RunStore) -> bool:
    return sweep_tables_exist(store) and not SweepStore(store).list_sweeps().empty


def sweeps_overview(store: RunStore) -> pd.DataFrame:
    """Columns :data:`OVERVIEW_COLUMNS`, newest sweep first; ``progress`` is the finished share in [0, 1]."""
    if not sweep_tables_exist(store):
        return pd.DataFrame(columns=list(OVERVIEW_COLUMNS))
    sweeps = SweepStore(store)
    rows = []
    for s in sweeps.list_sweeps().itertuples(index=False):
        p = sweep_progress(sweeps, s.sweep_id)
        eta = p["eta_seconds"]
        rows.append({"sweep_id": s.sweep_id, "trials": p["total"], "done": p["done"], "running": p["running"],
                     "waiting": p["pending"] + p["queued"], "failed": p["failed"] + p["interrupted"],
                     "cancelled": p["cancelled"], "edits": f"{p['edits_done']}/{p['edits_planned']}",
                     "eta": "–" if eta is None else ("done" if p["done"] == p["total"] else
                                                     f"{eta / 60:.1f} min" if eta >= 60 else f"{eta:.0f} s"),
                     "progress": p["done"] / p["total"] if p["total"] else 0.0, "executor": s.executor,
                     "created": pd.to_datetime(s.created, unit="s", utc=True)})
    return pd.DataFrame(rows, columns=list(OVERVIEW_COLUMNS))


def sweep_point_runs(store: RunStore, sweep_id: str, *, finished_only: bool = False) -> dict[str, str]:
    """``{run_id: point text}`` of each trial's latest run (only the finished / diverged ones when asked)."""
    trials = SweepStore(store).trials(sweep_id)
    if finished_only:
        trials = trials[trials["status"].isin(list(DONE))]
    return {r: point_text(p) for r, p in zip(trials["run_id"], trials["point"]) if isinstance(r, str)}


def sweep_curves(store: RunStore, sweep_id: str, *, kinds: Sequence[str] = CURVE_KINDS,
                 protocol: str = "tf_token_acc", band: str = "std", finished_only: bool = False) -> pd.DataFrame:
    """One curve per grid point and (kind, metric), pooled over the point's seeds: columns ``point, method, kind,
    metric, n_edits, mean, lo, hi, std, n_runs, panel`` (``band``: "std" = mean ± sample std over the seeds'
    runs, "minmax", "sem" or "none"; ``n_runs`` = seeds with a value at that n_edits)."""
    from analysis.curves import metric_curves
    points = sweep_point_runs(store, sweep_id, finished_only=finished_only)
    cols = ["point", "method", "kind", "metric", "n_edits", "mean", "lo", "hi", "std", "n_runs", "panel"]
    df = aggregate_metrics(store, list(points), kinds=list(kinds), metrics=["reliability", "generality", "locality"])
    df = df[df["protocol"].isna() | (df["protocol"] == protocol) | (df["kind"] == "locality")]
    if df.empty:
        return pd.DataFrame(columns=cols)
    # the grid point stands in the "method" column: analysis.curves groups runs by it (and keeps no other column)
    df = df.assign(method=df["run_id"].map(points)).drop(columns=["protocol", "layer", "param"])
    curves = metric_curves(df, by=("method",), band=band, keys=("kind", "metric")).rename(columns={"method": "point"})
    curves["method"] = curves["point"].str.split(" ", n=1).str[0]
    curves["panel"] = curves["kind"] + " · " + curves["metric"]
    return curves[cols].reset_index(drop=True)


def sweep_table(store: RunStore, sweep_id: str) -> pd.DataFrame:
    """The sweep table for display: point, seeds, finished, ``mean ± std`` per metric, collapsed, status."""
    df = sweep_summary(store, sweep_id)
    if df.empty:
        return df
    out = mean_std_view(df, "–")
    out["status"] = df["status"]
    return out


__all__ = ["has_sweeps", "sweeps_overview", "sweep_curves", "sweep_table", "sweep_point_runs", "OVERVIEW_COLUMNS"]
