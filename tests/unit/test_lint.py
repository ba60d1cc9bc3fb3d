"""The tree is ruff-clean under the project's configuration (pyproject.toml: line 120; E, F, W, I)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ruff() -> list[str]:
    try:
        import ruff  # noqa: F401
        return [sys.executable, "-m", "ruff"]
    except ImportError:
        exe = shutil.which("ruff")
        if exe is None:
            pytest.skip("ruff is not installed (pip install -e .[dev] or requirements.txt installs it)")
        return [exe]


def test_tree_is_ruff_clean():
    proc = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, "ruff found problems (run `ruff check --fix .`):\n" + proc.stdout + proc.stderr


def test_ruff_check_sees_a_planted_error(tmp_path):
    """The check is not vacuous: the same configuration flags an unused import in a copy of the config."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    proc = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise", str(bad)],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1 and "F401" in proc.stdout
