"""A sweep of the default model, ``--executor ray`` against the same trials one after another (``--executor local``).

    python -m benchmarks.bench_sweep                      # 4 trials: rome x 2 v_num_grad_steps x 2 seeds, 2 edits
    python -m benchmarks.bench_sweep --n-edits 1 --steps 5 8 --local-threads 1   # the README's figures
    python -m benchmarks.bench_sweep --method memit --n-edits 3 --cpus 2 --json out.json

Both sweeps run the same spec into their own fresh store (a temporary directory): first the local executor in this
process (one trial after another, the model loaded once, torch on ``--local-threads``, default all ``--cpus``), then
Ray on a new local instance with ``num_cpus=--cpus`` and one CPU (one torch thread) per trial. Printed:

* the wall time of each (Ray's including ``ray.init``) and their ratio (local / ray: > 1 means Ray was faster);
* Ray's overhead per trial, from the times each trial's task recorded: the task's start latency (submit -> the task
  function runs: a worker process and the imports of the sweep module; first wave only, the others waited for a
  free CPU), the in-task setup (task start -> model loaded: the engine's imports and ``load_model``, paid per trial
  where the local executor loads the model once), the store transfer (seconds spent sending the run's writes to
  the writer actor, and their count) and the return (trial end -> the driver has the result); and the total
  ``(done - task start) - run seconds`` per trial plus the first-wave start latency;
* each trial's run seconds in both (the engine's ``seconds_total``) and whether the two sweeps' final metrics agree.

The machine's load average is printed before and after: on a shared machine the figures move with it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def _spec(args) -> dict:
    return {"name": "bench", "model": args.model, "methods": [args.method], "n_edits": args.n_edits,
            "eval_every": args.n_edits, "seeds": list(range(args.seeds)),
            "run": {"general": "none", "device": "cpu"},
            "grid": {f"{args.method}.v_num_grad_steps": args.steps}}


def _finals(runs_dir: str) -> dict:
    from app.store import RunStore
    from app.sweep import SweepStore, run_quantities
    store = RunStore(runs_dir)
    t = SweepStore(store).trials("bench")
    return {k: run_quantities(store, r) for k, r in zip(t["trial_key"], t["run_id"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--method", default="rome")
    p.add_argument("--n-edits", type=int, default=2)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, nargs="+", default=[20, 25], help="v_num_grad_steps values (grid)")
    p.add_argument("--cpus", type=int, default=2, help="cores: Ray's num_cpus and the local run's torch threads")
    p.add_argument("--local-threads", type=int, default=None,
                   help="torch threads of the local sweep (default: --cpus). On a loaded machine 1 is much faster "
                        "than 2: oversubscribed OpenMP threads stall at barriers")
    p.add_argument("--skip-local", action="store_true")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)

    import torch

    from app.store import RunStore
    from app.sweep import SweepStore, load_spec, run_sweep

    out: dict = {"load_before": os.getloadavg(), "args": vars(args)}
    tmp = tempfile.mkdtemp(prefix="bench-sweep-")
    spec = load_spec(_spec(args), tmp)
    print(f"{len(spec.trials)} trials: {', '.join(t.describe() for t in spec.trials)}; load average "
          f"{out['load_before'][0]:.1f}", flush=True)

    if not args.skip_local:
        threads = args.local_threads or args.cpus
        torch.set_num_threads(threads)
        local_dir = os.path.join(tmp, "local")
        t0 = time.time()
        res = run_sweep(_spec(args), local_dir, executor="local")
        out["local_wall"] = time.time() - t0
        out["local_status"] = list(res.trials["status"])
        out["local_run_seconds"] = [float(x) for x in res.trials["seconds_total"]]
        print(f"local (one after another, {threads} threads): {out['local_wall']:.1f} s wall; run seconds "
              f"{', '.join(f'{x:.1f}' for x in out['local_run_seconds'])}; {out['local_status']}", flush=True)

    ray_dir = os.path.join(tmp, "ray")
    t0 = time.time()
    res = run_sweep(_spec(args), ray_dir, executor="ray", num_cpus=args.cpus, cpus_per_trial=1)
    out["ray_wall"] = time.time() - t0
    info = res.info
    store = RunStore(ray_dir)
    seconds = {r: float(store.get_run(r)["seconds_total"] or 0) for r in SweepStore(store).run_ids("bench")}
    results = sorted(info["results"], key=lambda r: r["t_task"])
    first_submit = min(r["t_submit"] for r in results)
    wave = [r for r in results if r["t_task"] - first_submit < min(s for s in seconds.values())]
    per = []
    for r in results:
        per.append({"run_id": r["run_id"], "pid": r["pid"],
                    "start_latency": r["t_task"] - r["t_submit"],
                    "setup": r["t_loaded"] - r["t_task"], "run_seconds": seconds[r["run_id"]],
                    "store_seconds": r["store_seconds"], "store_calls": r["store_calls"],
                    "return": r["t_done"] - r["t_end"],
                    "overhead": (r["t_done"] - r["t_task"]) - seconds[r["run_id"]]})
    out["ray_init_seconds"] = info["ray_init_seconds"]
    out["ray_trials"] = per
    out["ray_status"] = list(res.trials["status"])
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    first_latency = mean([r["t_task"] - r["t_submit"] for r in wave])
    out["ray_overhead_per_trial"] = mean([x["overhead"] for x in per]) + first_latency * len(wave) / len(per)
    print(f"ray ({args.cpus} CPUs, 1 per trial): {out['ray_wall']:.1f} s wall (ray.init "
          f"{info['ray_init_seconds']:.1f} s); {out['ray_status']}")
    for x in per:
        print(f"  trial {x['run_id']} pid {x['pid']}: start latency {x['start_latency']:.1f} s, setup (imports + "
              f"model load) {x['setup']:.1f} s, run {x['run_seconds']:.1f} s, store transfer "
              f"{x['store_seconds'] * 1000:.0f} ms over {x['store_calls']} calls, return {x['return'] * 1000:.0f} ms, "
              f"overhead (done - start - run) {x['overhead']:.1f} s")
    print(f"Ray overhead per trial: {out['ray_overhead_per_trial']:.1f} s (mean of done - task start - run seconds, "
          f"plus the first wave's start latency {first_latency:.1f} s shared over the trials); of which store "
          f"transfer {mean([x['store_seconds'] for x in per]) * 1000:.0f} ms")
    if not args.skip_local:
        out["ratio_local_over_ray"] = out["local_wall"] / out["ray_wall"]
        a, b = _finals(os.path.join(tmp, "local")), _finals(ray_dir)
        diffs = [abs((a[k][m] or 0) - (b[k][m] or 0)) for k in a for m in ("reliability", "generality", "locality")]
        out["max_final_metric_difference"] = max(diffs) if diffs else None
        print(f"wall-time ratio local / ray = {out['ratio_local_over_ray']:.2f}; largest difference of a final "
              f"retention metric between the two sweeps: {out['max_final_metric_difference']}")
    out["load_after"] = os.getloadavg()
    print(f"load average after: {out['load_after'][0]:.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
