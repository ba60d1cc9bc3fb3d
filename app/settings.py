"""Settings of the web app, from the environment (no heavy imports here: the web server reads it on every page).

``EDITBENCH_RUNS``        runs directory (run store ``runs.sqlite`` and job queue ``jobs.sqlite``); default ``./runs``.
``EDITBENCH_MODELS``      extra model choices, comma separated: local model directories or hub ids, loaded by
                          :func:`editors.models.load_model` like ``default`` (the tests name a saved tiny model).
``EDITBENCH_DEVICE``      the worker's device key (``auto`` = CUDA when present, else CPU).
``EDITBENCH_NO_WORKER``   when set, the app never starts a worker itself (one is started by hand or by a test).
``EDITBENCH_UPLOAD_MB``   size limit of an uploaded edits file in MB (default 5).
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


__all__ = ["runs_dir", "model_choices", "device_setting", "autostart_worker", "upload_limit_bytes", "ROOT",
           "DEFAULT_MODEL"]
