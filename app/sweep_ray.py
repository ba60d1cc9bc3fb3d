"""The Ray executor of sweeps (:mod:`app.sweep`): each trial is a Ray task; ONE process writes the run store.

Where the rows go. A run store is one SQLite file in WAL mode, which needs shared memory between its writers: trials
on other machines cannot write it over a network filesystem. So the store has ONE writer, the
:class:`StoreWriter` actor, and every trial (a Ray task, wherever Ray places it) streams its writes to it:

* the trial's run engine writes to a :class:`TeeStore`, an ordinary :class:`~app.store.RunStore` on a shard file in
  a temporary directory of the trial's node (so the engine's own reads -- the run's status, the rows the collapse
  detection reads -- are local and exactly those of ``python -m app run``), which also sends every write call
  (create / update a run, the one transaction per step, heartbeats, ...) to the writer, fire-and-forget. Ray
  executes the calls of one caller in the order they were made, so the writer's file receives the same
  transactions as the shard, each committed when it arrives; the shard is deleted when the trial ends.
* Why fire-and-forget: a task that waits on a Ray object (``ray.get``, even ``ray.wait(timeout=0)``) lends its CPUs
  back to Ray, which then starts another trial on them -- more trials than cores. So trials never wait on Ray; only
  the driver does (it queues the runs, reads progress, handles failures through :class:`RemoteStore`).
* A trial whose worker dies keeps every write that left its process (all steps but, at worst, the one in flight).
  When Ray retries the task (``max_retries``), the retry's first call (:meth:`StoreWriter.begin_attempt`) finds the
  run ``running``: the dead attempt is moved to a new run id, ``failed`` with its rows, and the trial starts over
  under its queued id (:meth:`app.sweep.SweepStore.split_attempt`).

Where the writer runs. Driver on a cluster node (a local instance, ``--address auto``, ``RAY_ADDRESS`` of a cluster
this machine is part of, a job submitted to the cluster): the actor is pinned to the driver's node
(``NodeAffinitySchedulingStrategy``) and writes the driver's ``runs_dir`` directly. Driver outside the cluster (Ray
Client, ``--address ray://HOST:PORT``): the actor cannot reach this machine's disk; it writes a store shard on its
own node (a temporary directory there) and when the sweep ends (finished, failed or cancelled) the driver fetches
the shard's bytes through Ray and merges it into ``runs_dir`` (:func:`app.merge.merge_stores`: by run id,
lossless, idempotent). If the driver dies first, the shard stays on that node (its path is logged) and
``python -m app merge`` imports it later.

What runs on the nodes. A driver that connects to a cluster (``--address``) sends this checkout's ``editors``,
``analysis`` and ``app`` packages with the job (Ray ``runtime_env`` ``py_modules``, :func:`code_runtime_env`), so the
trials run the driver's code; ``ship_code=False`` (``--no-ship-code``) leaves the nodes' installed copy in charge.

Ray's own machinery is used for the rest: resources (``num_cpus`` / ``num_gpus`` per task; Ray sets
``CUDA_VISIBLE_DEVICES``), retries of a task whose worker process died (``max_retries``), and cancellation
(``ray.cancel``: queued tasks never start; a running one gets a ``KeyboardInterrupt`` and its run ends
``cancelled`` with its rows; one that does not stop within ``grace_seconds`` is killed with ``force=True`` and
marked by the driver).

``ray`` is imported here only, when a Ray sweep starts (``pip install 'editbench[ray]'``); nothing else in the
workbench needs it.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Callable

from .store import TERMINAL, RunStore
from .sweep_core import SweepSpec, SweepStore, cancel_left, execute_trial, queue_trials, sweep_progress

log = logging.getLogger(__name__)


class RayUnavailableError(RuntimeError):
    """Ray is not installed or cannot start / connect; the message says how to get it."""


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError("the ray executor needs Ray: pip install 'ray==2.60.0' (or the project's extra: "
                                  "pip install -e '.[ray]'); --executor local runs without it") from exc
    return ray


def _plain(obj: Any) -> Any:
    """Tensors (possibly on a GPU) as CPU numpy arrays, recursively, so that the writer needs no GPU."""
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


class StoreWriter:
    """The one writer of a sweep's run store (a Ray actor, one call at a time): a :class:`RunStore` and its
    :class:`SweepStore` on the file ``path``; ``call(target, method, args, kwargs)`` runs one of their methods."""

    def __init__(self, path: str | None):
        if path is None:  # a shard on this node (the driver is not on the cluster)
            path = os.path.join(tempfile.mkdtemp(prefix="editbench-sweep-"), "runs.sqlite")
        self.store = RunStore(path, recover=False)
        self.sweeps = SweepStore(self.store)
        self.calls = 0
        self.failed_calls = 0

    def path(self) -> str:
        return self.store.path

    def call(self, target: str, method: str, args: tuple, kwargs: dict) -> Any:
        self.calls += 1
        obj = self.sweeps if target == "sweeps" else self.store
        try:
            return getattr(obj, method)(*args, **kwargs)
        except Exception:
            self.failed_calls += 1  # nobody waits on a trial's calls: log what went wrong
            log.exception("store call %s.%s failed", target, method)
            raise

    def begin_attempt(self, sweep_id: str, trial_key: str, run_id: str, host: str, pid: int) -> str | None:
        """A trial attempt starts on ``run_id``: if the run is already running, an earlier attempt died; keep it
        as its own ``failed`` run (:meth:`SweepStore.split_attempt`). Returns the dead attempt's id or None."""
        self.calls += 1
        run = self.store.get_run(run_id)
        return self.sweeps.split_attempt(
            sweep_id, trial_key, run_id, f"the trial's worker (host {run['host']}, pid {run['pid']}) died mid-run; "
            f"Ray ran the trial again (host {host}, pid {pid}) as run {run_id}")

    def dump(self) -> bytes:
        """The shard for the driver to merge: an uncompressed tar of the store file (after a WAL checkpoint) and
        the artifact files beside it (``artifacts/<run_id>/``: the ones over :attr:`RunStore.blob_limit`)."""
        import io
        import sqlite3
        import tarfile
        conn = sqlite3.connect(self.store.path)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        root = os.path.dirname(self.store.path)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(self.store.path, arcname="runs.sqlite")
            if os.path.isdir(os.path.join(root, "artifacts")):
                tar.add(os.path.join(root, "artifacts"), arcname="artifacts")
        return buf.getvalue()

    def stats(self) -> dict:
        return {"calls": self.calls, "failed_calls": self.failed_calls, "path": self.store.path}


class RemoteStore:
    """For the DRIVER: a :class:`RunStore` (``target="runs"``) or :class:`SweepStore` (``"sweeps"``) whose methods run
    in the :class:`StoreWriter` actor and are waited for; errors come back as the store's own exception types."""

    def __init__(self, writer, target: str = "runs", path: str | None = None):
        self._writer, self._target = writer, target
        self.path = path

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            import ray
            return ray.get(self._writer.call.remote(self._target, name, _plain(args), _plain(kwargs)))
        call.__name__ = name
        return call


#: the RunStore methods that write (a TeeStore sends these to the writer too)
WRITE_METHODS = ("create_run", "update_run", "update_status", "heartbeat", "request_cancel", "add_edit_rows",
                 "add_metric_rows", "add_artifact", "write_step", "delete_run")


class TeeStore(RunStore):
    """For a TRIAL: a run store on a local shard file whose write calls are also sent to the writer actor
    (fire-and-forget, in call order; module docstring). Counts the calls sent and the seconds spent sending them
    (``calls``, ``seconds``: the data-transfer overhead of the trial)."""

    def __init__(self, path_or_dir, writer):
        super().__init__(path_or_dir, recover=False)
        self._writer = writer
        self._depth = 0
        self.calls, self.seconds = 0, 0.0

    def _send(self, method: str, args: tuple, kwargs: dict) -> None:
        t0 = time.perf_counter()
        self._writer.call.remote("runs", method, _plain(args), _plain(kwargs))
        self.calls += 1
        self.seconds += time.perf_counter() - t0


def _tee(name: str):
    base = getattr(RunStore, name)

    def method(self, *args, **kwargs):
        self._depth += 1  # a write method that calls another (update_status -> update_run) is sent once
        try:
            out = base(self, *args, **kwargs)
        finally:
            self._depth -= 1
        if self._depth == 0:
            self._send(name, args, kwargs)
        return out
    method.__name__ = name
    method.__doc__ = base.__doc__
    return method


for _name in WRITE_METHODS:
    setattr(TeeStore, _name, _tee(_name))


def _ray_trial(writer, run_row: dict, config: dict, sweep_id: str, trial_key: str, threads: int,
               device: str | None) -> dict:
    """The Ray task of one trial: a local shard holding a copy of the queued run, teed to the writer, and
    :func:`app.sweep.execute_trial` on it. Never waits on Ray (module docstring)."""
    import shutil
    import socket
    t0 = time.time()
    run_id = run_row["run_id"]
    writer.begin_attempt.remote(sweep_id, trial_key, run_id, socket.gethostname(), os.getpid())
    tmp = tempfile.mkdtemp(prefix="editbench-trial-")
    try:
        shard = RunStore(tmp, recover=False)
        fields = {k: run_row[k] for k in ("label", "method", "model", "data_source", "config", "method_config",
                                          "preset_version", "package_versions", "n_edits_planned", "device")}
        shard.create_run(run_id=run_id, status="queued", **fields)
        store = TeeStore(tmp, writer)
        out = execute_trial(config, run_id, store, None, sweep_id=sweep_id, trial_key=trial_key, threads=threads,
                            device=device)
        import ray

        import app
        out.update(t_task=t0, store_calls=store.calls, store_seconds=store.seconds,
                   code=os.path.dirname(os.path.abspath(app.__file__)),  # where this worker imported the library
                   node=ray.get_runtime_context().get_node_id(),  # local calls: no wait on Ray
                   gpu_ids=[str(g) for g in ray.get_gpu_ids()])  # the GPUs Ray gave this trial (CUDA_VISIBLE_DEVICES)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


LIBRARY_PACKAGES = ("editors", "analysis", "app")  # what a trial imports (pages / benchmarks never run there)


def code_runtime_env() -> dict[str, Any]:
    """Ray ``runtime_env`` that ships this checkout's library packages to the cluster (Ray uploads them once per
    job and puts them first on the workers' ``sys.path``), so every trial runs the driver's code, whatever is (or
    is not) installed on the nodes. The nodes still need the third-party dependencies (requirements.txt)."""
    import importlib
    return {"py_modules": [os.path.dirname(importlib.import_module(p).__file__) for p in LIBRARY_PACKAGES],
            "excludes": ["__pycache__", "*.pyc"]}


def init_ray(address: str | None = None, num_cpus: int | None = None, *, ship_code: bool = True
             ) -> tuple[Any, bool, float]:
    """Ray, initialised: the running instance of this process, the cluster at ``address`` / ``$RAY_ADDRESS``, or a
    new local one with ``num_cpus``. Connecting to a cluster ships the library's code with it
    (:func:`code_runtime_env`) unless ``ship_code`` is False (the nodes then import their installed copy).
    Returns (ray, started_here, seconds)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False, 0.0
    t0 = time.time()
    address = address or os.environ.get("RAY_ADDRESS") or None
    kw: dict[str, Any] = {"address": address, "include_dashboard": False, "log_to_driver":
                          logging.getLogger().isEnabledFor(logging.INFO)}
    if address is None:
        kw["num_cpus"] = num_cpus or os.cpu_count() or 1
    elif ship_code:
        kw["runtime_env"] = code_runtime_env()
    try:
        ray.init(**kw)
    except Exception as exc:  # ConnectionError, RuntimeError, ...
        hint = ""
        if "uthentication" in str(exc):
            hint = " (Ray 2.60's `ray start` enables token authentication: set RAY_AUTH_MODE=token for the driver)"
        raise RayUnavailableError(f"could not {'connect to Ray at ' + address if address else 'start Ray'}: "
                                  f"{type(exc).__name__}: {exc}{hint}") from exc
    return ray, True, time.time() - t0


def _client_mode(ray) -> bool:
    try:
        return bool(ray.util.client.ray.is_connected())
    except Exception:  # pragma: no cover - older / newer layouts
        return False


def run_ray(spec: SweepSpec, runs_dir: str, *, address: str | None = None, cpus_per_trial: float = 1,
            gpus_per_trial: float = 0, max_retries: int = 1, num_cpus: int | None = None, progress=None,
            should_cancel=None, poll_seconds: float = 1.0, grace_seconds: float = 30.0, ship_code: bool = True
            ) -> tuple[list[str], list[str], dict]:
    """Run the trials of ``spec`` not yet done as Ray tasks (see the module docstring); returns (run ids started,
    trial keys skipped, timing info: ``ray_init_seconds`` and each task's ``results``)."""
    ray, started_here, init_seconds = init_ray(address, num_cpus, ship_code=ship_code)
    client = _client_mode(ray)
    local = RunStore(runs_dir)
    opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1}
    if not client:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                     soft=False)
    writer = ray.remote(StoreWriter).options(**opts).remote(None if client else local.path)
    path = ray.get(writer.path.remote())
    if client:
        log.warning("Ray Client: the sweep's rows go to a store shard on the cluster (%s); they are merged into %s "
                    "when the sweep ends (or later: python -m app merge)", path, local.path)
    store, sweeps = RemoteStore(writer, "runs", path), RemoteStore(writer, "sweeps", path)
    info: dict[str, Any] = {"executor": "ray", "ray_init_seconds": init_seconds, "client": client, "results": [],
                            "store_path": path}
    run_ids: list[str] = []
    try:
        todo, skipped = queue_trials(spec, store, sweeps, "ray")
        run_ids = [r for _, r in todo]
        task = ray.remote(_ray_trial).options(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial,
                                              max_retries=max_retries, retry_exceptions=False)
        threads = max(1, int(cpus_per_trial))
        device = "cuda" if gpus_per_trial > 0 else "cpu"
        refs = {}
        for t, run_id in todo:
            row = store.get_run(run_id)
            refs[task.remote(writer, row, t.config.to_dict(), spec.sweep_id, t.key, threads, device)] = (
                t, run_id, time.time())
        _wait(ray, refs, store, sweeps, spec, info, progress, should_cancel, poll_seconds, grace_seconds)
    finally:
        try:
            if client:
                _merge_shard(ray, writer, local)
            info["writer"] = ray.get(writer.stats.remote())
            if info["writer"]["failed_calls"]:
                log.warning("%d store write(s) of this sweep failed in the writer (see the Ray logs of the "
                            "StoreWriter actor); the runs concerned may miss rows", info["writer"]["failed_calls"])
        finally:
            try:
                ray.kill(writer)
            except Exception as exc:  # the session is already gone
                log.debug("ray.kill(writer): %s", exc)
            if started_here:
                ray.shutdown()
    return run_ids, skipped, info


def _wait(ray, refs: dict, store, sweeps, spec: SweepSpec, info: dict, progress, should_cancel, poll_seconds: float,
          grace_seconds: float) -> None:
    from ray.exceptions import GetTimeoutError, TaskCancelledError
    pending = list(refs)
    cancel_at = None
    last_report = 0.0
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_seconds)
            for ref in ready:
                trial, run_id, submitted = refs[ref]
                try:
                    res = ray.get(ref)
                    res["t_submit"] = submitted
                    res["t_done"] = time.time()
                    info["results"].append(res)
                except TaskCancelledError:
                    pass
                except Exception as exc:  # the worker died max_retries + 1 times, or the task could not run
                    _fail_latest(store, sweeps, spec.sweep_id, trial.key,
                                 f"the trial's Ray task failed: {type(exc).__name__}: {str(exc)[:2000]}")
            wanted = bool(should_cancel and should_cancel()) or sweeps.cancel_requested(spec.sweep_id)
            if wanted and cancel_at is None:
                cancel_at = time.time()
                _cancel(ray, pending, refs, store, sweeps, spec.sweep_id, force=False)
            elif cancel_at is not None and pending and time.time() - cancel_at > grace_seconds:
                _cancel(ray, pending, refs, store, sweeps, spec.sweep_id, force=True)
                try:
                    ray.get(pending, timeout=10)
                except (GetTimeoutError, Exception):  # noqa: B014 - cancelled tasks raise on get
                    pass
                pending = []
            if progress and (ready or time.time() - last_report >= poll_seconds):
                last_report = time.time()
                progress(sweep_progress(sweeps, spec.sweep_id))
    except KeyboardInterrupt:
        _cancel(ray, pending, refs, store, sweeps, spec.sweep_id, force=False)
        try:
            ray.wait(pending, num_returns=len(pending), timeout=min(grace_seconds, 10))
        finally:
            _cancel(ray, pending, refs, store, sweeps, spec.sweep_id, force=True)
        raise
    finally:
        if cancel_at is not None:
            cancel_left(store, [r for _, r, _ in refs.values()], f"cancelled with sweep {spec.sweep_id}")
        if progress:
            progress(sweep_progress(sweeps, spec.sweep_id))


def _cancel(ray, pending, refs, store, sweeps, sweep_id: str, *, force: bool) -> None:
    """Ask every pending trial to stop: its runs' cancel flag (the engine stops after its step) and ``ray.cancel``
    (a queued task never starts; a running one gets KeyboardInterrupt, or is killed with ``force``)."""
    for ref in pending:
        trial, run_id, _ = refs[ref]
        for rid in _trial_runs(sweeps, sweep_id, trial.key):
            try:
                store.request_cancel(rid)
            except Exception as exc:  # the run row is what matters; keep cancelling the others
                log.warning("could not flag run %s: %s", rid, exc)
        try:
            ray.cancel(ref, force=force)
        except Exception as exc:
            log.debug("ray.cancel(%s): %s", ref, exc)
        if force:
            cancel_left(store, _trial_runs(sweeps, sweep_id, trial.key), f"cancelled with sweep {sweep_id} (killed)")


def _trial_runs(sweeps, sweep_id: str, trial_key: str) -> list[str]:
    df = sweeps.trials(sweep_id)
    return [r for r in df.loc[df["trial_key"] == trial_key, "run_id"] if isinstance(r, str)]


def _fail_latest(store, sweeps, sweep_id: str, trial_key: str, error: str) -> None:
    for run_id in _trial_runs(sweeps, sweep_id, trial_key):
        if store.get_run(run_id)["status"] not in TERMINAL:
            store.update_status(run_id, "failed", error=error)


def merge_shard(blob: bytes, local: RunStore):
    """Merge a writer's shard (:meth:`StoreWriter.dump`: the store file and its artifact files) into ``local``
    (:func:`app.merge.merge_stores`); returns the merge report."""
    import io
    import tarfile

    from .merge import merge_stores
    with tempfile.TemporaryDirectory(prefix="editbench-shard-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: plain files under tmp only
                tar.extractall(tmp, filter="data")
            else:  # older 3.11: the shard is ours, but still refuse anything outside tmp
                bad = [m.name for m in tar.getmembers() if m.name.startswith("/") or ".." in m.name.split("/")
                       or not (m.isfile() or m.isdir())]
                if bad:
                    raise ValueError(f"store shard holds unexpected entries: {bad[:3]}")
                tar.extractall(tmp)
        return merge_stores(local, [os.path.join(tmp, "runs.sqlite")])


def _merge_shard(ray, writer, local: RunStore) -> None:
    report = merge_shard(ray.get(writer.dump.remote()), local)
    log.info("merged the cluster's shard: %s", report)


__all__ = ["run_ray", "init_ray", "import_ray", "code_runtime_env", "merge_shard", "StoreWriter", "RemoteStore",
           "RayUnavailableError", "LIBRARY_PACKAGES"]
