"""The job queue of the workbench: what the web app asks the worker process to do.

The queue is a ``jobs`` table in ``<runs_dir>/jobs.sqlite``, next to the run store's ``runs.sqlite`` (so it survives a
browser reload and a restart of the web server; nothing of it lives in Streamlit's session state). Two kinds of job:

``run``         one sequential editing run; its rows go to the run store under ``run_id`` (created ``queued`` by
                :func:`submit_run` through :func:`app.engine.queue_run`, then executed by the worker with
                :func:`app.engine.run_sequential`, the code path of ``python -m app run``).
``playground``  one edit of the teaching playground: the worker applies it to its model, measures before/after and
                undoes it; the result is JSON in ``result_json``.

Each job names a ``device`` key ("auto", "cpu", "cuda", "cuda:1"); one worker process serves one key and runs one
job at a time, so a device runs one job at a time. Cancelling a queued job cancels it at once; a running job is
asked to stop after its current step (status ``cancelled``, rows kept). A job whose worker process died is marked
``failed`` with the tail of the worker's log as its error.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

import pandas as pd

from .procs import pid_alive
from .sqlite_util import SQLiteFile, ensure_wal, where_in

JOBS_DB = "jobs.sqlite"
JOB_KINDS = ("run", "playground")
JOB_STATUSES = ("queued", "running", "finished", "failed", "cancelled")
JOB_TERMINAL = frozenset({"finished", "failed", "cancelled"})

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ({", ".join(repr(k) for k in JOB_KINDS)})),
    status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in JOB_STATUSES)})),
    device TEXT NOT NULL DEFAULT 'auto',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    heartbeat REAL,
    run_id TEXT,
    payload_json TEXT NOT NULL,
    result_json TEXT,
    error TEXT,
    worker_pid INTEGER,
    host TEXT,
    log_path TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status_device ON jobs (status, device, created);
CREATE INDEX IF NOT EXISTS jobs_run ON jobs (run_id);
"""


class JobError(RuntimeError):
    """A job could not be submitted (invalid config, bad upload); the message says why."""


@dataclass(frozen=True)
class Job:
    job_id: str
    kind: str
    status: str
    device: str
    run_id: str | None
    payload: dict
    result: dict | None
    error: str | None
    created: float
    started: float | None
    finished: float | None
    worker_pid: int | None
    cancel_requested: bool
    #: what the worker reports while it runs the job: ``{"phase", "since", "done", "total", "edits_started"}``
    progress: dict | None = None

    @property
    def done(self) -> bool:
        return self.status in JOB_TERMINAL


def new_job_id(kind: str) -> str:
    return f"{kind[:2]}-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def tail(path: str | None, n_lines: int = 30) -> str:
    """The last lines of a text file ("" when missing)."""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 16384))
        text = fh.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-n_lines:])


class JobQueue(SQLiteFile):
    """The ``jobs`` table of one runs directory. Every call opens its own short-lived connection (safe to share)."""

    def __init__(self, runs_dir: str | os.PathLike, *, timeout: float = 30.0):
        self.runs_dir = os.path.abspath(os.fspath(runs_dir))
        os.makedirs(self.runs_dir, exist_ok=True)
        self.path = os.path.join(self.runs_dir, JOBS_DB)
        self.timeout = timeout
        self.host = socket.gethostname()
        with self._read() as conn:
            ensure_wal(conn, self.path)
            conn.executescript(_SCHEMA)
            cols = {r[1] for r in conn.execute("PRAGMA table_info(jobs)").fetchall()}
            if "progress_json" not in cols:  # a queue made before the worker reported its phase
                try:
                    conn.execute("ALTER TABLE jobs ADD COLUMN progress_json TEXT")
                except sqlite3.OperationalError as exc:  # another process added it first
                    if "duplicate column" not in str(exc):
                        raise

    def __repr__(self) -> str:
        return f"JobQueue({self.path!r})"

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        return Job(job_id=row["job_id"], kind=row["kind"], status=row["status"], device=row["device"],
                   run_id=row["run_id"], payload=json.loads(row["payload_json"]),
                   result=json.loads(row["result_json"]) if row["result_json"] else None, error=row["error"],
                   created=row["created"], started=row["started"], finished=row["finished"],
                   worker_pid=row["worker_pid"], cancel_requested=bool(row["cancel_requested"]),
                   progress=json.loads(row["progress_json"]) if row["progress_json"] else None)

    # ---- producer side (the web app) ------------------------------------------------------------------------
    def submit(self, kind: str, payload: Mapping[str, Any], *, device: str = "auto", run_id: str | None = None) -> str:
        if kind not in JOB_KINDS:
            raise JobError(f"unknown job kind {kind!r}; valid: {', '.join(JOB_KINDS)}")
        job_id = new_job_id(kind)
        with self._tx() as conn:
            conn.execute("INSERT INTO jobs (job_id, kind, status, device, created, run_id, payload_json) "
                         "VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                         (job_id, kind, device_key(device), time.time(), run_id, json.dumps(dict(payload))))
        return job_id

    def get(self, job_id: str) -> Job:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id!r} in {self.path}")
        return self._job(row)

    def job_for_run(self, run_id: str) -> Job | None:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE run_id = ? ORDER BY created DESC LIMIT 1",
                               (run_id,)).fetchone()
        return None if row is None else self._job(row)

    def list_jobs(self, kind: str | None = None, status: str | tuple[str, ...] | None = None,
                  limit: int = 100) -> pd.DataFrame:
        """Jobs, newest first, without payloads and results."""
        where, args = where_in((("kind", kind), ("status", status)))
        cols = ("job_id", "kind", "status", "device", "created", "started", "finished", "run_id", "error",
                "worker_pid")
        sql = f"SELECT {', '.join(cols)} FROM jobs{where} ORDER BY created DESC LIMIT ?"
        with self._read() as conn:
            rows = conn.execute(sql, [*args, int(limit)]).fetchall()
        return pd.DataFrame([tuple(r) for r in rows], columns=list(cols))

    def cancel(self, job_id: str) -> str:
        """Cancel a queued job at once; ask a running one to stop. Returns the job's status afterwards."""
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET cancel_requested = 1, status = CASE WHEN status = 'queued' THEN "
                         "'cancelled' ELSE status END, finished = CASE WHEN status = 'queued' THEN ? ELSE finished "
                         "END WHERE job_id = ?", (time.time(), job_id))
        return self.get(job_id).status

    def delete_for_run(self, run_id: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM jobs WHERE run_id = ? AND status IN ('finished', 'failed', 'cancelled')",
                         (run_id,))

    def pending_devices(self) -> list[str]:
        """Device keys that have queued jobs."""
        with self._read() as conn:
            rows = conn.execute("SELECT DISTINCT device FROM jobs WHERE status = 'queued'").fetchall()
        return [r[0] for r in rows]

    def recover_dead(self) -> list[str]:
        """Mark ``running`` jobs whose worker process is gone (on this host) ``failed``, with the tail of the worker's
        log as the error. Returns the ids changed."""
        with self._read() as conn:
            rows = conn.execute("SELECT job_id, worker_pid, host, log_path FROM jobs WHERE status = 'running'"
                                ).fetchall()
        changed = []
        for r in rows:
            if r["host"] != self.host or r["worker_pid"] is None or pid_alive(int(r["worker_pid"])):
                continue
            log_tail = tail(r["log_path"])
            error = (f"the worker process (pid {r['worker_pid']}) died while running this job"
                     + (f"; last lines of its log {r['log_path']}:\n{log_tail}" if log_tail else ""))
            with self._tx() as c:
                cur = c.execute("UPDATE jobs SET status = 'failed', error = ?, finished = ? WHERE job_id = ? AND "
                                "status = 'running'", (error, time.time(), r["job_id"]))
                if cur.rowcount:
                    changed.append(r["job_id"])
        return changed

    # ---- consumer side (the worker) -------------------------------------------------------------------------
    def claim(self, device: str, worker_pid: int, log_path: str | None = None) -> Job | None:
        """Atomically take the oldest queued job of ``device`` (status -> running)."""
        with self._tx() as conn:
            row = conn.execute("SELECT job_id FROM jobs WHERE status = 'queued' AND device = ? ORDER BY created, "
                               "rowid LIMIT 1", (device_key(device),)).fetchone()
            if row is None:
                return None
            now = time.time()
            conn.execute("UPDATE jobs SET status = 'running', started = ?, heartbeat = ?, worker_pid = ?, host = ?, "
                         "log_path = ? WHERE job_id = ?", (now, now, worker_pid, self.host, log_path, row[0]))
        return self.get(row[0])

    def set_progress(self, job_id: str, progress: Mapping[str, Any]) -> None:
        """What the worker is doing for this job (a phase and counts; :func:`app.backend.run_progress` shows it);
        also beats the job's heartbeat."""
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET progress_json = ?, heartbeat = ? WHERE job_id = ?",
                         (json.dumps(dict(progress), default=str), time.time(), job_id))

    def heartbeat(self, job_id: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET heartbeat = ? WHERE job_id = ?", (time.time(), job_id))

    def cancel_requested(self, job_id: str) -> bool:
        with self._read() as conn:
            row = conn.execute("SELECT cancel_requested FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def finish(self, job_id: str, status: str, *, result: Any = None, error: str | None = None) -> None:
        if status not in JOB_TERMINAL:
            raise JobError(f"finish() needs a terminal status, got {status!r}")
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET status = ?, result_json = ?, error = ?, finished = ? WHERE job_id = ?",
                         (status, None if result is None else json.dumps(result, default=str), error, time.time(),
                          job_id))


def device_key(device: str | None) -> str:
    """Normalised device key of a job / worker: None, "" and "auto" -> "auto"; "cuda:0" stays as given."""
    d = (device or "auto").strip().lower()
    return d or "auto"


__all__ = ["JobQueue", "Job", "JobError", "JOB_KINDS", "JOB_STATUSES", "JOB_TERMINAL", "device_key", "tail"]
