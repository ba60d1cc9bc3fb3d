"""Metric curves over the number of edits for a set of runs: mean and a band over seeds.

Input: long-form metric rows as the run store keeps them, ``run_id, n_edits, kind, layer, metric, protocol, value``
(plus ``method`` and ``seed`` when known; ``param`` and ``case_id`` are understood). Per-case rows of one run are
averaged first (a run's aggregate rows, ``case_id`` empty, are used as they are when present), then the runs of one
group (by default one method) are summarised per ``n_edits``: mean, band (min/max, ±std or ±SEM) and the number of
runs that reached that point. Curves are against the number of edits made, never steps (EVALUATION.md).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

ROW_COLUMNS = ("run_id", "n_edits", "kind", "layer", "metric", "protocol", "value")
BANDS = ("minmax", "std", "sem", "none")
CURVE_KEYS = ("kind", "layer", "param", "metric", "protocol")


def as_frame(rows: pd.DataFrame | Iterable[Mapping]) -> pd.DataFrame:
    """A DataFrame of metric rows (a copy), whatever came in."""
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [c for c in ("n_edits", "metric", "value") if c not in df.columns]
    if missing:
        raise ValueError(f"metric rows need columns {missing}")
    return df


def attach_runs(rows: pd.DataFrame | Iterable[Mapping], runs: pd.DataFrame | Iterable[Mapping],
                columns: Sequence[str] = ("method", "seed")) -> pd.DataFrame:
    """Add run-level columns (``method``, ``seed``, ...) from a runs table (one row per ``run_id``)."""
    df = as_frame(rows)
    r = runs.copy() if isinstance(runs, pd.DataFrame) else pd.DataFrame(list(runs))
    cols = [c for c in columns if c in r.columns and c not in df.columns]
    if not cols:
        return df
    return df.merge(r[["run_id", *cols]].drop_duplicates("run_id"), on="run_id", how="left")


def run_means(rows: pd.DataFrame | Iterable[Mapping], *, keys: Sequence[str] = CURVE_KEYS) -> pd.DataFrame:
    """One value per (run, n_edits, keys...): a run's aggregate rows when it has them, else the mean of its
    per-case rows."""
    df = as_frame(rows)
    if "run_id" not in df.columns:
        df["run_id"] = "run"
    keys = [k for k in keys if k in df.columns]
    extra = [c for c in ("method", "seed") if c in df.columns]
    group = ["run_id", *extra, "n_edits", *keys]
    if "case_id" in df.columns:
        agg_mask = df["case_id"].isna()
        has_agg = df[agg_mask].groupby(group, dropna=False).size().rename("_agg").reset_index()
        df = df.merge(has_agg, on=group, how="left")
        # keep the aggregate rows where a series has them, the per-case rows elsewhere
        df = df[agg_mask.to_numpy() | df["_agg"].isna().to_numpy()].drop(columns="_agg")
    out = df.groupby(group, dropna=False, sort=True)["value"].mean().reset_index()
    return out


def metric_curves(rows: pd.DataFrame | Iterable[Mapping], *, by: Sequence[str] = ("method",), band: str = "minmax",
                  keys: Sequence[str] = CURVE_KEYS, kinds: Sequence[str] | None = None,
                  metrics: Sequence[str] | None = None, protocol: str | None = None) -> pd.DataFrame:
    """Mean curve and band over the runs of each group.

    Args:
        rows: metric rows (see the module docstring).
        by: columns that define a curve's group (default the method; runs of one method with different seeds are
            pooled). Columns that are absent are ignored; with none left, every run is its own group (``run_id``).
        band: "minmax" (lo/hi = min/max over runs), "std" (mean ± std), "sem" (mean ± standard error) or "none".
        keys: columns that tell curves apart within a group (kind, layer, param, metric, protocol when present).
        kinds / metrics / protocol: optional filters (a row with an empty protocol passes a protocol filter).

    Returns:
        columns ``*by, *keys, n_edits, mean, lo, hi, std, n_runs``, sorted by group and ``n_edits``.
    """
    if band not in BANDS:
        raise ValueError(f"unknown band {band!r}; valid: {', '.join(BANDS)}")
    df = as_frame(rows)
    if kinds is not None and "kind" in df.columns:
        df = df[df["kind"].isin(list(kinds))]
    if metrics is not None:
        df = df[df["metric"].isin(list(metrics))]
    if protocol is not None and "protocol" in df.columns:
        df = df[df["protocol"].isna() | (df["protocol"] == protocol)]
    per_run = run_means(df, keys=keys)
    group = [c for c in by if c in per_run.columns]
    if not group:
        group = ["run_id"]
    keys = [k for k in keys if k in per_run.columns]
    g = per_run.groupby([*group, *keys, "n_edits"], dropna=False, sort=True)["value"]
    out = g.agg(mean="mean", std="std", vmin="min", vmax="max", n_runs="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    if band == "minmax":
        out["lo"], out["hi"] = out["vmin"], out["vmax"]
    elif band == "std":
        out["lo"], out["hi"] = out["mean"] - out["std"], out["mean"] + out["std"]
    elif band == "sem":
        sem = out["std"] / np.sqrt(out["n_runs"].clip(lower=1))
        out["lo"], out["hi"] = out["mean"] - sem, out["mean"] + sem
    else:
        out["lo"], out["hi"] = out["mean"], out["mean"]
    cols = [*group, *keys, "n_edits", "mean", "lo", "hi", "std", "n_runs"]
    return out[cols].reset_index(drop=True)


def as_rows(frame: pd.DataFrame, *, run_id: str | None = None, kind: str, n_edits: int | None = None,
            protocol: str | None = None) -> pd.DataFrame:
    """Turn a diagnostics frame with ``metric`` / ``value`` columns (``weight_stats_frame``, ``update_angles``,
    ``shift_frame``, ...) into run-store rows ``run_id, n_edits, kind, layer, param, metric, protocol, value``."""
    df = frame.copy()
    if "metric" not in df.columns or "value" not in df.columns:
        raise ValueError("the frame needs metric and value columns")
    df["kind"] = kind
    if run_id is not None or "run_id" not in df.columns:
        df["run_id"] = run_id
    if n_edits is not None or "n_edits" not in df.columns:
        df["n_edits"] = n_edits
    for c in ("layer", "param"):
        if c not in df.columns:
            df[c] = None
    if protocol is not None or "protocol" not in df.columns:
        df["protocol"] = protocol
    return df[["run_id", "n_edits", "kind", "layer", "param", "metric", "protocol", "value"]]


__all__ = ["metric_curves", "run_means", "attach_runs", "as_rows", "as_frame", "ROW_COLUMNS", "BANDS"]
