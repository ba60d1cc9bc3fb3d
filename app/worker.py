"""The worker process: the workbench's GPU backend.

``python -m app.worker --runs-dir RUNS [--device auto]`` serves the job queue of ``RUNS`` (:mod:`app.jobs`): it owns
the model(s) on its device (CUDA when present for ``auto``), takes one job at a time, and writes everything into the
run store. The web app starts one worker per device key on demand (:func:`ensure_worker`, a fresh interpreter via
``subprocess`` -- the equivalent of the ``spawn`` start method, safe with CUDA); the web server itself never edits a
model.

* ``run`` jobs call :func:`app.engine.run_sequential` -- the code path of ``python -m app run`` -- with the worker's
  loaded model; the engine restores the model exactly at the end, so the next job starts from the unedited weights
  (checked with the weights' fingerprint; a mismatch drops the model and reloads it).
* ``playground`` jobs call :func:`app.playground.playground_edit` and store its JSON result.
* one worker per (runs dir, device key): an exclusive ``flock`` on ``worker-<device>.lock`` in the runs dir; a second
  worker for the same key exits at once.
* a job that raises is marked ``failed`` with its error; a worker that dies is noticed by the app
  (:meth:`app.jobs.JobQueue.recover_dead`), which marks its job ``failed`` with the tail of ``worker-<device>.log``.
* with ``--parent-pid`` the worker exits once that process (the web server) is gone and no job is running;
  ``--idle-exit S`` makes it exit after S idle seconds.

This module imports torch / editors only inside the worker (the web app imports :func:`ensure_worker` cheaply).
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

from .jobs import Job, JobQueue, device_key
from .procs import Heartbeat, pid_alive
from .settings import ROOT

log = logging.getLogger("app.worker")


def lock_path(runs_dir: str, device: str) -> str:
    return os.path.join(os.path.abspath(runs_dir), f"worker-{device_key(device).replace(':', '_')}.lock")


def log_path(runs_dir: str, device: str) -> str:
    return os.path.join(os.path.abspath(runs_dir), f"worker-{device_key(device).replace(':', '_')}.log")


def worker_alive(runs_dir: str, device: str = "auto") -> bool:
    """Is a worker holding the lock of (runs_dir, device)?"""
    path = lock_path(runs_dir, device)
    if not os.path.exists(path):
        return False
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def starting_path(runs_dir: str, device: str) -> str:
    """The "a worker is starting" marker of (runs_dir, device): the pid of the last worker :func:`ensure_worker`
    started, which holds for the seconds between its start and its taking the lock (importing torch)."""
    return os.path.join(os.path.abspath(runs_dir), f"worker-{device_key(device).replace(':', '_')}.starting")


def _is_worker_process(pid: int) -> bool:
    """Is ``pid`` alive and a ``app.worker`` process (a recycled pid of another program is not)?"""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"app.worker" in fh.read()
    except OSError:  # no /proc (macOS): trust the pid
        return True


def _starting_pid(runs_dir: str, device: str) -> int | None:
    """The pid of the marker when that worker still lives (a fresh marker's live pid is trusted; an older one's must
    still be an ``app.worker`` process, against recycled pids)."""
    path = starting_path(runs_dir, device)
    try:
        with open(path) as fh:
            pid = int(fh.read().split()[0])
        age = time.time() - os.path.getmtime(path)
    except (OSError, ValueError, IndexError):
        return None
    if age < 120:
        return pid if pid_alive(pid) else None
    return pid if _is_worker_process(pid) else None


def _reap(proc: subprocess.Popen) -> None:
    """Wait for a started worker in a daemon thread, so that its exit leaves no zombie in this process."""
    threading.Thread(target=proc.wait, name=f"reap-worker-{proc.pid}", daemon=True).start()


def ensure_worker(runs_dir: str, device: str = "auto", *, parent_pid: int | None = None,
                  idle_exit: float | None = None, extra_env: dict[str, str] | None = None) -> int | None:
    """Start a worker for (runs_dir, device) unless one is alive or starting. Returns the new process id, or None.

    Atomic across threads and processes: the check and the start happen under an exclusive ``flock`` of
    ``worker-<device>.starting``, and the started worker's pid is written there, so callers during the seconds it
    needs to take the worker lock see it starting and start none. The started process is reaped when it exits."""
    os.makedirs(runs_dir, exist_ok=True)
    fd = os.open(starting_path(runs_dir, device), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for the check and the Popen only (milliseconds)
        if worker_alive(runs_dir, device) or _starting_pid(runs_dir, device) is not None:
            return None
        cmd = [sys.executable, "-m", "app.worker", "--runs-dir", os.path.abspath(runs_dir), "--device",
               device_key(device)]
        if parent_pid:
            cmd += ["--parent-pid", str(parent_pid)]
        if idle_exit:
            cmd += ["--idle-exit", str(idle_exit)]
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(extra_env or {})
        logfile = open(log_path(runs_dir, device), "ab")
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=logfile,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            logfile.close()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{proc.pid}\n".encode(), 0)
        _reap(proc)
        return proc.pid
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class JobProgress:
    """The engine's progress callback in the worker: the phase, since when, edits done / planned, and when editing
    began (the ETA counts from there, not from the setup), written to the job row (:meth:`JobQueue.set_progress`)."""

    def __init__(self, queue: JobQueue, job_id: str):
        self.queue, self.job_id = queue, job_id
        self.state: dict[str, Any] = {}

    def __call__(self, done: int, total: int, info: dict) -> None:
        phase = str(info.get("phase", ""))
        now = time.time()
        if phase == "start" and "edits_started" not in self.state:
            self.state["edits_started"] = now
        phase = {"start": "edit", "checkpoint_done": "edit"}.get(phase, phase)
        if phase != self.state.get("phase"):
            self.state["since"] = now
        self.state.update(phase=phase, done=int(done), total=int(total))
        try:
            self.queue.set_progress(self.job_id, self.state)
        except Exception as exc:  # progress must never stop the work it reports on
            log.debug("progress of job %s not written: %s", self.job_id, exc)


class Worker:
    """Serves the job queue of one runs directory on one device (see the module docstring)."""

    def __init__(self, runs_dir: str, device: str = "auto", *, poll: float = 0.5, parent_pid: int | None = None,
                 idle_exit: float | None = None):
        from .store import RunStore
        self.runs_dir = os.path.abspath(runs_dir)
        self.device = device_key(device)
        self.poll = poll
        self.parent_pid = parent_pid
        self.idle_exit = idle_exit
        self.queue = JobQueue(self.runs_dir)
        self.store = RunStore(self.runs_dir)
        self.log_path = log_path(self.runs_dir, self.device)
        self._models: dict[tuple[str, str], Any] = {}  # (name, dtype) -> model
        self._playground_cache: dict[str, Any] = {}
        self._lock_fd: int | None = None

    # ---- the one-worker-per-device lock ---------------------------------------------------------------------
    def acquire(self) -> bool:
        fd = os.open(lock_path(self.runs_dir, self.device), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return True

    def release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- models ---------------------------------------------------------------------------------------------
    def model(self, name: str, dtype: str = "auto"):
        """The loaded model ``name`` in ``dtype`` on this worker's device (kept between jobs; one model at a time)."""
        key = (name, dtype)
        if key in self._models:
            return self._models[key]
        self._models.clear()  # one model per worker: free the previous one first
        from editors.models import load_model
        lm = load_model(name, device=None if self.device == "auto" else self.device, dtype=dtype)
        log.info("loaded model %s on %s", name, lm.device)
        self._models[key] = lm
        return lm

    def _check_restored(self, name: str, dtype: str = "auto") -> None:
        """Drop a cached model whose weights no longer match their fingerprint at load time."""
        lm = self._models.get((name, dtype))
        if lm is None:
            return
        from editors.models import weights_fingerprint
        if weights_fingerprint(lm.model) != lm.model_hash:
            log.warning("model %s was not restored exactly after a job; it will be reloaded", name)
            self._models.pop((name, dtype), None)

    # ---- jobs -----------------------------------------------------------------------------------------------
    def handle(self, job: Job) -> None:
        beat = Heartbeat(lambda: self.queue.heartbeat(job.job_id), 5.0, name=f"job-heartbeat-{job.job_id}")
        with beat:
            try:
                if job.kind == "run":
                    self._run_job(job)
                elif job.kind == "playground":
                    self._playground_job(job)
                else:  # pragma: no cover - the table's CHECK forbids it
                    self.queue.finish(job.job_id, "failed", error=f"unknown job kind {job.kind!r}")
            except Exception as exc:
                log.exception("job %s failed", job.job_id)
                self.queue.finish(job.job_id, "failed",
                                  error=f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")

    def _run_job(self, job: Job) -> None:
        from .engine import run_sequential
        from .runconfig import RunConfig
        from .store import TERMINAL
        report = JobProgress(self.queue, job.job_id)
        try:
            config = RunConfig.from_dict(job.payload["config"])
            if (config.model, config.dtype) not in self._models:
                report(0, config.n_edits, {"phase": "load_model"})
            lm = self.model(config.model, config.dtype)
            try:
                run_sequential(config, self.store, lm=lm, run_id=job.run_id, progress=report,
                               should_cancel=lambda: self.queue.cancel_requested(job.job_id))
            finally:
                self._check_restored(config.model, config.dtype)
        except Exception as exc:
            # errors before the engine took the run over (bad config, model load) leave it queued: close it
            if job.run_id and self.store.get_run(job.run_id)["status"] not in TERMINAL:
                self.store.update_status(job.run_id, "failed", error=f"{type(exc).__name__}: {exc}")
            raise
        run = self.store.get_run(job.run_id)
        status = {"finished": "finished", "diverged": "finished", "cancelled": "cancelled"}.get(run["status"], "failed")
        self.queue.finish(job.job_id, status, result={"run_id": job.run_id, "run_status": run["status"]},
                          error=run.get("error") if status == "failed" else None)

    def _playground_job(self, job: Job) -> None:
        from .playground import playground_edit
        name = str(job.payload.get("model", "default"))
        lm = self.model(name)
        try:
            result = playground_edit(lm, job.payload, self._playground_cache,
                                     heartbeat=lambda: self.queue.heartbeat(job.job_id))
        finally:
            self._check_restored(name)
        self.queue.finish(job.job_id, "finished", result=result)

    # ---- the loop -------------------------------------------------------------------------------------------
    def _parent_gone(self) -> bool:
        return bool(self.parent_pid) and not pid_alive(int(self.parent_pid))

    def serve(self, *, max_jobs: int | None = None) -> int:
        """Serve jobs until the parent is gone, the idle limit passes or ``max_jobs`` were done. Returns the count."""
        if not self.acquire():
            log.info("another worker serves %s on %s; exiting", self.runs_dir, self.device)
            return 0
        done = 0
        idle_since = time.time()
        log.info("worker %d serving %s (device %s)", os.getpid(), self.runs_dir, self.device)
        try:
            while True:
                job = self.queue.claim(self.device, os.getpid(), self.log_path)
                if job is not None:
                    log.info("job %s (%s) started", job.job_id, job.kind)
                    self.handle(job)
                    log.info("job %s done: %s", job.job_id, self.queue.get(job.job_id).status)
                    done += 1
                    idle_since = time.time()
                    if max_jobs is not None and done >= max_jobs:
                        break
                    continue
                if self._parent_gone():
                    log.info("parent process %s is gone; exiting", self.parent_pid)
                    break
                if self.idle_exit is not None and time.time() - idle_since > self.idle_exit:
                    log.info("idle for %.0f s; exiting", self.idle_exit)
                    break
                time.sleep(self.poll)
        finally:
            self.release()
        return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.worker", description="Serve the workbench's job queue.")
    p.add_argument("--runs-dir", default=os.environ.get("EDITBENCH_RUNS", "runs"))
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N | mps")
    p.add_argument("--parent-pid", type=int, default=None, help="exit once this process is gone (when idle)")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    p.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between looks at the queue")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s")
    try:
        import torch
        torch.set_num_threads(max(1, min(int(os.environ.get("EDITBENCH_THREADS", "2")), os.cpu_count() or 1)))
    except ImportError:  # pragma: no cover - a requirement
        pass
    worker = Worker(args.runs_dir, args.device, poll=args.poll, parent_pid=args.parent_pid, idle_exit=args.idle_exit)
    worker.serve(max_jobs=args.max_jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["Worker", "ensure_worker", "worker_alive", "main", "lock_path", "log_path", "starting_path"]
