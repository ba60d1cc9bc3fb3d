"""SQLite plumbing shared by the run store (:mod:`app.store`) and the job queue (:mod:`app.jobs`).

Both keep one SQLite file that several processes read and write at once, so both open a short-lived connection per
call (autocommit mode, rows as :class:`sqlite3.Row`, a busy timeout), take the write lock up front for a write
(``BEGIN IMMEDIATE``, so no reader-to-writer upgrade deadlock), and run the file in WAL mode.
"""
from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)


class SQLiteFile:
    """Connection helpers for an object with a ``path`` (the database file) and a ``timeout`` (seconds).

    Subclasses may list extra ``PRAGMA`` statements in :attr:`_PRAGMAS`; each connection runs them once opened.
    Every call opens its own connection, so the object may be shared across threads.
    """

    path: str
    timeout: float
    _PRAGMAS: tuple[str, ...] = ()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        for pragma in self._PRAGMAS:
            conn.execute(pragma)
        return conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: takes the write lock up front, so no upgrade deadlock)."""
        conn = self._open()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A connection (autocommit: reads, or statements that manage their own transaction), closed afterwards."""
        conn = self._open()
        try:
            yield conn
        finally:
            conn.close()


def ensure_wal(conn: sqlite3.Connection, path: str, *, attempts: int = 50, pause: float = 0.1) -> str:
    """Switch the database of ``conn`` to WAL mode unless it is already; retries while another process holds a lock.
    Logs a warning (and does not raise) when it cannot. Returns the journal mode afterwards, lower case."""
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    if str(mode).lower() != "wal":
        for _ in range(attempts):
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError:  # another process holds a lock right now
                time.sleep(pause)
        if str(mode).lower() != "wal":
            log.warning("could not switch %s to WAL mode (journal_mode=%s)", path, mode)
    return str(mode).lower()


def where_in(filters: Iterable[tuple[str, Any]]) -> tuple[str, list[Any]]:
    """A ``WHERE`` clause that keeps the rows whose column holds one of the given values, for each ``(column,
    value)`` pair whose value is not None (a string is one value, any other iterable several). Returns the clause
    (``" WHERE col IN (?, ?) AND ..."``, or ``""`` when every value is None) and its parameters."""
    where: list[str] = []
    args: list[Any] = []
    for col, val in filters:
        if val is None:
            continue
        vals = [val] if isinstance(val, str) else list(val)
        where.append(f"{col} IN ({', '.join('?' * len(vals))})")
        args.extend(vals)
    return (" WHERE " + " AND ".join(where) if where else ""), args


__all__ = ["SQLiteFile", "ensure_wal", "where_in"]
