"""Settings of the web app, from the environment (no heavy imports here: the web server reads it on every page).

``EDITBENCH_RUNS``        runs directory (run store ``runs.sqlite`` and job queue ``jobs.sqlite``); default ``./runs``.
``EDITBENCH_MODELS``      extra model choices, comma separated: local model directories or hub ids, loaded by
                          :func:`editors.models.load_model` like ``default`` (the tests name a saved tiny model).
``EDITBENCH_DEVICE``      the worker's device key (``auto`` = CUDA when present, else CPU).
``EDITBENCH_NO_WORKER``   when set, the app never starts a worker itself (one is started by hand or by a test).
``EDITBENCH_UPLOAD_MB``   size limit of an uploaded edits file in MB (default 5).
``EDITBENCH_DATA_ROOTS``  folders (``os.pathsep``-separated) whose files the app's pages may name as data; default the
                          shared data folder ``../shared/data``. The runs directory's ``uploads/`` is always one.
"""
from __future__ import annotations

import os

DEFAULT_MODEL = "default"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runs_dir() -> str:
    return os.path.abspath(os.environ.get("EDITBENCH_RUNS") or "runs")


def model_choices() -> list[str]:
    """"default" first, then the extra choices of ``EDITBENCH_MODELS``."""
    extra = [m.strip() for m in os.environ.get("EDITBENCH_MODELS", "").split(",") if m.strip()]
    return [DEFAULT_MODEL] + [m for m in extra if m != DEFAULT_MODEL]


def device_setting() -> str:
    return (os.environ.get("EDITBENCH_DEVICE") or "auto").strip() or "auto"


def autostart_worker() -> bool:
    return not os.environ.get("EDITBENCH_NO_WORKER")


def upload_limit_bytes() -> int:
    try:
        mb = float(os.environ.get("EDITBENCH_UPLOAD_MB", "5"))
    except ValueError:
        mb = 5.0
    return int(mb * 2 ** 20)


def data_roots() -> list[str]:
    """The folders whose files a page may name as run data (resolved, symlinks followed): ``EDITBENCH_DATA_ROOTS``
    or the shared data folder, and always the uploads folder of the runs directory."""
    given = [p.strip() for p in os.environ.get("EDITBENCH_DATA_ROOTS", "").split(os.pathsep) if p.strip()]
    roots = given or [os.path.join(os.path.dirname(ROOT), "shared", "data")]
    roots.append(os.path.join(runs_dir(), "uploads"))
    return list(dict.fromkeys(os.path.realpath(os.path.expanduser(r)) for r in roots))


__all__ = ["data_roots",
           "runs_dir", "model_choices", "device_setting", "autostart_worker", "upload_limit_bytes", "ROOT",
           "DEFAULT_MODEL"]
