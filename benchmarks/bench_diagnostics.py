"""Diagnostics cost: what share of a sequential run goes to weight / angle / hidden-state diagnostics.

Runs one sequential run through the engine (the same path as ``python -m app run``) and prints the split of its
wall time recorded in the store's ``timing`` rows: editing, evaluation (immediate metrics, retention, locality
probes, general abilities) and diagnostics (weight statistics and spectra of every edited matrix, update angles,
hidden-state captures). The issue's target: diagnostics <= 20% of run time on the default model with eval_every=10.

Run::

    python -m benchmarks.bench_diagnostics --method rome --n-edits 20 --eval-every 10
"""
from __future__ import annotations

import argparse
import tempfile

import pandas as pd


def run_diagnostics_bench(method: str = "rome", n_edits: int = 20, eval_every: int = 10, data: str = "builtin",
                          model: str = "default", hidden_states: bool = False, runs_dir: str | None = None,
                          overrides: dict | None = None, lm=None) -> pd.DataFrame:
    """One run; returns a one-row frame with the time split and the diagnostics' share."""
    from app.engine import RunConfig, run_sequential
    from app.store import RunStore

    runs_dir = runs_dir or tempfile.mkdtemp(prefix="bench-diag-")
    cfg = RunConfig(model=model, method=method, data=data, n_edits=n_edits, eval_every=eval_every,
                    runs_dir=runs_dir, hidden_states=hidden_states, method_overrides=dict(overrides or {}))
    store = RunStore(runs_dir)
    run_id = run_sequential(cfg, store, lm=lm)
    t = store.metrics_frame([run_id], kinds=["timing"])
    last = t[t["n_edits"] == t["n_edits"].max()].groupby("metric")["value"].last()
    total = float(last["run_seconds_total"])
    row = {
        "method": method, "n_edits": n_edits, "eval_every": eval_every, "status": store.get_run(run_id)["status"],
        "run_s": total,
        "edit_s": float(last["edit_seconds_total"]),
        "evaluation_s": float(last["evaluation_seconds_total"]),
        "diagnostics_s": float(last["diagnostics_seconds_total"]),
    }
    row["setup_and_other_s"] = total - row["edit_s"] - row["evaluation_s"] - row["diagnostics_s"]
    row["diagnostics_share"] = row["diagnostics_s"] / total if total > 0 else float("nan")
    return pd.DataFrame([row])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="rome")
    ap.add_argument("--n-edits", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--model", default="default")
    ap.add_argument("--hidden-states", action="store_true")
    args = ap.parse_args(argv)
    df = run_diagnostics_bench(args.method, args.n_edits, args.eval_every, args.data, args.model, args.hidden_states)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    share = float(df["diagnostics_share"].iloc[0])
    print(f"diagnostics share of run time: {share:.1%} (target <= 20%)")


if __name__ == "__main__":
    main()
