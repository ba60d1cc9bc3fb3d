"""Render time of every workbench page (Streamlit AppTest) on a store holding a synthetic 2000-edit run.

    python -m benchmarks.bench_pages [--edits 2000] [--eval-every 100] [--repeat 3] [--runs-dir DIR]

The run's rows are written directly (:func:`tests.fixtures.synthetic_run`: per-case edit and retention rows,
weights, update angles, singular values and hidden states at every checkpoint). Each page is rendered once to load
its data (the "cold" column: SQL + analysis, then cached), then ``--repeat`` more times (the "warm" column: the
median, what a user sees when moving a slider or coming back to the page). The target is < 1 s warm per page.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAGES = ("runs.py", "new_run.py", "playground.py", "metrics.py", "weights.py", "geometry.py", "hidden_states.py",
         "general.py")


def build_store(runs_dir: str, n_edits: int, eval_every: int) -> tuple[str, float]:
    from app.store import RunStore
    from tests.fixtures import synthetic_run
    store = RunStore(runs_dir)
    existing = store.list_runs()
    if len(existing):
        return existing["run_id"].iloc[0], 0.0
    t0 = time.perf_counter()
    run_id = synthetic_run(store, method="rome", n_edits=n_edits, eval_every=eval_every, layers=(16, 17),
                           d_out=576, d_in=1536, n_probes=64, geoedit=True, label=f"synthetic {n_edits}")
    return run_id, time.perf_counter() - t0


def time_page(page: str, run_id: str, step: int, repeat: int) -> tuple[float, float, int]:
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(os.path.join(ROOT, "app", "main.py"), default_timeout=300)
    at.query_params["runs"] = run_id
    at.run()
    at.switch_page(f"../pages/{page}")
    for k, v in {"runs": run_id, "step": str(step), "layer": "16"}.items():
        at.query_params[k] = v
    t0 = time.perf_counter()
    at.run()
    cold = time.perf_counter() - t0
    if at.exception:
        raise RuntimeError(f"{page}: {at.exception[0].value}")
    warm = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        at.run()
        warm.append(time.perf_counter() - t0)
    return cold, statistics.median(warm), len(at.get("plotly_chart"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--edits", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--runs-dir", default=None, help="reuse / keep the store here (default: a temporary directory)")
    p.add_argument("--pages", default=",".join(PAGES))
    args = p.parse_args(argv)
    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="bench-pages-")
    os.environ["EDITBENCH_RUNS"] = runs_dir
    os.environ["EDITBENCH_NO_WORKER"] = "1"
    run_id, seconds = build_store(runs_dir, args.edits, args.eval_every)
    from app.store import RunStore
    store = RunStore(runs_dir)
    n_rows = len(store.metrics_frame([run_id]))
    size_mb = os.path.getsize(store.path) / 2 ** 20
    print(f"store {runs_dir}: run {run_id}, {args.edits} edits, {n_rows:,} metric rows, {size_mb:.1f} MB"
          + (f" (written in {seconds:.1f} s)" if seconds else " (reused)"))
    step = args.edits // 2 // args.eval_every * args.eval_every or args.eval_every
    print(f"\n{'page':<18}{'cold s':>9}{'warm s':>9}{'charts':>8}  {'< 1 s warm':>10}")
    worst = 0.0
    for page in [x for x in args.pages.split(",") if x]:
        cold, warm, charts = time_page(page, run_id, step, args.repeat)
        worst = max(worst, warm)
        print(f"{page[:-3]:<18}{cold:>9.2f}{warm:>9.2f}{charts:>8}  {'yes' if warm < 1 else 'NO':>10}")
    print(f"\nslowest warm render: {worst:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
