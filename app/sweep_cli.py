"""The sweep commands of ``python -m app``: ``sweep SPEC.yaml`` (:mod:`app.sweep`) and ``merge STORE...``
(:mod:`app.merge`); ``list --sweep ID`` and ``cancel --sweep ID`` use :func:`sweep_run_ids` / :func:`cancel_sweep`.

``sweep`` exit codes: 0 every trial finished or diverged (or a dry run), 1 a trial failed / was cancelled /
interrupted, 2 invalid spec or options, 130 interrupted (the sweep's trials are cancelled, rows kept).
"""
from __future__ import annotations

import json
import os
import sys


class SweepCLIError(Exception):
    """A user error of a sweep command (the CLI prints it, exit code 2)."""


def add_sweep_parsers(sub, add_runs_dir, add_threads) -> None:
    p = sub.add_parser("sweep", help="a grid of sequential runs (methods x seeds x config points) on Ray or locally",
                       description="Run every trial of a sweep spec (YAML/JSON: model(s), method(s), data, n_edits, "
                                   "batch_size, eval_every, seeds, run fields, overrides, grid, points; see "
                                   "app/sweep.py) as an ordinary sequential run into one run store, then print the "
                                   "sweep table (per grid point, mean ± std over seeds). Trials already finished "
                                   "are skipped, so running the same spec again resumes the sweep.")
    p.add_argument("spec", nargs="?", default=None, help="the sweep spec (.yaml / .json)")
    add_runs_dir(p)
    p.add_argument("--dry-run", action="store_true", help="validate and list the trials (run / skip); run nothing")
    p.add_argument("--executor", choices=("ray", "local"), default="ray",
                   help="ray (default: a local Ray instance, or --address) or local (this machine, no Ray)")
    p.add_argument("--address", default=None,
                   help="Ray cluster: ray://HOST:PORT (Ray Client), auto, or HOST:PORT (default: $RAY_ADDRESS, else "
                        "a new local instance)")
    p.add_argument("--no-ship-code", action="store_true",
                   help="with --address: let the cluster's nodes import their installed copy of the workbench "
                        "(default: this checkout's editors/analysis/app packages travel with the job)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of a new local Ray instance (default: all cores)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0,
                   help="Ray CPUs per trial; also its torch threads (default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="Ray GPUs per trial, e.g. 1 or 0.5 (two trials per GPU); > 0 runs trials on cuda "
                        "(default 0: cpu)")
    p.add_argument("--max-retries", type=int, default=1,
                   help="Ray retries of a trial whose worker process died (default 1)")
    p.add_argument("--workers", type=int, default=1,
                   help="--executor local: processes (default 1: one trial after another in this process)")
    p.add_argument("--summary", action="store_true", help="run nothing: the table of the sweep in the store")
    p.add_argument("--json", action="store_true", help="print the trials (dry run) or the table as JSON (last line)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads(p)

    p = sub.add_parser("merge", help="import the runs of other run stores into one (by run id; lossless)",
                       description="Copy every run of each STORE (a runs.sqlite or its directory) with all its rows "
                                   "into --runs-dir. A run already there with the same content is skipped (merging "
                                   "twice changes nothing); one with the same id and other content is a conflict "
                                   "and refuses the merge of that store (nothing written). Sweep tables come along.")
    p.add_argument("stores", nargs="+", help="source stores: .sqlite files or runs directories")
    add_runs_dir(p)
    p.add_argument("--json", action="store_true")


class _SweepBar:
    """tqdm bar over trials on stderr: done / running / failed and tqdm's ETA."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.enabled = enabled

    def __call__(self, p: dict) -> None:
        from .sweep import progress_text
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=p["total"], unit="trial", file=sys.stderr, dynamic_ncols=True, leave=True)
        self.bar.total = p["total"]
        self.bar.n = p["done"] + p["failed"] + p["cancelled"] + p["interrupted"]
        self.bar.set_postfix_str(progress_text(p) + f"; edits {p['edits_done']}/{p['edits_planned']}",
                                 refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_sweep(args) -> int:
    from .store import RunStore
    from .sweep import SweepSpecError, SweepStore, load_spec, plan, progress_text, run_sweep, sweep_progress
    from .sweep_ray import RayUnavailableError
    if args.summary:
        if not args.spec:
            raise SweepCLIError("--summary needs the spec or a sweep id")
        store = RunStore(args.runs_dir)
        sweep_id = args.spec
        if os.path.isfile(args.spec):
            sweep_id = load_spec(args.spec, args.runs_dir).sweep_id
        try:
            sweep_id = SweepStore(store).resolve(sweep_id)
        except KeyError as exc:
            raise SweepCLIError(str(exc.args[0])) from exc
        return _print_summary(store, sweep_id, args)
    if not args.spec:
        raise SweepCLIError("a sweep spec is required: python -m app sweep SPEC.yaml")
    try:
        spec = load_spec(args.spec, args.runs_dir)
    except SweepSpecError as exc:
        raise SweepCLIError(str(exc)) from exc
    if args.dry_run:
        from .store import DB_NAME
        path = args.runs_dir
        exists = os.path.isfile(path) or os.path.isfile(os.path.join(path, DB_NAME))
        df = plan(spec, RunStore(path) if exists else None)
        print(f"sweep {spec.sweep_id}: {len(df)} trials, {int((df['action'] == 'run').sum())} to run, "
              f"{int((df['action'] == 'skip').sum())} finished already (dry run: nothing started)")
        print(df[["idx", "action", "point", "seed", "status", "run_id"]].fillna("").to_string(index=False))
        if args.json:
            print(df.to_json(orient="records"))
        return 0
    bar = _SweepBar(not args.no_progress)
    print(f"sweep {spec.sweep_id}: {len(spec.trials)} trials, executor {args.executor} -> {args.runs_dir}",
          file=sys.stderr)
    try:
        result = run_sweep(spec, args.runs_dir, executor=args.executor, workers=args.workers, address=args.address,
                           cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                           max_retries=args.max_retries, num_cpus=args.num_cpus, progress=bar,
                           ship_code=not args.no_ship_code)
    except (SweepSpecError, RayUnavailableError) as exc:
        bar.close()
        raise SweepCLIError(str(exc)) from exc
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: the trials of sweep {spec.sweep_id} were cancelled (rows kept); run the same command "
              f"to resume", file=sys.stderr)
        return 130
    bar.close()
    store = RunStore(args.runs_dir)
    p = sweep_progress(SweepStore(store), spec.sweep_id)
    print(f"sweep {spec.sweep_id}: {progress_text(p)} ({len(result.started)} run now, {len(result.skipped)} "
          f"skipped as finished; {result.seconds:.0f} s)", file=sys.stderr)
    code = _print_summary(store, spec.sweep_id, args)
    bad = p["failed"] + p["cancelled"] + p["interrupted"]
    return 1 if bad else code


def _print_summary(store, sweep_id: str, args) -> int:
    from .sweep import format_summary, sweep_summary
    table = sweep_summary(store, sweep_id)
    print(f"sweep {sweep_id} (final retention, tf_token_acc, last checkpoint; mean ± std over seeds):")
    print(format_summary(table))
    if args.json:
        print(table.to_json(orient="records"))
    return 0


def cmd_merge(args) -> int:
    from .merge import MergeError, merge_stores
    try:
        report = merge_stores(args.runs_dir, args.stores)
    except MergeError as exc:
        raise SweepCLIError(str(exc)) from exc
    print(f"merged into {args.runs_dir}: {report}")
    if args.json:
        print(json.dumps({"copied": report.copied, "identical": report.identical, "rows": report.rows,
                          "sweeps": report.sweeps}))
    return 0


def sweep_run_ids(store, sweep_id: str) -> list[str]:
    """Every run of the sweep ``sweep_id`` (or a unique prefix) in ``store``."""
    from .sweep import SweepStore, sweep_tables_exist
    if not sweep_tables_exist(store):
        raise SweepCLIError(f"{store.path} has no sweeps")
    try:
        return SweepStore(store).run_ids(sweep_id)
    except KeyError as exc:
        raise SweepCLIError(str(exc.args[0])) from exc


def cancel_sweep(store, sweep_id: str) -> str:
    from .sweep import SweepStore, sweep_tables_exist
    if not sweep_tables_exist(store):
        raise SweepCLIError(f"{store.path} has no sweeps")
    sweeps = SweepStore(store)
    try:
        sweep_id = sweeps.resolve(sweep_id)
    except KeyError as exc:
        raise SweepCLIError(str(exc.args[0])) from exc
    ids = sweeps.request_cancel(sweep_id)
    return f"cancel requested for sweep {sweep_id} ({len(ids)} queued / running run(s) asked to stop)"


__all__ = ["add_sweep_parsers", "cmd_sweep", "cmd_merge", "sweep_run_ids", "cancel_sweep", "SweepCLIError"]
