"""``python -m app``: run sequential edits, inspect and export the run store, list methods.

Commands::

    run      one sequential run (progress bar on stderr; --json prints a JSON summary as the last stdout line)
    list     runs in the store
    show     one run: config, status, final metrics, collapse summary
    export   one run's long-form rows as CSV or Parquet
    methods  methods, their summaries and config fields (help, defaults)
    cancel   ask a running run to stop after its current step
    delete   remove a run and its rows
    ui       the web app (app/serve.py: localhost only, no usage statistics, from any directory)
    bench    the editor benchmark (``python -m benchmarks.bench_editors`` in a subprocess; arguments passed on)
    study    reproduction studies (app/study.py)
    train    hypernetwork training of malmen / agrade (app/train.py)
    export-stats  covariance statistics in EasyEdit's cache layout (app/export_stats.py)
    sweep    a grid of runs (methods x seeds x config points) on Ray or locally (app/sweep.py, app/sweep_cli.py)
    merge    import the runs of other run stores into one (app/merge.py)

Exit codes: 0 done (a run that finished or diverged: the status says which), 1 a run failed, 2 invalid input
(unknown method / field, bad data file, bad model), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import textwrap
from typing import Sequence

log = logging.getLogger("app.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CLIError(Exception):
    """An error the user can fix; printed without a traceback, exit code 2."""


def _default_runs_dir() -> str:
    return os.environ.get("EDITBENCH_RUNS", "runs")


def _add_runs_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default=_default_runs_dir(),
                   help="directory of the run store runs.sqlite (default: $EDITBENCH_RUNS or ./runs)")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op CPU threads (default: torch's choice, all cores). Use 1 for each of several "
                        "processes sharing the cores: oversubscribed OpenMP threads stall each other at barriers")


def _apply_threads(args) -> None:
    """``--threads N``: torch's intra-op thread count for this process (N >= 1)."""
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        raise CLIError(f"--threads must be at least 1, got {n}")
    import torch
    torch.set_num_threads(n)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description="Knowledge-editing workbench: sequential "
                                     "editing runs, the run store, methods.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug, tracebacks)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="run sequential edits and record them",
                       description="Edit a model step by step (never rolled back) and record edit, retention, "
                                   "locality, general-ability, weight and timing metrics in the run store.")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a model directory or hub id")
    p.add_argument("--method", default="rome", help="editing method (see `python -m app methods`)")
    p.add_argument("--data", default="builtin", help="builtin | counterfact:PATH | zsre:PATH | PATH")
    p.add_argument("--n-edits", type=int, default=10, help="number of edits (default 10)")
    p.add_argument("--batch-size", type=int, default=1, help="edits per step (default 1)")
    p.add_argument("--eval-every", type=int, default=10,
                   help="checkpoint every N steps (retention etc.); the last step always is one (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: best available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights' dtype (default auto: bfloat16 on a CUDA GPU with bf16, float32 elsewhere); edit "
                        "maths is float32 either way")
    p.add_argument("--checkpoints", dest="checkpoint_schedule", default="every", metavar="SCHEDULE",
                   help="every (every --eval-every steps, default) | geometric (steps 1,2,5,10,20,50,...) | a comma "
                        "list of steps")
    p.add_argument("--retention-sample", type=int, default=0, metavar="K",
                   help="re-score a seeded stratified sample of K edits so far at each checkpoint (0 = all, exact)")
    p.add_argument("--snapshot-every", type=int, default=0, metavar="K",
                   help="resume snapshots every K steps and at every checkpoint (0 = at checkpoints, the default; "
                        "-1 = never); an interrupted run continues with `python -m app resume RUN_ID`")
    _add_threads(p)
    _add_runs_dir(p)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a method config field (repeatable); run.<field>=VALUE sets a run field, e.g. "
                        "run.general=none, run.protocols=tf_token_acc,gen_exact, run.hidden_states=true")
    p.add_argument("--preset", dest="preset_variant", default="", metavar="VARIANT",
                   help="a named variant of the method's preset, e.g. 'reference' (what the reference implementation "
                        "computes); `python -m app methods METHOD` lists them")
    p.add_argument("--label", default="", help="free-text name of the run")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("resume", help="continue an interrupted, failed or cancelled run from its newest snapshot",
                       description="Continue a run that was killed, interrupted, cancelled or failed from its newest "
                                   "resume snapshot (taken at checkpoints, or every --snapshot-every steps): the "
                                   "rows after the snapshot are dropped and made again, with the run's stored "
                                   "config; the result is what an uninterrupted run records.")
    p.add_argument("run_id", help="run id (or a unique prefix)")
    _add_threads(p)
    _add_runs_dir(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("list", help="list runs")
    _add_runs_dir(p)
    p.add_argument("--method", default=None)
    p.add_argument("--status", default=None)
    p.add_argument("--sweep", default=None, metavar="ID", help="only the runs of this sweep (id or unique prefix)")
    p.add_argument("--json", action="store_true", help="JSON records instead of a table")

    p = sub.add_parser("show", help="one run: config, status, final metrics, collapse summary")
    p.add_argument("run_id", help="run id (or a unique prefix)")
    _add_runs_dir(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="export one run's long-form rows")
    p.add_argument("run_id", help="run id (or a unique prefix)")
    _add_runs_dir(p)
    p.add_argument("--format", choices=("csv", "parquet"), default=None,
                   help="default: from the extension of --out, else csv")
    p.add_argument("--out", default=None, help="output file (default: <runs-dir>/<run_id>.<format>)")

    p = sub.add_parser("methods", help="methods and their config fields")
    p.add_argument("name", nargs="?", default=None, help="one method")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cancel", help="ask a run (or every run of a sweep) to stop after its current step")
    p.add_argument("run_id", nargs="?", default=None)
    p.add_argument("--sweep", default=None, metavar="ID", help="cancel a sweep: its driver stops all its trials")
    _add_runs_dir(p)

    p = sub.add_parser("delete", help="delete a run and its rows")
    p.add_argument("run_id")
    _add_runs_dir(p)

    sub.add_parser("ui", help="the web app on this machine only, from any directory (app/serve.py; Streamlit "
                              "options are passed on)", add_help=False)

    p = sub.add_parser("bench", help="editor benchmarks (arguments are passed on)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)

    # ---- study (app/study.py) ----------------------------------------------------------------------------
    p = sub.add_parser("study", help="reproduction studies (collapse: N sequential edits per method, one table)",
                       description="collapse: N sequential single edits per method into one run store, then a "
                                   "table per method at N: retention reliability / generality / locality and the "
                                   "edited matrices' Frobenius norm and condition number relative to the unedited "
                                   "model. A method already finished with the same settings is not run again.")
    p.add_argument("study", choices=("collapse", "reproduce"),
                   help="which study: collapse, or reproduce (a seed paper's tables under its own protocol, "
                        "--paper; app/reproduce)")
    p.add_argument("--n", type=int, default=None,
                   help="collapse: sequential edits per method (default 200, or the preset's); reproduce: records / "
                        "edits per setting (default: the paper module's)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods, METHOD:VARIANT for a preset variant (default: the study's methods, "
                        "app.study.DEFAULT_METHODS, or the preset's)")
    p.add_argument("--preset", default=None,
                   help="named study settings (app.study.STUDY_PRESETS): 'lifelong' = 1,000 edits of ROME, MEMIT, "
                        "AlphaEdit, PRUNE, MOSE, UltraEdit with and without LN and GRACE, geometric checkpoints, "
                        "tf_token_acc + wild_gen; explicit options win")
    p.add_argument("--protocols", default=None,
                   help="comma-separated evaluation protocols of the runs, e.g. tf_token_acc,wild_gen (default: the "
                        "run default, or the preset's)")
    p.add_argument("--data", default=None,
                   help="request source (default: the CounterFact edit split, app.study.DEFAULT_DATA)")
    _add_runs_dir(p)
    p.add_argument("--eval-every", type=int, default=None,
                   help="checkpoint every K edits (default: N // 10); the last edit always is one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: best available)")
    p.add_argument("--general", default="none", help="general-ability probes: none (default) | builtin | glue:DIR")
    _add_threads(p)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method config field for one method of the study (repeatable), e.g. mose.lam=50")
    p.add_argument("--report", action="store_true",
                   help="run nothing: the table of the latest matching run of each method (any status)")
    p.add_argument("--json", action="store_true", help="print the table as JSON records (last stdout line)")
    p.add_argument("--paper", default=None, help="reproduce: which paper (geoedit, adaedit, mose, agrade: the "
                                                 "modules of app/reproduce)")
    p.add_argument("--out", default=None, help="reproduce: output folder (default runs/reproduce/<paper>)")
    p.add_argument("--model", default="default", help="reproduce: the model (default: the embedded default)")
    p.add_argument("--quick", action="store_true", help="reproduce: the smallest meaningful run (a smoke test)")
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="reproduce: a paper-specific option (repeatable; see the paper module's docstring)")

    # ---- train (app/train.py) ----------------------------------------------------------------------------
    from .train import HYPERNET_METHODS  # light: the trainer's heavy imports happen when it runs
    p = sub.add_parser("train", help="train the hypernetwork of malmen / agrade (resumable; checkpoints in the cache)",
                       description="Train (or resume) the hypernetwork of a hypernetwork-based method. Checkpoints go "
                                   "to <cache>/hypernets/<model hash>/<method>-<config hash>/ and are found by later "
                                   "edits with the same model and config.")
    p.add_argument("--method", required=True, choices=HYPERNET_METHODS)
    p.add_argument("--data", required=True, help="training records: counterfact:PATH | zsre:PATH")
    p.add_argument("--steps", type=int, default=200, help="meta steps in total (default 200; resumes at the last "
                                                          "checkpoint)")
    p.add_argument("--eval-every", type=int, default=50, help="validate and checkpoint every K steps (default 50)")
    p.add_argument("--n-val", type=int, default=16, help="held-out records for validation (default 16)")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: best available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a config field of the method on top of its preset (repeatable), e.g. rank=128")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .export_stats import add_export_stats_parser  # export-stats (app/export_stats.py)
    add_export_stats_parser(sub)
    from .sweep_cli import add_sweep_parsers  # sweep, merge (app/sweep_cli.py)
    add_sweep_parsers(sub, _add_runs_dir, _add_threads)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------------------
def _json_safe(obj):
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class _Progress:
    """tqdm bar over edits on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="edit", file=sys.stderr, dynamic_ncols=True, leave=True)

    def __call__(self, done: int, total: int, info: dict) -> None:
        if self.bar is None:
            return
        if self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        phase = info.get("phase", "")
        post = {"phase": phase}
        metrics = info.get("retention") or info.get("metrics") or {}
        rel = metrics.get("reliability/tf_token_acc")
        if rel is not None:
            post["rel"] = f"{rel:.2f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_sets(pairs: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``run``'s ``--set`` strings as (run fields, method config fields): ``run.FIELD=VALUE`` sets a field of the run
    config, any other ``KEY=VALUE`` a field of the method's config (:func:`editors.fields.parse_sets`)."""
    from editors.fields import parse_sets
    sets = parse_sets(pairs)
    run_fields = {k[len("run."):]: v for k, v in sets.items() if k.startswith("run.")}
    return run_fields, {k: v for k, v in sets.items() if not k.startswith("run.")}


def cmd_run(args) -> int:
    from editors.base import ConfigError
    from editors.models import ModelLoadError
    from editors.registry import UnknownMethodError

    from .engine import queue_run, run_sequential
    from .runconfig import RunConfig

    try:
        run_fields, overrides = run_sets(args.sets)
        config = RunConfig(model=args.model, method=args.method, method_overrides=overrides, data=args.data,
                           n_edits=args.n_edits, batch_size=args.batch_size, eval_every=args.eval_every,
                           seed=args.seed, device=args.device, runs_dir=args.runs_dir, label=args.label,
                           preset_variant=args.preset_variant, dtype=args.dtype,
                           checkpoint_schedule=args.checkpoint_schedule, retention_sample=args.retention_sample,
                           snapshot_every=args.snapshot_every)
        if run_fields:
            config = config.replace(**run_fields)
        run_id, store = queue_run(config)
    except (ConfigError, UnknownMethodError, ModelLoadError) as exc:
        raise CLIError(str(exc)) from exc
    print(f"run {run_id} -> {store.path}", file=sys.stderr)
    return _execute_and_report(args, store, run_id, config.n_edits,
                               lambda bar: run_sequential(config, store, progress=bar, run_id=run_id))


def cmd_resume(args) -> int:
    from .engine import ResumeError, resume_run
    from .snapshots import SnapshotError
    store, run_id = _store_and_run(args)
    run = store.get_run(run_id)
    print(f"resuming run {run_id} ({run['method']}, {run['status']} after {run['n_edits_done']} edits) -> "
          f"{store.path}", file=sys.stderr)
    try:
        return _execute_and_report(args, store, run_id, int(run["n_edits_planned"] or 0),
                                   lambda bar: resume_run(store, run_id, progress=bar), reraise=(ResumeError,
                                                                                                 SnapshotError))
    except (ResumeError, SnapshotError) as exc:
        raise CLIError(str(exc)) from exc


def _execute_and_report(args, store, run_id: str, n_edits: int, call, reraise: tuple = ()) -> int:
    """Run ``call(progress_bar)`` (a run or a resume), print its one-line summary (and ``--json``); exit code."""
    from editors.base import ConfigError
    from editors.data import DataSourceError
    from editors.models import ModelLoadError, UnsupportedModelError
    from editors.requests import RequestError

    from .engine import run_summary

    usage_errors = (RequestError, ConfigError, ModelLoadError, UnsupportedModelError, DataSourceError)
    bar = _Progress(n_edits, enabled=not args.no_progress)
    code = EXIT_OK
    try:
        call(bar)
    except reraise:
        bar.close()
        raise
    except usage_errors as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: run {run_id} is marked interrupted; continue it from its newest snapshot with "
              f"`python -m app resume {run_id} --runs-dir {args.runs_dir}`", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        bar.close()
        if args.verbose >= 2:
            import traceback
            traceback.print_exc()
        print(f"error: run {run_id} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    finally:
        bar.close()
    summary = run_summary(store, run_id)
    if code == EXIT_OK:
        f = summary["final"]
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        spe = summary["seconds_per_edit"]
        print(f"run {run_id}: {summary['status']} after {summary['n_edits']} edits"
              f"{'' if spe is None else f' ({spe:.2f} s/edit)'}; retention reliability {fmt(f['reliability'])}, "
              f"generality {fmt(f['generality'])}, locality {fmt(f['locality'])}", file=sys.stderr)
        if summary["status"] == "diverged":
            print(f"diverged: {summary['error']}", file=sys.stderr)
    if args.json:
        out = {k: summary[k] for k in ("run_id", "status", "n_edits", "seconds_per_edit", "final")}
        if summary.get("error"):
            out["error"] = summary["error"]
        print(json.dumps(_json_safe(out)))
    return code


def _store(args, must_exist: bool = True):
    from .store import DB_NAME, RunStore
    path = args.runs_dir
    if must_exist and not (os.path.isfile(path) or os.path.isfile(os.path.join(path, DB_NAME))):
        raise CLIError(f"no run store in {path!r} (expected {os.path.join(path, DB_NAME)})")
    return RunStore(path)


def _store_and_run(args):
    """The run store of ``args.runs_dir`` and the full id of the run ``args.run_id`` names (a unique prefix will do)."""
    from .store import RunNotFoundError
    store = _store(args)
    try:
        return store, store.resolve(args.run_id)
    except RunNotFoundError as exc:
        raise CLIError(str(exc)) from exc


def cmd_list(args) -> int:
    import pandas as pd
    store = _store(args)
    df = store.list_runs(method=args.method, status=args.status)
    if getattr(args, "sweep", None):
        from .sweep_cli import SweepCLIError, sweep_run_ids
        try:
            df = df[df["run_id"].isin(sweep_run_ids(store, args.sweep))]
        except SweepCLIError as exc:
            raise CLIError(str(exc)) from exc
    if args.json:
        recs = json.loads(df.to_json(orient="records", date_format="iso"))
        print(json.dumps(recs))
        return EXIT_OK
    if df.empty:
        print("no runs")
        return EXIT_OK
    view = pd.DataFrame({
        "run_id": df["run_id"], "status": df["status"], "method": df["method"], "model": df["model"],
        "edits": [f"{d}/{p}" for d, p in zip(df["n_edits_done"].fillna(0), df["n_edits_planned"].fillna(0))],
        "created": df["created"].dt.strftime("%Y-%m-%d %H:%M"),
        "seconds": df["seconds_total"].round(1), "label": df["label"].fillna("")})
    print(view.to_string(index=False))
    return EXIT_OK


def cmd_show(args) -> int:
    from analysis.collapse import collapse_summary_text, detect_collapse

    from .engine import run_summary
    store, run_id = _store_and_run(args)
    run = store.get_run(run_id)
    summary = run_summary(store, run_id)
    frame = store.metrics_frame([run_id])
    general = frame[(frame["kind"] == "general") & frame["case_id"].isna()]
    general_final = {}
    if len(general):
        last = general[general["n_edits"] == general["n_edits"].max()]
        first = general[general["n_edits"] == general["n_edits"].min()]
        for m, v in zip(last["metric"], last["value"]):
            v0 = first.loc[first["metric"] == m, "value"]
            general_final[m] = {"before": None if v0.empty else float(v0.iloc[0]), "after": float(v)}
    collapse_text = None
    try:
        collapse_text = collapse_summary_text(detect_collapse(frame))
    except Exception as exc:  # a diagnostics failure must not hide the run
        collapse_text = f"(collapse detection failed: {type(exc).__name__}: {exc})"
    if args.json:
        print(json.dumps(_json_safe({"run": {k: v for k, v in run.items() if not k.endswith("_json")},
                                     "summary": summary, "general": general_final, "collapse": collapse_text}),
                         default=str))
        return EXIT_OK
    import datetime as dt
    created = dt.datetime.fromtimestamp(run["created"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    print(f"run       {run_id}{'  (' + run['label'] + ')' if run.get('label') else ''}")
    print(f"status    {run['status']}  ({run['n_edits_done']}/{run['n_edits_planned']} edits, "
          f"{(run['seconds_total'] or 0):.1f} s)")
    print(f"created   {created}   device {run['device']}   pid {run['pid']}")
    print(f"method    {run['method']}   model {run['model']} ({run['model_hash']})   data {run['data_source']}")
    if run.get("preset_version"):
        print(f"preset    version {run['preset_version']}")
    if run.get("error"):
        print("error     " + textwrap.indent(run["error"].rstrip(), "          ").lstrip())
    for title, cfg in (("run config", run["config"]), ("method config", run["method_config"])):
        print(f"\n{title}:")
        for key, value in (cfg or {}).items():
            print(f"  {key} = {json.dumps(value, default=str)}")
    f = summary["final"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print("\nfinal (retention, tf_token_acc, last checkpoint):")
    print(f"  reliability {fmt(f['reliability'])}   generality {fmt(f['generality'])}   "
          f"locality {fmt(f['locality'])}")
    spe = summary["seconds_per_edit"]
    if spe is not None:
        print(f"  seconds per edit {spe:.3f}")
    if general_final:
        print("general abilities (before -> after):")
        for m, v in general_final.items():
            print(f"  {m:<32} {fmt(v['before'])} -> {fmt(v['after'])}")
    print("\ncollapse:")
    print(textwrap.indent(collapse_text, "  "))
    return EXIT_OK


def cmd_export(args) -> int:
    from .store import StoreError
    store, run_id = _store_and_run(args)
    fmt = args.format
    if fmt is None:
        fmt = "parquet" if args.out and args.out.lower().endswith((".parquet", ".pq")) else "csv"
    try:
        path = store.export(run_id, fmt, args.out)
    except StoreError as exc:
        raise CLIError(str(exc)) from exc
    print(path)
    return EXIT_OK


def cmd_methods(args) -> int:
    from editors.registry import UnknownMethodError, available_methods, get_editor_class
    if args.name:
        try:
            names = [get_editor_class(args.name).name]
        except UnknownMethodError as exc:
            raise CLIError(str(exc)) from exc
    else:
        names = available_methods()
    info = []
    for name in names:
        cls = get_editor_class(name)
        info.append({"name": name, "summary": cls.summary, "config": cls.config_cls.__name__,
                     "config_version": cls.config_cls.version, "fields": cls.config_cls.field_help(),
                     "preset_variants": _preset_variants(name)})
    if args.json:
        print(json.dumps(info, default=str))
        return EXIT_OK
    if not info:
        print("no methods are installed")
    for i, m in enumerate(info):
        if i:
            print()
        print(f"{m['name']}: {m['summary']}" if m["summary"] else m["name"])
        if args.name or len(info) == 1:
            print(f"  config {m['config']} (version {m['config_version']}); set fields with --set FIELD=VALUE")
        for f in m["fields"]:
            print(f"  {f['name']} ({f['type']}, default {f['default']!r})")
            if f["help"] and (args.name or len(info) == 1):
                print(textwrap.fill(f["help"], width=100, initial_indent="      ", subsequent_indent="      "))
        if m["preset_variants"] and (args.name or len(info) == 1):
            print("  preset variants (run --preset VARIANT):")
            for variant, text in m["preset_variants"].items():
                print(f"  {variant}")
                print(textwrap.fill(text, width=100, initial_indent="      ", subsequent_indent="      "))
    if not args.name and len(info) > 1:
        from .runconfig import LONG_RUN_NOTE
        print()
        print(LONG_RUN_NOTE)
    return EXIT_OK


def _preset_variants(method: str) -> dict[str, str]:
    """``{variant: description, with the fields it sets}`` of the method's preset."""
    from editors.presets import preset_variants, variant_config
    out = {}
    for variant, text in preset_variants(method).items():
        sets = ", ".join(f"{k}={v}" for k, v in variant_config(method, variant).items()) or "nothing"
        out[variant] = f"{text} Sets: {sets}."
    return out


def cmd_cancel(args) -> int:
    if getattr(args, "sweep", None):
        from .sweep_cli import SweepCLIError, cancel_sweep
        try:
            print(cancel_sweep(_store(args), args.sweep))
        except SweepCLIError as exc:
            raise CLIError(str(exc)) from exc
        return EXIT_OK
    if not args.run_id:
        raise CLIError("cancel needs a run id (or --sweep ID)")
    store, run_id = _store_and_run(args)
    store.request_cancel(run_id)
    print(f"cancel requested for {run_id} (status {store.get_run(run_id)['status']})")
    return EXIT_OK


def cmd_delete(args) -> int:
    store, run_id = _store_and_run(args)
    store.delete_run(run_id)
    print(f"deleted {run_id}")
    return EXIT_OK


def cmd_bench(args) -> int:
    """``python -m benchmarks.bench_editors ARGS`` in a subprocess (the application does not import the benchmarks,
    which sit above it); its exit status is the command's. Relative paths in ARGS stay relative to this directory."""
    import subprocess

    from .settings import ROOT
    if not os.path.isfile(os.path.join(ROOT, "benchmarks", "bench_editors.py")):
        raise CLIError(f"benchmarks/bench_editors.py is not present in {ROOT}")
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call([sys.executable, "-m", "benchmarks.bench_editors", *args.args], env=env)


# ---- study (app/study.py) --------------------------------------------------------------------------------
def cmd_study(args) -> int:
    if args.study == "reproduce":
        return cmd_reproduce(args)
    from editors.base import ConfigError
    from editors.fields import parse_method_sets
    from editors.registry import UnknownMethodError

    from .study import DEFAULT_DATA, DEFAULT_METHODS, collapse_study, format_table, study_preset

    try:
        preset = study_preset(args.preset) if args.preset else {}
    except ConfigError as exc:
        raise CLIError(str(exc)) from exc
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
               else list(preset.get("methods", DEFAULT_METHODS)))
    n = args.n if args.n is not None else int(preset.get("n", 200))
    protocols = ([p.strip() for p in args.protocols.split(",") if p.strip()] if args.protocols
                 else preset.get("protocols"))
    data = args.data or DEFAULT_DATA
    try:
        overrides = parse_method_sets(args.sets)
    except ConfigError as exc:
        raise CLIError(str(exc)) from exc

    def progress(method: str, done: int, total: int, info: dict) -> None:
        if info.get("phase") in ("edit", "checkpoint_done", "done"):
            print(f"[{method}] {info.get('phase')} {done}/{total}", file=sys.stderr, flush=True)

    try:
        table = collapse_study(methods, n, data, args.runs_dir, eval_every=args.eval_every,
                               seed=args.seed, device=args.device, general=args.general, method_overrides=overrides,
                               protocols=protocols, run_overrides=preset.get("run"), report_only=args.report,
                               progress=progress)
    except (ConfigError, UnknownMethodError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    print(f"collapse study: {n} sequential edits per method, data {data}, store {args.runs_dir}")
    print(format_table(table))
    if args.json:
        print(table.to_json(orient="records"))
    return EXIT_OK


def cmd_reproduce(args) -> int:
    """``study reproduce --paper NAME``: app.reproduce's dispatcher; prints the markdown table (JSON with --json)."""
    from editors.base import ConfigError
    from editors.registry import UnknownMethodError

    from .reproduce import ReproduceError, format_table, make_args, papers, parse_options, reproduce

    if not args.paper:
        raise CLIError(f"study reproduce needs --paper (one of: {', '.join(papers())})")
    try:
        rargs = make_args(args.paper, model=args.model, n=args.n, seed=args.seed, device=args.device,
                          threads=args.threads, out=args.out, quick=args.quick, options=parse_options(args.options),
                          sets=args.sets)
        table = reproduce(args.paper, rargs)
    except (ReproduceError, ConfigError, UnknownMethodError) as exc:
        raise CLIError(str(exc)) from exc
    print(format_table(table, str(table["paper_name"].iloc[0]) if len(table) else args.paper))
    print(f"wrote {os.path.join(rargs.out, 'table.csv')} and table.md")
    if args.json:
        print(table.to_json(orient="records"))
    return EXIT_OK


# ---- train (app/train.py) ---------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from editors.base import ConfigError
    from editors.fields import parse_sets
    from editors.models import load_model

    from .train import train_hypernet

    try:
        overrides = parse_sets(args.sets)
    except ConfigError as exc:
        raise CLIError(str(exc)) from exc
    lm = load_model(args.model, device=args.device)
    try:
        out = train_hypernet(lm, args.method, overrides, args.data, steps=args.steps, eval_every=args.eval_every,
                             n_val=args.n_val, seed=args.seed, progress=not args.no_progress)
    except (ConfigError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    last = out["history"][-1] if out["history"] else {}
    print(f"trained {args.method} to step {out['step']} ({out['seconds']:.0f} s of training) -> {out['path']}")
    print(json.dumps(_json_safe(last)))
    return EXIT_OK


# ---- sweep, merge (app/sweep_cli.py) --------------------------------------------------------------------
def cmd_sweep(args) -> int:
    from .sweep_cli import SweepCLIError
    from .sweep_cli import cmd_sweep as run
    try:
        return run(args)
    except SweepCLIError as exc:
        raise CLIError(str(exc)) from exc


def cmd_merge(args) -> int:
    from .sweep_cli import SweepCLIError
    from .sweep_cli import cmd_merge as run
    try:
        return run(args)
    except SweepCLIError as exc:
        raise CLIError(str(exc)) from exc


# ---- export-stats (app/export_stats.py) -------------------------------------------------------------------
def cmd_export_stats(args) -> int:
    from .export_stats import ExportStatsError, run_export_stats

    try:
        run_export_stats(args)
    except ExportStatsError as exc:
        raise CLIError(str(exc)) from exc
    return EXIT_OK


COMMANDS = {"run": cmd_run, "list": cmd_list, "show": cmd_show, "export": cmd_export, "methods": cmd_methods,
            "cancel": cmd_cancel, "resume": cmd_resume, "delete": cmd_delete, "bench": cmd_bench, "study": cmd_study,
            "train": cmd_train,
            "export-stats": cmd_export_stats,
            "sweep": cmd_sweep, "merge": cmd_merge}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `bench` passes everything after it on untouched (including --help)
    if argv and argv[0] == "ui":  # Streamlit's options pass on untouched
        from .serve import main as serve
        return serve(argv[1:])
    if argv and argv[0] == "bench":
        args = argparse.Namespace(command="bench", verbose=0, args=argv[1:])
    else:
        args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        _apply_threads(args)
        return COMMANDS[args.command](args)
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


__all__ = ["main", "build_parser"]
