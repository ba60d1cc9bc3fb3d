"""The run store: one SQLite file (``runs.sqlite``) per runs directory, written by one run engine at a time and
read by the web app, the CLI and notebooks at the same time.

Tables (long form, so that every plot is a filter plus a pivot):

``runs``       one row per sequential run: status, the full :class:`app.runconfig.RunConfig` (``config_json``), the
               method config it ran with, versions, progress (``n_edits_done``), the writer's ``pid`` / ``host`` and
               its ``heartbeat``.
``edits``      one row per edit request: its index ``idx`` in the run, the step that made it, ``n_edits`` after
               that step, the request itself, its step's wall seconds divided by the batch size, the peak memory
               (CUDA: of the step; CPU: the process's peak RSS so far) and, on the step's first row, the step's
               ``EditResult.info``.
``metrics``    ``(run_id, n_edits, step, kind, layer, param, metric, protocol, value, case_id)``; ``n_edits`` is
               the number of edits made when the row was measured (the x axis of every curve). ``kind``:
               pre (unedited model, n_edits 0) | edit (immediate, the step's own edits) | retention (every edit so
               far) | locality (fixed probe set vs the unedited model) | general (``<task>/<metric>``,
               ``<task>/chance``) | weights (per edited matrix) | update_angle | hidden_shift | timing | info (the
               editor's numeric ``EditResult.info``) | collapse (``analysis.collapse``) | weights_unedited (a sweep
               trial's edited matrices before any edit, n_edits 0: ``app.sweep_core``). Rows with ``case_id`` NULL
               are aggregates (means), rows with a ``case_id`` are per request / per probe; ``layer`` / ``param`` /
               ``protocol`` are NULL where they do not apply.
``artifacts``  arrays (``npz``) for the analysis layer: singular values, captured hidden states, an editor's
               per-step artifacts. One larger than :attr:`RunStore.blob_limit` (8 MiB; e.g. AlphaEdit's null-space
               basis of an 8B model, hundreds of MB) is written to a file beside the store,
               ``artifacts/<run_id>/<file>.npz``, and its row holds that relative path (format ``npz-file``); SQLite
               never holds a blob above the limit.

SQLite runs in WAL mode (readers never block the writer, nor the writer them) with a busy timeout for the rare
writer-writer overlap (the engine's heartbeat thread). Each call opens its own short-lived connection, so a store
object may be shared across threads. Every step is committed as it finishes; a process killed mid-run keeps what it
committed, and the next :class:`RunStore` opened on the file marks that run ``interrupted``.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import socket
import sqlite3
import time
import uuid
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .procs import pid_alive
from .sqlite_util import SQLiteFile, ensure_wal, where_in

log = logging.getLogger(__name__)

DB_NAME = "runs.sqlite"
SCHEMA_VERSION = 1

STATUSES = ("queued", "running", "finished", "diverged", "interrupted", "failed", "cancelled")
#: statuses after which a run never changes again (except by deletion)
TERMINAL = frozenset({"finished", "diverged", "interrupted", "failed", "cancelled"})

#: the shortest run-id prefix :meth:`RunStore.resolve` accepts (a whole id of any length is always accepted)
MIN_PREFIX = 4
_MAX_LISTED = 20

#: metric columns, in order (``metrics_frame`` and ``export`` return these)
METRIC_COLUMNS = ("run_id", "n_edits", "step", "kind", "layer", "param", "metric", "protocol", "value", "case_id")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
    error TEXT,
    label TEXT,
    method TEXT,
    model TEXT,
    model_hash TEXT,
    data_source TEXT,
    config_json TEXT,
    method_config_json TEXT,
    preset_version TEXT,
    package_versions_json TEXT,
    n_edits_planned INTEGER,
    n_edits_done INTEGER NOT NULL DEFAULT 0,
    seconds_total REAL,
    device TEXT,
    pid INTEGER,
    host TEXT,
    heartbeat REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status);
CREATE INDEX IF NOT EXISTS runs_method ON runs (method);

CREATE TABLE IF NOT EXISTS edits (
    run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    idx INTEGER,
    step INTEGER NOT NULL,
    n_edits INTEGER NOT NULL,
    case_id TEXT,
    request_json TEXT,
    seconds REAL,
    peak_mem_mb REAL,
    info_json TEXT
);
CREATE INDEX IF NOT EXISTS edits_run ON edits (run_id, step);

CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    n_edits INTEGER NOT NULL,
    step INTEGER,
    kind TEXT NOT NULL,
    layer INTEGER,
    param TEXT,
    metric TEXT NOT NULL,
    protocol TEXT,
    value REAL,
    case_id TEXT
);
CREATE INDEX IF NOT EXISTS metrics_run_kind_metric ON metrics (run_id, kind, metric);

CREATE TABLE IF NOT EXISTS artifacts (
    run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    n_edits INTEGER,
    step INTEGER,
    name TEXT NOT NULL,
    format TEXT NOT NULL,
    blob BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_run_name ON artifacts (run_id, name);
"""

#: columns of ``runs`` that :meth:`RunStore.create_run` / :meth:`RunStore.update_run` accept
RUN_FIELDS = ("status", "error", "label", "method", "model", "model_hash", "data_source", "config_json",
              "method_config_json", "preset_version", "package_versions_json", "n_edits_planned", "n_edits_done",
              "seconds_total", "device", "pid", "host", "heartbeat", "cancel_requested")
_JSON_FIELDS = {"config": "config_json", "method_config": "method_config_json",
                "package_versions": "package_versions_json"}


class StoreError(RuntimeError):
    """A store operation could not be done (bad status, bad format, ...)."""


class RunNotFoundError(KeyError):
    """No run with that id (or the prefix is ambiguous); the message says which."""

    def __str__(self) -> str:
        return str(self.args[0])


def new_run_id() -> str:
    """Sortable and short: UTC time to the second plus 6 random hex digits, e.g. ``20250101-120000-a1b2c3``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _json_default(obj: Any):
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    item = getattr(obj, "item", None)  # torch scalars
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            pass
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(obj)


def to_json(obj: Any) -> str:
    """JSON text of ``obj``; numpy / torch values become plain numbers, anything else its ``str``."""
    return json.dumps(obj, default=_json_default, allow_nan=True)


def _float(value: Any) -> float | None:
    """A REAL for SQLite. NaN is stored as NULL (SQLite has no NaN); +-Inf is kept."""
    if value is None:
        return None
    v = float(value)
    return None if math.isnan(v) else v


def encode_npz(arrays: Mapping[str, Any]) -> bytes:
    """``npz`` bytes of named arrays (tensors are converted; no pickles)."""
    buf = io.BytesIO()
    clean = {}
    for k, v in arrays.items():
        if hasattr(v, "detach"):
            v = v.detach().to("cpu").numpy()
        clean[str(k)] = np.asarray(v)
    np.savez_compressed(buf, **clean)
    return buf.getvalue()


def decode_npz(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class RunStore(SQLiteFile):
    """The SQLite run store of one runs directory.

    Args:
        path_or_dir: a directory (the file is ``<dir>/runs.sqlite``; created if missing) or a ``.sqlite`` / ``.db``
            file path.
        timeout: seconds a connection waits on a lock before failing.
        stale_after: a ``running`` run whose heartbeat is older than this many seconds is considered dead.
        recover: mark dead ``running`` runs ``interrupted`` when the store is opened.
    """

    #: artifacts whose encoding is larger than this many bytes go to a file beside the store (path in the row)
    blob_limit = 8 * 2 ** 20

    _PRAGMAS = ("PRAGMA foreign_keys = ON",
                "PRAGMA synchronous = NORMAL")  # durable across process crashes in WAL mode

    def __init__(self, path_or_dir: str | os.PathLike, *, timeout: float = 30.0, stale_after: float = 600.0,
                 recover: bool = True):
        p = os.fspath(path_or_dir)
        if p.endswith((".sqlite", ".db", ".sqlite3")) or os.path.isfile(p):
            parent = os.path.dirname(os.path.abspath(p))
            os.makedirs(parent, exist_ok=True)
            self.path = os.path.abspath(p)
        else:
            os.makedirs(p, exist_ok=True)
            self.path = os.path.abspath(os.path.join(p, DB_NAME))
        self.timeout = float(timeout)
        self.stale_after = float(stale_after)
        self.host = socket.gethostname()
        self._init_schema()
        if recover:
            self.recover_interrupted()

    @property
    def runs_dir(self) -> str:
        return os.path.dirname(self.path)

    def __repr__(self) -> str:
        return f"RunStore({self.path!r})"

    def _init_schema(self) -> None:
        conn = self._open()
        try:
            ensure_wal(conn, self.path)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            elif version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {version}; this code knows {SCHEMA_VERSION}")
        finally:
            conn.close()

    def journal_mode(self) -> str:
        with self._read() as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()

    # ---- runs ------------------------------------------------------------------------------------------------
    @staticmethod
    def _run_values(fields: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in fields.items():
            if key in _JSON_FIELDS:
                out[_JSON_FIELDS[key]] = None if value is None else to_json(value)
            elif key in RUN_FIELDS:
                if key.endswith("_json") and value is not None and not isinstance(value, str):
                    value = to_json(value)
                out[key] = value
            else:
                raise TypeError(f"unknown run field {key!r}; valid: "
                                f"{', '.join(sorted((*RUN_FIELDS, *_JSON_FIELDS)))}")
        if "status" in out and out["status"] not in STATUSES:
            raise StoreError(f"unknown status {out['status']!r}; valid: {', '.join(STATUSES)}")
        return out

    def create_run(self, *, run_id: str | None = None, status: str = "queued", **fields: Any) -> str:
        """Insert a run and return its id. ``fields`` are columns of ``runs`` (``config``, ``method_config`` and
        ``package_versions`` may be given as objects; they are stored as JSON)."""
        run_id = run_id or new_run_id()
        now = time.time()
        values = self._run_values({"status": status, **fields})
        values.setdefault("host", self.host)
        cols = ["run_id", "created", "updated", *values]
        with self._tx() as conn:
            conn.execute(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                         [run_id, now, now, *values.values()])
        return run_id

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Set columns of one run (and ``updated``)."""
        values = self._run_values(fields)
        if not values:
            return
        with self._tx() as conn:
            self._update(conn, run_id, values)

    def _update(self, conn: sqlite3.Connection, run_id: str, values: Mapping[str, Any]) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        cur = conn.execute(f"UPDATE runs SET {sets}, updated = ? WHERE run_id = ?",
                           [*values.values(), time.time(), run_id])
        if cur.rowcount == 0:
            raise RunNotFoundError(f"no run {run_id!r} in {self.path}")

    def update_status(self, run_id: str, status: str, error: str | None = None, **fields: Any) -> None:
        """Set a run's status (and error text, and any other columns)."""
        if error is not None:
            fields["error"] = error
        self.update_run(run_id, status=status, **fields)

    def heartbeat(self, run_id: str, **fields: Any) -> None:
        """Record that the run's writer is alive (and optionally progress columns such as ``n_edits_done``).

        A run that a reader wrongly marked ``interrupted`` (it was only slow) becomes ``running`` again."""
        values = self._run_values(fields)
        values["heartbeat"] = time.time()
        with self._tx() as conn:
            sets = ", ".join(f"{k} = ?" for k in values)
            conn.execute(f"UPDATE runs SET {sets}, updated = ?, status = CASE WHEN status = 'interrupted' "
                         f"THEN 'running' ELSE status END WHERE run_id = ?",
                         [*values.values(), time.time(), run_id])

    def request_cancel(self, run_id: str) -> None:
        """Ask the run's writer to stop after its current step; a queued run is cancelled at once."""
        run_id = self.resolve(run_id)
        with self._tx() as conn:
            conn.execute("UPDATE runs SET cancel_requested = 1, updated = ?, status = CASE WHEN status = 'queued' "
                         "THEN 'cancelled' ELSE status END WHERE run_id = ?", (time.time(), run_id))

    def cancel_requested(self, run_id: str) -> bool:
        with self._read() as conn:
            row = conn.execute("SELECT cancel_requested FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return bool(row and row[0])

    def recover_interrupted(self) -> list[str]:
        """Mark runs whose writer is gone as ``interrupted``. ``running``: on this host, a dead pid; anywhere, a
        heartbeat older than ``stale_after``. ``queued`` with an owner ``pid`` (the process that queued it to run it
        itself, e.g. ``python -m app run`` killed between queueing and starting): on this host, a dead pid. A queued
        run without a pid belongs to the job queue (the worker starts it) and is left alone. Returns the ids changed.
        """
        now = time.time()
        with self._read() as conn:
            rows = conn.execute("SELECT run_id, status, pid, host, heartbeat, updated FROM runs "
                                "WHERE status IN ('running', 'queued')").fetchall()
        dead = []
        for r in rows:
            beat = r["heartbeat"] if r["heartbeat"] is not None else r["updated"]
            owner_dead = r["host"] == self.host and r["pid"] is not None and not pid_alive(int(r["pid"]))
            if r["status"] == "queued":
                if owner_dead:
                    dead.append((r["run_id"], "queued", f"the process (pid {r['pid']}) that queued the run ended "
                                                        "before it started"))
            elif owner_dead:
                dead.append((r["run_id"], "running", f"the process (pid {r['pid']}) ended without finishing the run"))
            elif beat is not None and now - beat > self.stale_after:
                dead.append((r["run_id"], "running", f"no heartbeat for {now - beat:.0f} s"))
        changed = []
        for run_id, was, why in dead:
            with self._tx() as conn:
                cur = conn.execute("UPDATE runs SET status = 'interrupted', error = COALESCE(error, ?), updated = ? "
                                   "WHERE run_id = ? AND status = ?", (why, now, run_id, was))
                if cur.rowcount:
                    changed.append(run_id)
                    log.info("run %s marked interrupted: %s", run_id, why)
        return changed

    def resolve(self, run_id: str) -> str:
        """The full id of ``run_id`` or of the one run whose id starts with it.

        An empty id, or a prefix shorter than :data:`MIN_PREFIX` characters that is not a whole id, is refused (an
        empty prefix would match every run); a prefix that matches several runs lists them."""
        run_id = run_id if isinstance(run_id, str) else str(run_id)
        if not run_id.strip():
            raise RunNotFoundError("empty run id: give a run id or at least the first "
                                   f"{MIN_PREFIX} characters of one (`python -m app list` shows them)")
        with self._read() as conn:
            if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone():
                return run_id
            if len(run_id) < MIN_PREFIX:
                raise RunNotFoundError(f"run id prefix {run_id!r} is too short: give at least {MIN_PREFIX} "
                                       "characters of a run id")
            like = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            rows = conn.execute("SELECT run_id FROM runs WHERE run_id LIKE ? ESCAPE '\\' ORDER BY run_id LIMIT ?",
                                (like, _MAX_LISTED + 1)).fetchall()
            n = len(rows) if len(rows) <= _MAX_LISTED else conn.execute(
                "SELECT COUNT(*) FROM runs WHERE run_id LIKE ? ESCAPE '\\'", (like,)).fetchone()[0]
        if len(rows) == 1:
            return rows[0][0]
        if not rows:
            raise RunNotFoundError(f"no run {run_id!r} in {self.path}")
        listed = ", ".join(r[0] for r in rows[:_MAX_LISTED])
        more = f" and {n - _MAX_LISTED} more" if n > _MAX_LISTED else ""
        raise RunNotFoundError(f"run id prefix {run_id!r} is ambiguous: it matches {n} runs: {listed}{more}; "
                               "give more characters")

    def get_run(self, run_id: str) -> dict[str, Any]:
        """One run as a dict: every column (times as unix seconds) plus ``config``, ``method_config`` and
        ``package_versions`` decoded from JSON. Accepts a unique id prefix."""
        run_id = self.resolve(run_id)
        with self._read() as conn:
            row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        out = dict(row)
        for obj, col in _JSON_FIELDS.items():
            out[obj] = json.loads(out[col]) if out.get(col) else None
        return out

    def list_runs(self, method: str | Sequence[str] | None = None, status: str | Sequence[str] | None = None
                  ) -> pd.DataFrame:
        """Runs, newest first, without the JSON columns; ``created`` / ``updated`` / ``heartbeat`` as UTC
        timestamps. Filter by one or several methods / statuses."""
        cols = ("run_id", "created", "updated", "status", "error", "label", "method", "model", "model_hash",
                "data_source", "preset_version", "n_edits_planned", "n_edits_done", "seconds_total", "device", "pid",
                "host", "heartbeat")
        where, args = where_in((("method", method), ("status", status)))
        sql = f"SELECT {', '.join(cols)} FROM runs{where} ORDER BY created DESC, run_id DESC"
        with self._read() as conn:
            rows = conn.execute(sql, args).fetchall()
        df = pd.DataFrame([tuple(r) for r in rows], columns=list(cols))
        for c in ("created", "updated", "heartbeat"):
            df[c] = pd.to_datetime(df[c].astype("float64"), unit="s", utc=True)
        for c in ("n_edits_planned", "n_edits_done", "pid"):
            df[c] = df[c].astype("Int64")
        df["seconds_total"] = df["seconds_total"].astype("float64")  # all NULL (nothing edited yet) -> NaN, not None
        return df

    def delete_run(self, run_id: str) -> None:
        """Delete a run and all its rows (edits, metrics, artifacts)."""
        run_id = self.resolve(run_id)
        with self._tx() as conn:
            conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
        import shutil

        from .snapshots import delete_snapshots
        shutil.rmtree(self.artifact_dir(run_id), ignore_errors=True)
        delete_snapshots(self.runs_dir, run_id)

    def truncate_run(self, run_id: str, n_edits: int) -> dict[str, int]:
        """Delete a run's rows made after its first ``n_edits`` edits (edit rows, metric rows and artifacts with a
        larger ``n_edits``, and the files of such artifacts) and set ``n_edits_done`` to ``n_edits``: what a resume
        from a snapshot of ``n_edits`` edits makes again. Returns the counts deleted per table."""
        run_id = self.resolve(run_id)
        n = int(n_edits)
        with self._tx() as conn:
            files = [bytes(r[0]).decode() for r in conn.execute(
                "SELECT blob FROM artifacts WHERE run_id = ? AND n_edits > ? AND format LIKE '%-file'", (run_id, n))]
            counts = {t: conn.execute(f"DELETE FROM {t} WHERE run_id = ? AND n_edits > ?", (run_id, n)).rowcount
                      for t in ("edits", "metrics", "artifacts")}
            self._update(conn, run_id, {"n_edits_done": n})
        for rel in files:
            try:
                os.remove(os.path.join(self.runs_dir, rel))
            except OSError:
                pass
        return counts

    # ---- rows ------------------------------------------------------------------------------------------------
    @staticmethod
    def _edit_tuples(run_id: str, rows: Iterable[Mapping[str, Any]]) -> list[tuple]:
        out = []
        for r in rows:
            req = r.get("request_json", r.get("request"))
            info = r.get("info_json", r.get("info"))
            out.append((run_id, r.get("idx"), int(r["step"]), int(r["n_edits"]), r.get("case_id"),
                        req if isinstance(req, str) or req is None else to_json(req),
                        _float(r.get("seconds")), _float(r.get("peak_mem_mb")),
                        info if isinstance(info, str) or info is None else to_json(info)))
        return out

    @staticmethod
    def _metric_tuples(run_id: str, rows: Iterable[Mapping[str, Any]]) -> list[tuple]:
        out = []
        for r in rows:
            layer = r.get("layer")
            layer = None if layer is None or (isinstance(layer, float) and math.isnan(layer)) else int(layer)
            step = r.get("step")
            out.append((run_id, int(r["n_edits"]), None if step is None else int(step), str(r["kind"]), layer,
                        r.get("param"), str(r["metric"]), r.get("protocol"), _float(r.get("value")),
                        None if r.get("case_id") is None else str(r["case_id"])))
        return out

    _EDIT_SQL = ("INSERT INTO edits (run_id, idx, step, n_edits, case_id, request_json, seconds, peak_mem_mb, "
                 "info_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
    _METRIC_SQL = ("INSERT INTO metrics (run_id, n_edits, step, kind, layer, param, metric, protocol, value, "
                   "case_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
    _ARTIFACT_SQL = "INSERT INTO artifacts (run_id, n_edits, step, name, format, blob) VALUES (?, ?, ?, ?, ?, ?)"

    def add_edit_rows(self, run_id: str, rows: Iterable[Mapping[str, Any]]) -> int:
        """Rows with keys ``step, n_edits`` and optionally ``idx, case_id, request (dict), seconds, peak_mem_mb,
        info (dict)``. Returns the number written."""
        tuples = self._edit_tuples(run_id, rows)
        with self._tx() as conn:
            conn.executemany(self._EDIT_SQL, tuples)
        return len(tuples)

    def add_metric_rows(self, run_id: str, rows: Iterable[Mapping[str, Any]]) -> int:
        """Rows with keys ``n_edits, kind, metric, value`` and optionally ``step, layer, param, protocol, case_id``.
        NaN values are stored as NULL. Returns the number written."""
        tuples = self._metric_tuples(run_id, rows)
        with self._tx() as conn:
            conn.executemany(self._METRIC_SQL, tuples)
        return len(tuples)

    def add_artifact(self, run_id: str, name: str, data: Mapping[str, Any] | bytes, *, n_edits: int | None = None,
                     step: int | None = None, fmt: str = "npz") -> None:
        """Store named arrays (encoded as ``npz``) or raw bytes of format ``fmt`` (in a file beside the store when
        larger than :attr:`blob_limit`)."""
        row = self._artifact_row(run_id, name, data, n_edits, step, fmt)
        with self._tx() as conn:
            conn.execute(self._ARTIFACT_SQL, row)

    def artifact_dir(self, run_id: str) -> str:
        """The folder of a run's file artifacts (``<runs_dir>/artifacts/<run_id>``; may not exist)."""
        return os.path.join(self.runs_dir, "artifacts", run_id)

    def _artifact_row(self, run_id: str, name: str, data: Mapping[str, Any] | bytes, n_edits: int | None,
                      step: int | None, fmt: str | None = None) -> tuple:
        raw = isinstance(data, (bytes, bytearray))
        fmt = fmt or ("bin" if raw else "npz")
        blob = bytes(data) if raw else encode_npz(data)
        if len(blob) <= self.blob_limit:
            return (run_id, n_edits, step, name, fmt, blob)
        folder = self.artifact_dir(run_id)
        os.makedirs(folder, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
        fname = f"{n_edits if n_edits is not None else 'x'}-{safe}-{uuid.uuid4().hex[:8]}.{fmt}"
        tmp = os.path.join(folder, f".{fname}.tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, os.path.join(folder, fname))
        rel = os.path.join("artifacts", run_id, fname)
        return (run_id, n_edits, step, name, f"{fmt}-file", rel.encode())

    def _artifact_bytes(self, fmt: str, blob: bytes) -> tuple[str, bytes]:
        """(format, content) of an artifact row: the blob itself, or the file a ``*-file`` row names."""
        if not fmt.endswith("-file"):
            return fmt, bytes(blob)
        path = os.path.join(self.runs_dir, bytes(blob).decode())
        try:
            with open(path, "rb") as f:
                return fmt[:-len("-file")], f.read()
        except OSError as exc:
            raise StoreError(f"artifact file {path} could not be read: {exc}") from exc

    def write_step(self, run_id: str, *, edit_rows: Iterable[Mapping[str, Any]] = (),
                   metric_rows: Iterable[Mapping[str, Any]] = (),
                   artifacts: Iterable[tuple[str, Mapping[str, Any] | bytes, int | None, int | None]] = (),
                   **run_fields: Any) -> None:
        """Everything one step produced, in ONE transaction: edit rows, metric rows, artifacts
        ``(name, data, n_edits, step)``, and run columns (e.g. ``n_edits_done``); also beats the heartbeat."""
        e = self._edit_tuples(run_id, edit_rows)
        m = self._metric_tuples(run_id, metric_rows)
        a = [self._artifact_row(run_id, name, d, n, s) for name, d, n, s in artifacts]
        values = self._run_values(run_fields)
        values["heartbeat"] = time.time()
        with self._tx() as conn:
            if e:
                conn.executemany(self._EDIT_SQL, e)
            if m:
                conn.executemany(self._METRIC_SQL, m)
            if a:
                conn.executemany(self._ARTIFACT_SQL, a)
            self._update(conn, run_id, values)

    # ---- frames ----------------------------------------------------------------------------------------------
    def metrics_frame(self, run_ids: str | Sequence[str] | None = None, kinds: str | Sequence[str] | None = None,
                      metrics: str | Sequence[str] | None = None, *, aggregates_only: bool = False) -> pd.DataFrame:
        """Long-form metric rows: columns ``run_id, n_edits, step, kind, layer, param, metric, protocol, value,
        case_id`` (``layer`` nullable Int64; NULL value -> NaN). ``run_ids=None`` means every run;
        ``aggregates_only``: only the rows with ``case_id`` NULL (means, weights, ...; filtered in SQL, so a long
        run's per-request rows are never read)."""
        where, args = where_in((("run_id", run_ids), ("kind", kinds), ("metric", metrics)))
        if aggregates_only:
            where += (" AND" if where else " WHERE") + " case_id IS NULL"
        sql = f"SELECT {', '.join(METRIC_COLUMNS)} FROM metrics{where} ORDER BY rowid"
        with self._read() as conn:
            rows = conn.execute(sql, args).fetchall()
        # object columns keep None for "not applicable" (pandas would otherwise infer str columns with NaN)
        df = pd.DataFrame([tuple(r) for r in rows], columns=list(METRIC_COLUMNS), dtype=object)
        df["n_edits"] = df["n_edits"].astype("int64")
        for c in ("step", "layer"):
            df[c] = pd.array([None if v is None else int(v) for v in df[c]], dtype="Int64")
        df["value"] = pd.to_numeric(df["value"], errors="coerce").astype("float64")
        return df

    def edits_frame(self, run_id: str) -> pd.DataFrame:
        """The run's edit rows in order, with ``request`` and ``info`` decoded."""
        run_id = self.resolve(run_id)
        cols = ("run_id", "idx", "step", "n_edits", "case_id", "request_json", "seconds", "peak_mem_mb", "info_json")
        with self._read() as conn:
            rows = conn.execute(f"SELECT {', '.join(cols)} FROM edits WHERE run_id = ? ORDER BY rowid",
                                (run_id,)).fetchall()
        df = pd.DataFrame([tuple(r) for r in rows], columns=list(cols), dtype=object)
        for c in ("step", "n_edits"):
            df[c] = df[c].astype("int64")
        df["idx"] = pd.array([None if v is None else int(v) for v in df["idx"]], dtype="Int64")
        for c in ("seconds", "peak_mem_mb"):
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
        df["request"] = [json.loads(s) if isinstance(s, str) else None for s in df["request_json"]]
        df["info"] = [json.loads(s) if isinstance(s, str) else None for s in df["info_json"]]
        return df.drop(columns=["request_json", "info_json"])

    def list_artifacts(self, run_id: str) -> pd.DataFrame:
        """``run_id, n_edits, step, name, format, bytes, path`` of the run's artifacts (no blobs); ``path`` (relative
        to the runs directory) and the file's size for artifacts kept in files, else None and the blob's size."""
        run_id = self.resolve(run_id)
        with self._read() as conn:
            rows = conn.execute("SELECT run_id, n_edits, step, name, format, length(blob), "
                                "CASE WHEN format LIKE '%-file' THEN CAST(blob AS TEXT) END FROM artifacts "
                                "WHERE run_id = ? ORDER BY rowid", (run_id,)).fetchall()
        out = []
        for r in rows:
            r = tuple(r)
            if r[6] is not None:
                full = os.path.join(self.runs_dir, r[6])
                r = r[:5] + (os.path.getsize(full) if os.path.exists(full) else None, r[6])
            out.append(r)
        return pd.DataFrame(out, columns=["run_id", "n_edits", "step", "name", "format", "bytes", "path"])

    def get_artifact(self, run_id: str, name: str, n_edits: int | None = None) -> dict[str, np.ndarray] | bytes:
        """The artifact ``name`` at ``n_edits`` (the latest one when None): decoded arrays, or bytes."""
        run_id = self.resolve(run_id)
        sql = "SELECT format, blob FROM artifacts WHERE run_id = ? AND name = ?"
        args: list[Any] = [run_id, name]
        if n_edits is not None:
            sql += " AND n_edits = ?"
            args.append(int(n_edits))
        sql += " ORDER BY rowid DESC LIMIT 1"
        with self._read() as conn:
            row = conn.execute(sql, args).fetchone()
        if row is None:
            raise KeyError(f"run {run_id} has no artifact {name!r}" + (f" at n_edits={n_edits}" if n_edits is not None
                                                                       else ""))
        fmt, content = self._artifact_bytes(row["format"], row["blob"])
        return decode_npz(content) if fmt == "npz" else content

    def export(self, run_id: str, fmt: str = "csv", out: str | os.PathLike | None = None) -> str:
        """Write the run's metric rows (long form, :data:`METRIC_COLUMNS`) plus its edit rows (``kind='edit_log'``,
        metric ``seconds`` / ``peak_mem_mb`` per edit, with ``case_id``) to ``out`` as CSV or Parquet.
        ``layer`` is empty where it does not apply. Returns the path written."""
        fmt = fmt.lower()
        if fmt not in ("csv", "parquet"):
            raise StoreError(f"unknown export format {fmt!r}; valid: csv, parquet")
        run_id = self.resolve(run_id)
        df = self.metrics_frame([run_id])
        edits = self.edits_frame(run_id)
        if len(edits):
            log_rows = []
            for r in edits.itertuples(index=False):
                for metric in ("seconds", "peak_mem_mb"):
                    log_rows.append({"run_id": run_id, "n_edits": r.n_edits, "step": r.step, "kind": "edit_log",
                                     "metric": metric, "value": getattr(r, metric), "case_id": r.case_id})
            extra = pd.DataFrame(log_rows, columns=list(METRIC_COLUMNS))
            extra = extra.astype({"n_edits": "int64", "step": "Int64", "layer": "Int64", "value": "float64"})
            df = pd.concat([df, extra], ignore_index=True)
        out = os.fspath(out) if out is not None else os.path.join(self.runs_dir, f"{run_id}.{fmt}")
        parent = os.path.dirname(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        if fmt == "csv":
            df.to_csv(out, index=False)
        else:
            df.to_parquet(out, index=False)
        return out


__all__ = ["RunStore", "RunNotFoundError", "StoreError", "STATUSES", "TERMINAL", "METRIC_COLUMNS", "DB_NAME",
           "new_run_id", "encode_npz", "decode_npz", "to_json"]
