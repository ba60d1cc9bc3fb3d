"""``python -m app.serve [STREAMLIT OPTIONS]`` (also ``python -m app ui``): start the web app safely from any directory.

``streamlit run app/main.py`` reads ``.streamlit/config.toml`` from the *working directory* only, so started
elsewhere it listened on every network interface with usage statistics on. This entry passes the workbench's own
settings as command-line options, which Streamlit applies whatever the working directory:

* ``--server.address localhost`` (this machine only), ``--browser.gatherUsageStats false``,
  ``--server.headless true``, and the rest of ``.streamlit/config.toml`` (upload size, no run on save, the viewer
  toolbar);
* an option the user gives explicitly wins (``python -m app.serve --server.address 0.0.0.0`` serves the network on
  purpose).

The working directory is kept (``EDITBENCH_RUNS`` defaults to ``./runs`` there). :mod:`app.main` also refuses to
show the workbench when it finds itself bound to every interface without anybody having asked for it.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from .settings import ROOT

MAIN = os.path.join(ROOT, "app", "main.py")

#: the options this entry sets unless the user gives them
SAFE_OPTIONS = {"server.address": "localhost", "browser.gatherUsageStats": "false", "server.headless": "true",
                # and the rest of .streamlit/config.toml, which is not read outside the repository root
                "server.maxUploadSize": "5", "server.runOnSave": "false", "client.toolbarMode": "viewer"}


def _given(args: Sequence[str]) -> set[str]:
    """The option names (``server.address``) among ``--server.address X`` / ``--server.address=X`` arguments."""
    return {a[2:].split("=", 1)[0] for a in args if a.startswith("--")}


def streamlit_command(args: Sequence[str] = ()) -> list[str]:
    """The ``python -m streamlit run app/main.py ...`` command line: the safe options, then the user's."""
    given = _given(args)
    safe = [f"--{k}={v}" for k, v in SAFE_OPTIONS.items() if k not in given]
    return [sys.executable, "-m", "streamlit", "run", MAIN, *safe, *args]


def main(argv: Sequence[str] | None = None) -> int:
    cmd = streamlit_command(list(sys.argv[1:] if argv is None else argv))
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    os.execve(sys.executable, cmd, env)  # replaces this process: signals reach Streamlit itself
    return 0  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["streamlit_command", "SAFE_OPTIONS", "main"]
