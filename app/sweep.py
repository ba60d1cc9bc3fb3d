"""Sweeps: a grid of sequential runs (models x methods x method-config points x seeds) into ONE run store.

``python -m app sweep SPEC.yaml`` and :func:`run_sweep` (the same from Python). A spec (YAML / JSON / a mapping)::

    name: memit-mom2              # the sweep id (default: "sweep-" + a digest of the spec)
    model: default                # or models: [default, /path/to/model]
    methods: [memit, alphaedit]   # or method: memit
    data: counterfact:../shared/data/counterfact/counterfact-edit.json
    n_edits: 200
    batch_size: 1
    eval_every: 20                # checkpoints (RunConfig.eval_every; or checkpoint_schedule: geometric | 1,10,100)
    seeds: [0, 1, 2]              # or seeds: 3 (= 0, 1, 2)
    run: {general: none}          # any other RunConfig field, the same for every trial
    overrides: {v_num_grad_steps: 10}          # method fields for every trial (METHOD.FIELD: one method only)
    grid:                         # the cartesian product of these lists ...
      memit.mom2_update_weight: [5000, 15000]
      run.batch_size: [1, 10]     # run.FIELD sweeps a run field
    points:                       # ... times each of these explicit points (optional)
      - {alphaedit.nullspace_threshold: 0.02}

A key ``METHOD.FIELD`` applies to that method's trials only (a grid key of one method does not multiply the other
methods' trials), a bare ``FIELD`` to every method, ``run.FIELD`` to the run config. Every trial is expanded and
validated (:meth:`RunConfig.validate`: unknown method / field with "did you mean", bad values; the data source is
read once) before anything is written or started.

Each trial is ONE ordinary sequential run, made by the same code as ``python -m app run``
(:func:`app.engine.queue_run` then :func:`app.engine.run_sequential`), labelled ``sweep <id> · <point> · seed <s>``
and recorded in the sweep tables of the run store (:class:`SweepStore`: ``sweeps``, ``sweep_trials``,
``sweep_runs``). Running a sweep again skips the trials whose latest run finished or diverged and runs the others
(failed, cancelled, interrupted, never started) as new runs; earlier attempts stay in the store.

Executors: ``local`` (this machine: one trial after another in this process, the model loaded once per model; or
``workers`` processes) and ``ray`` (:mod:`app.sweep_ray`: Ray tasks with Ray's resources, retries and cancellation;
a local Ray instance, or a cluster by address). Where the rows go with Ray: :mod:`app.sweep_ray`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

from editors.fields import did_you_mean

from .store import TERMINAL, RunStore
from .sweep_core import (  # noqa: F401 - the public names of sweeps live here
    DONE,
    EXECUTORS,
    SPEC_KEYS,
    SUMMARY_METRICS,
    SWEEP_TABLES,
    UNEDITED_KIND,
    SweepResult,
    SweepSpec,
    SweepSpecError,
    SweepStore,
    Trial,
    cancel_left,
    execute_trial,
    format_summary,
    load_spec,
    plan,
    point_text,
    progress_text,
    queue_trials,
    run_quantities,
    sweep_progress,
    sweep_summary,
    sweep_tables_exist,
    trial_label,
    unedited_rows,
)


def run_sweep(spec: str | os.PathLike | Mapping[str, Any] | SweepSpec, runs_dir: str = "runs", *,
              executor: str = "ray", workers: int = 1, address: str | None = None, cpus_per_trial: float = 1,
              gpus_per_trial: float = 0, max_retries: int = 1, num_cpus: int | None = None,
              progress: Callable[[dict], None] | None = None, should_cancel: Callable[[], bool] | None = None,
              poll_seconds: float = 1.0, ship_code: bool = True) -> SweepResult:
    """Run a sweep into the run store of ``runs_dir`` and return its trials' state.

    Args:
        spec: a spec path / mapping (:func:`load_spec`) or an already loaded :class:`SweepSpec`.
        executor: "ray" (:func:`app.sweep_ray.run_ray`) or "local" (this machine; ``workers`` processes, 1 = one
            trial after another in this process).
        address: the Ray cluster (``ray://HOST:PORT``, ``auto``); None = ``$RAY_ADDRESS``, else a local instance
            with ``num_cpus`` CPUs (default: all). An instance already initialised in this process is used as is.
        cpus_per_trial / gpus_per_trial: Ray resources of each trial (torch threads = max(1, int(cpus)); a trial
            with a GPU and no ``run.device`` runs on "cuda", without one on "cpu").
        max_retries: Ray's retries of a trial whose worker process died (the dead attempt's run stays, ``failed``).
        ship_code: with an ``address``, send this checkout's library packages to the cluster with the job (Ray's
            ``runtime_env`` ``py_modules``), so the trials run the driver's code; False: the nodes' installed copy.
        progress: ``callback(sweep_progress dict)`` every ``poll_seconds`` and when a trial ends.
        should_cancel: polled every ``poll_seconds``; True cancels the sweep (also: :meth:`SweepStore.request_cancel`
            from another process, ``python -m app cancel --sweep ID``, or Ctrl-C): queued trials are dropped, running
            ones stop (``cancelled``, rows kept).

    Trials whose latest run finished or diverged are skipped. Raises :class:`SweepSpecError` before anything runs.
    """
    if executor not in EXECUTORS:
        raise SweepSpecError(f"unknown executor {executor!r}{did_you_mean(executor, EXECUTORS)}; valid: "
                             f"{', '.join(EXECUTORS)}")
    if cpus_per_trial <= 0 or gpus_per_trial < 0 or max_retries < 0 or workers < 1:
        raise SweepSpecError(f"cpus_per_trial must be > 0, gpus_per_trial and max_retries >= 0, workers >= 1; got "
                             f"{cpus_per_trial}, {gpus_per_trial}, {max_retries}, {workers}")
    spec = spec if isinstance(spec, SweepSpec) else load_spec(spec, runs_dir)
    t0 = time.time()
    if executor == "ray":
        from .sweep_ray import run_ray
        started, skipped, info = run_ray(spec, runs_dir, address=address, cpus_per_trial=cpus_per_trial,
                                         gpus_per_trial=gpus_per_trial, max_retries=max_retries, num_cpus=num_cpus,
                                         progress=progress, should_cancel=should_cancel, poll_seconds=poll_seconds,
                                         ship_code=ship_code)
    else:
        started, skipped, info = _run_local(spec, runs_dir, workers=workers, threads=max(1, int(cpus_per_trial))
                                            if workers > 1 else None, progress=progress,
                                            should_cancel=should_cancel, poll_seconds=poll_seconds)
    store = RunStore(runs_dir)
    return SweepResult(spec.sweep_id, SweepStore(store).trials(spec.sweep_id), started, skipped, time.time() - t0,
                       info)


def _run_local(spec: SweepSpec, runs_dir: str, *, workers: int, threads: int | None, progress, should_cancel,
               poll_seconds: float) -> tuple[list[str], list[str], dict]:
    store = RunStore(runs_dir)
    sweeps = SweepStore(store)
    todo, skipped = queue_trials(spec, store, sweeps, "local")
    run_ids = [r for _, r in todo]
    cancelled = lambda: bool(should_cancel and should_cancel()) or sweeps.cancel_requested(spec.sweep_id)  # noqa
    report = (lambda: progress(sweep_progress(sweeps, spec.sweep_id))) if progress else (lambda: None)
    report()
    try:
        if workers == 1:
            models: dict[str, Any] = {}
            for trial, run_id in todo:
                if cancelled():
                    break
                from editors.models import load_model
                name = trial.config.model
                if name not in models:
                    models.clear()  # one model in memory at a time
                    models[name] = load_model(name, device=trial.config.device)
                last = [0.0]

                def tick(done, total, info, _last=last):
                    if time.time() - _last[0] >= poll_seconds:
                        _last[0] = time.time()
                        report()
                execute_trial(trial.config, run_id, store, sweeps, sweep_id=spec.sweep_id, trial_key=trial.key,
                              lm=models[name], should_cancel=cancelled, progress=tick)
                report()
        else:
            _run_pool(spec, todo, runs_dir, workers, threads, cancelled, report, poll_seconds)
    except KeyboardInterrupt:
        cancel_left(store, run_ids, f"cancelled with sweep {spec.sweep_id} (interrupted)")
        raise
    finally:
        if cancelled():
            cancel_left(store, run_ids, f"cancelled with sweep {spec.sweep_id}")
        report()
    return run_ids, skipped, {"executor": "local", "workers": workers}


def _pool_trial(config: dict, run_id: str, runs_dir: str, sweep_id: str, trial_key: str, threads: int | None
                ) -> dict:
    store = RunStore(runs_dir, recover=False)
    sweeps = SweepStore(store)
    return execute_trial(config, run_id, store, sweeps, sweep_id=sweep_id, trial_key=trial_key, threads=threads,
                         should_cancel=lambda: sweeps.cancel_requested(sweep_id))


def _run_pool(spec, todo, runs_dir, workers, threads, cancelled, report, poll_seconds) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp
    store = RunStore(runs_dir)
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_pool_trial, t.config.to_dict(), r, runs_dir, spec.sweep_id, t.key, threads): r
                   for t, r in todo}
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=poll_seconds)
            for f in done:
                try:
                    f.result()
                except cf.CancelledError:
                    pass
                except Exception as exc:  # the worker process died (BrokenProcessPool) or the trial could not start
                    run = store.get_run(futures[f])
                    if run["status"] not in TERMINAL:
                        store.update_status(futures[f], "failed", error=f"worker process: {type(exc).__name__}: "
                                                                         f"{exc}")
            if cancelled():
                for f in pending:
                    f.cancel()
            report()


__all__ = ["DONE", "EXECUTORS", "SPEC_KEYS", "UNEDITED_KIND", "SweepSpecError", "Trial", "SweepSpec", "point_text",
           "load_spec", "trial_label", "SWEEP_TABLES", "SweepStore", "sweep_tables_exist", "sweep_progress",
           "progress_text", "SUMMARY_METRICS", "run_quantities", "sweep_summary", "format_summary", "unedited_rows",
           "execute_trial", "SweepResult", "plan", "queue_trials", "cancel_left", "run_sweep"]
