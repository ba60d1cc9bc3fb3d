"""Processes of the workbench: is a process alive, and a heartbeat thread that says "this one is".

The run store (a run's ``pid`` / ``heartbeat``) and the job queue (a job's ``worker_pid`` / ``heartbeat``) both notice
a writer that died by its process id, and both are kept fresh by a :class:`Heartbeat` while a run or a job works.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """Does process ``pid`` exist on this host and is it not a zombie (killed, not yet reaped by its parent)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):  # no /proc (macOS): the signal said it exists
        return True


class Heartbeat(threading.Thread):
    """A daemon thread that calls ``beat()`` every ``every`` seconds until :meth:`stop` (a missed beat is logged,
    never raised: it must not kill the work it reports on). Use as a context manager."""

    def __init__(self, beat: Callable[[], None], every: float, *, name: str = "heartbeat"):
        super().__init__(name=name, daemon=True)
        self.beat, self.every = beat, every
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every):
            try:
                self.beat()
            except Exception as exc:
                log.debug("%s: missed beat: %s", self.name, exc)

    def stop(self) -> None:
        self._stop_event.set()

    def __enter__(self) -> "Heartbeat":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["pid_alive", "Heartbeat"]
