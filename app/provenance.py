"""What a run records about the software it ran with: Python, the main packages and the project's git commit."""
from __future__ import annotations

import importlib
import os
import platform
import subprocess

#: packages whose version a run records (all are requirements)
PACKAGES = ("torch", "transformers", "numpy", "pandas")


def package_versions() -> dict[str, str]:
    """``{"python", "torch", "transformers", "numpy", "pandas", "editbench_commit"}``; the commit only when the
    project is a git checkout and git is installed."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # pragma: no cover - all are requirements
            pass
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode == 0:
            out["editbench_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


__all__ = ["package_versions", "PACKAGES"]
