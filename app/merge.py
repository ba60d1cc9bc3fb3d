"""``python -m app merge STORE...``: import the runs of other run stores (other machines, sweep shards) into one.

Identity is the run id (:func:`app.store.new_run_id`: time + 6 random hex digits, unique across machines). For each
run of a source store:

* not in the destination: the run and ALL its rows (``runs``, ``edits``, ``metrics``, ``artifacts``, in their order,
  values and blobs byte for byte: ``INSERT ... SELECT`` between the two SQLite files) are copied, in one
  transaction per source, with the artifact files beside the store (``artifacts/<run_id>/``, the large ones);
* already in the destination with the same content (a digest of its ``runs`` row and of every row of the three
  row tables): skipped, so merging twice changes nothing;
* already there with different content: a CONFLICT. Conflicts are found before anything is written and the merge
  is refused with the list (nothing of that source is copied); two stores never silently disagree.

Sweep tables (:class:`app.sweep.SweepStore`) come along: a sweep missing in the destination is copied, trials and
run links are added where missing (so the shards of one sweep run on several machines become one sweep).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from typing import Sequence

from .store import DB_NAME, SCHEMA_VERSION, RunStore

log = logging.getLogger(__name__)

ROW_TABLES = ("edits", "metrics", "artifacts")


class MergeError(RuntimeError):
    """A merge that was refused (conflicting run ids, not a run store, the destination itself); nothing written."""


@dataclass
class MergeReport:
    copied: list[str] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROW_TABLES, 0))
    sweeps: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{len(self.copied)} run(s) copied ({', '.join(f'{v} {k}' for k, v in self.rows.items())} rows), "
                f"{len(self.identical)} already present and identical"
                + (f"; sweeps: {', '.join(self.sweeps)}" if self.sweeps else ""))


def store_file(path: str | os.PathLike) -> str:
    """The SQLite file of a store given as its file or its runs directory."""
    p = os.fspath(path)
    return os.path.abspath(os.path.join(p, DB_NAME) if os.path.isdir(p) else p)


def _columns(conn: sqlite3.Connection, table: str, schema: str = "main") -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA {schema}.table_info({table})")]


def _has_table(conn: sqlite3.Connection, table: str, schema: str = "main") -> bool:
    return conn.execute(f"SELECT 1 FROM {schema}.sqlite_master WHERE type = 'table' AND name = ?",
                        (table,)).fetchone() is not None


def run_digest(conn: sqlite3.Connection, run_id: str, schema: str = "main") -> str:
    """sha256 of a run's ``runs`` row and of every row of its edits / metrics / artifacts (in rowid order)."""
    h = hashlib.sha256()
    cols = [c for c in _columns(conn, "runs", schema)]
    row = conn.execute(f"SELECT {', '.join(cols)} FROM {schema}.runs WHERE run_id = ?", (run_id,)).fetchone()
    h.update(repr(tuple(row)).encode())
    for table in ROW_TABLES:
        tcols = [c for c in _columns(conn, table, schema)]
        h.update(f"|{table}|".encode())
        for r in conn.execute(f"SELECT {', '.join(tcols)} FROM {schema}.{table} WHERE run_id = ? ORDER BY rowid",
                              (run_id,)):
            h.update(repr(tuple(r)).encode())
    return h.hexdigest()


@contextlib.contextmanager
def _attached(dest: RunStore, source: str):
    conn = sqlite3.connect(dest.path, timeout=dest.timeout, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(dest.timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("ATTACH DATABASE ? AS src", (source,))
        yield conn
    finally:
        conn.close()


def _check_source(conn: sqlite3.Connection, source: str) -> None:
    if not _has_table(conn, "runs", "src"):
        raise MergeError(f"{source} is not a run store (no runs table)")
    version = conn.execute("PRAGMA src.user_version").fetchone()[0]
    if version != SCHEMA_VERSION:
        raise MergeError(f"{source} has run store schema version {version}; this code knows {SCHEMA_VERSION}")
    for table in ("runs", *ROW_TABLES):
        if _columns(conn, table, "src") != _columns(conn, table):
            raise MergeError(f"{source}: table {table} has other columns than the destination's")


def _artifact_files(conn: sqlite3.Connection, run_ids: Sequence[str], source: str) -> list[str]:
    """Relative paths of the file artifacts of ``run_ids`` in the source; a missing file refuses the merge."""
    out = []
    for run_id in run_ids:
        for (blob,) in conn.execute("SELECT blob FROM src.artifacts WHERE run_id = ? AND format LIKE '%-file'",
                                    (run_id,)):
            rel = bytes(blob).decode()
            if not os.path.isfile(os.path.join(os.path.dirname(source), rel)):
                raise MergeError(f"{source}: run {run_id} names the artifact file {rel}, which is missing beside the "
                                 f"store; nothing was merged from this store")
            out.append(rel)
    return out


def merge_stores(dest: RunStore | str | os.PathLike, sources: Sequence[str | os.PathLike]) -> MergeReport:
    """Import every run of ``sources`` (store files or runs directories) into ``dest`` (module docstring).

    Raises:
        MergeError: a source is missing, not a run store, the destination itself, or has a run whose id is in the
            destination with other content (the conflicts are listed; nothing of that source is written).
    """
    from .sweep_core import SWEEP_TABLES, SweepStore
    dest = dest if isinstance(dest, RunStore) else RunStore(dest, recover=False)
    report = MergeReport()
    for src in sources:
        source = store_file(src)
        if not os.path.isfile(source):
            raise MergeError(f"no run store at {os.fspath(src)!r} (expected a .sqlite file or a directory with "
                             f"{DB_NAME})")
        if os.path.samefile(source, dest.path):
            raise MergeError(f"{source} is the destination store itself")
        with _attached(dest, source) as conn:
            _check_source(conn, source)
            ids = [r[0] for r in conn.execute("SELECT run_id FROM src.runs ORDER BY created, run_id")]
            have = {r[0] for r in conn.execute("SELECT run_id FROM main.runs")}
            new, conflicts = [], []
            for run_id in ids:
                if run_id not in have:
                    new.append(run_id)
                elif run_digest(conn, run_id, "src") == run_digest(conn, run_id, "main"):
                    report.identical.append(run_id)
                else:
                    conflicts.append(run_id)
            if conflicts:
                raise MergeError(f"{source}: {len(conflicts)} run id(s) are already in {dest.path} with other "
                                 f"content: {', '.join(conflicts[:10])}{' ...' if len(conflicts) > 10 else ''}; "
                                 f"nothing was merged from this store (delete one copy, or merge into a new store)")
            files = _artifact_files(conn, new, source)
            has_sweeps = _has_table(conn, "sweeps", "src")
            if has_sweeps:
                SweepStore(dest)  # the destination's sweep tables
            rcols = ", ".join(_columns(conn, "runs"))
            conn.execute("BEGIN IMMEDIATE")
            try:
                for run_id in new:
                    conn.execute(f"INSERT INTO main.runs ({rcols}) SELECT {rcols} FROM src.runs WHERE run_id = ?",
                                 (run_id,))
                    for table in ROW_TABLES:
                        tcols = ", ".join(_columns(conn, table))
                        cur = conn.execute(f"INSERT INTO main.{table} ({tcols}) SELECT {tcols} FROM src.{table} "
                                           f"WHERE run_id = ? ORDER BY rowid", (run_id,))
                        report.rows[table] += cur.rowcount
                if has_sweeps:
                    for table, cols in SWEEP_TABLES.items():
                        if not _has_table(conn, table, "src"):
                            continue
                        c = ", ".join(cols)
                        where = " WHERE run_id IN (SELECT run_id FROM main.runs)" if table == "sweep_runs" else ""
                        conn.execute(f"INSERT OR IGNORE INTO main.{table} ({c}) SELECT {c} FROM src.{table}{where}")
                    report.sweeps += [r[0] for r in conn.execute("SELECT sweep_id FROM src.sweeps")
                                      if r[0] not in report.sweeps]
                for rel in files:  # file artifacts (RunStore.blob_limit) beside the store, same relative path
                    dst = os.path.join(dest.runs_dir, rel)
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copyfile(os.path.join(os.path.dirname(source), rel), dst)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            report.copied += new
            report.sources.append(source)
            log.info("merged %s: %d run(s) copied, %d identical", source, len(new), len(ids) - len(new))
    return report


__all__ = ["merge_stores", "MergeError", "MergeReport", "run_digest", "store_file"]
