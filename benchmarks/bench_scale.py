"""Scale benchmark: does a long sequential run cost the same per edit at its end as at its start?

One sequential run through the engine (``app.engine.SequentialRun``, the path of ``python -m app run``) of
``--n-edits`` (default 1,000) edits of the built-in or CounterFact records, with the run settings a long run would
use (default: ``checkpoint_schedule=geometric``, exact retention, locality probes, general abilities, weight
diagnostics and update angles on). For each tenth of the run it prints the wall time split into edit / evaluation /
diagnostics / store (SQLite writes) / other, seconds per edit, the store's size on disk (SQLite file, WAL and
artifact files) and the process's peak RSS.

The targets (issue 16): the time per edit of the last 10% within 1.5x of the first 10%, and evaluation +
diagnostics <= 25% of the run.

``--layers N`` keeps the first N decoder layers of the default model (SmolLM2-135M-Instruct: its real architecture
and weights, fewer layers) so that a 2-core CPU gets through hundreds of edits; the method's preset for the default
model still applies (its layers must be < N).

Run::

    python -m benchmarks.bench_scale --n-edits 1000                       # the default model, 1,000 edits
    python -m benchmarks.bench_scale --layers 10 --n-edits 200 --threads 1 # what a shared 2-core CPU allows
    python -m benchmarks.bench_scale --data counterfact:../shared/data/counterfact/counterfact-edit.json \\
        --n-edits 10000 --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import tempfile
import time

import pandas as pd

from app.engine import SequentialRun, _new_run_fields
from app.runconfig import RunConfig
from app.store import RunStore

COUNTERFACT = "counterfact:../shared/data/counterfact/counterfact-edit.json"


class TimedStore(RunStore):
    """A run store that adds up the seconds its writes take."""

    seconds = 0.0

    def _timed(self, write, *args, **kw):
        t0 = time.perf_counter()
        try:
            return write(*args, **kw)
        finally:
            self.seconds += time.perf_counter() - t0

    def write_step(self, *args, **kw):
        return self._timed(super().write_step, *args, **kw)

    def add_metric_rows(self, *args, **kw):
        return self._timed(super().add_metric_rows, *args, **kw)


def store_bytes(store: RunStore) -> int:
    """The store on disk: the SQLite file, its WAL and every artifact file."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        p = store.path + suffix
        total += os.path.getsize(p) if os.path.exists(p) else 0
    for root, _dirs, files in os.walk(os.path.join(store.runs_dir, "artifacts")):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def truncated_default(n_layers: int, device: str | None = None, dtype: str = "auto"):
    """The default model with only its first ``n_layers`` decoder layers (real architecture and weights)."""
    import torch

    from editors.models import load_model, wrap_model
    lm = load_model("default", device=device, dtype=dtype)
    if n_layers >= lm.spec.n_layers:
        return lm
    layers = lm.model.get_submodule(lm.spec.layers_path)
    parent_path, _, attr = lm.spec.layers_path.rpartition(".")
    parent = lm.model.get_submodule(parent_path) if parent_path else lm.model
    setattr(parent, attr, torch.nn.ModuleList(list(layers)[:n_layers]))
    lm.model.config.num_hidden_layers = n_layers
    if getattr(lm.model.config, "layer_types", None):
        lm.model.config.layer_types = lm.model.config.layer_types[:n_layers]
    return wrap_model(lm.model, lm.tokenizer, name="default", display_name=f"{lm.display_name}[:{n_layers} layers]",
                      device=lm.device)


def run_scale_bench(config: RunConfig, lm, runs_dir: str) -> tuple[pd.DataFrame, dict]:
    """Run ``config`` on ``lm``; returns the per-decile table and the run's totals."""
    config.validate()
    store = TimedStore(runs_dir)
    method_config, preset_version = config.method_config(lm.name)
    run_id = store.create_run(status="running", pid=os.getpid(), heartbeat=time.time(),
                              **_new_run_fields(config, method_config, preset_version))
    snaps: list[dict] = []
    holder: dict = {}
    t_start = time.perf_counter()

    def snapshot(n_done: int) -> dict:
        run = holder["run"]
        return {"n_edits": n_done, "wall": time.perf_counter() - t_start, "edit": run.edit_seconds,
                "evaluation": run.eval_seconds_total, "diagnostics": run.diag_seconds, "store": store.seconds,
                "store_mb": store_bytes(store) / 2 ** 20, "peak_rss_mb": peak_rss_mb()}

    def progress(done, total, info):
        if info.get("phase") == "start":
            snaps.append(snapshot(0))
        elif info.get("phase") == "edit":
            snaps.append(snapshot(done))

    run = SequentialRun(config, store, run_id, method_config, lm=lm, progress=progress)
    holder["run"] = run
    run.execute()
    snaps.append(snapshot(run.n_done))  # after the last checkpoint and collapse detection
    status = store.get_run(run_id)["status"]
    n = run.n_done
    rows = []
    bounds = [math.ceil(k * n / 10) for k in range(11)]
    # the snapshot at n is taken right after the step that reached n edits, before its checkpoint: a checkpoint is
    # counted in the next tenth, except the last one (the final snapshot replaces the one at n)
    at = {s["n_edits"]: s for s in snaps}
    for k in range(10):
        lo, hi = bounds[k], bounds[k + 1]
        if hi <= lo or lo not in at or hi not in at:
            continue
        a, b = at[lo], at[hi]
        parts = {p: b[p] - a[p] for p in ("edit", "evaluation", "diagnostics", "store")}
        wall = b["wall"] - a["wall"]
        rows.append({"decile": f"{10 * k}-{10 * (k + 1)}%", "edits": f"{lo + 1}-{hi}", "wall_s": wall, **
                     {f"{p}_s": v for p, v in parts.items()}, "other_s": wall - sum(parts.values()),
                     "s_per_edit": wall / (hi - lo), "store_mb": b["store_mb"], "peak_rss_mb": b["peak_rss_mb"]})
    table = pd.DataFrame(rows)
    end = snaps[-1]
    totals = {"run_id": run_id, "status": status, "n_edits": n, "wall_s": end["wall"], "edit_s": end["edit"],
              "evaluation_s": end["evaluation"], "diagnostics_s": end["diagnostics"], "store_s": end["store"],
              "store_mb": end["store_mb"], "peak_rss_mb": end["peak_rss_mb"]}
    if len(table) >= 2:
        totals["last_over_first"] = float(table["s_per_edit"].iloc[-1] / table["s_per_edit"].iloc[0])
    totals["eval_diag_share"] = (end["evaluation"] + end["diagnostics"]) / end["wall"] if end["wall"] else math.nan
    return table, totals


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="rome")
    ap.add_argument("--n-edits", type=int, default=1000)
    ap.add_argument("--data", default=None, help=f"default: builtin when n <= 119, else {COUNTERFACT}")
    ap.add_argument("--layers", type=int, default=0, help="keep the first N layers of the default model (0 = all)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="run.FIELD=VALUE|FIELD=VALUE",
                    help="run fields (run.checkpoint_schedule=every, run.retention_sample=100, ...) or method fields")
    ap.add_argument("--runs-dir", default=None)
    ap.add_argument("--json", default=None, help="also write the table and totals to this JSON file")
    args = ap.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from editors.fields import parse_sets
    sets = parse_sets(args.sets)
    run_fields = {k[4:]: v for k, v in sets.items() if k.startswith("run.")}
    overrides = {k: v for k, v in sets.items() if not k.startswith("run.")}
    data = args.data or ("builtin" if args.n_edits <= 119 else COUNTERFACT)
    cfg = RunConfig(method=args.method, data=data, n_edits=args.n_edits, checkpoint_schedule="geometric",
                    device=args.device, dtype=args.dtype, method_overrides=overrides,
                    runs_dir=args.runs_dir or tempfile.mkdtemp(prefix="bench-scale-"))
    if run_fields:
        cfg = cfg.replace(**run_fields)
    t0 = time.perf_counter()
    lm = truncated_default(args.layers, args.device, args.dtype) if args.layers else None
    if lm is None:
        from editors.models import load_model
        lm = load_model(cfg.model, device=args.device, dtype=args.dtype)
    print(f"model {lm.display_name} ({lm.spec.n_layers} layers) on {lm.device}, "
          f"dtype {next(lm.model.parameters()).dtype}, loaded in {time.perf_counter() - t0:.1f}s; method "
          f"{cfg.method}, {cfg.n_edits} edits of {cfg.data}, checkpoints {cfg.checkpoint_schedule}"
          f"{'' if cfg.checkpoint_schedule != 'every' else f' every {cfg.eval_every}'}, retention_sample "
          f"{cfg.retention_sample}, threads {torch.get_num_threads()}", flush=True)
    table, totals = run_scale_bench(cfg, lm, cfg.runs_dir)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in totals.items()}))
    if "last_over_first" in totals:
        print(f"last 10% / first 10% time per edit: {totals['last_over_first']:.2f} (target <= 1.5)")
    print(f"evaluation + diagnostics share of the run: {totals['eval_diag_share']:.1%} (target <= 25%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": table.to_dict("records"), "totals": totals}, f, indent=1)


if __name__ == "__main__":
    main()
