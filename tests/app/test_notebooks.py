"""The notebooks run top to bottom on the default model with small sizes.

A tiny runner (``json`` + ``exec``, no Jupyter dependency): code cells run in order in one namespace; after the cell
tagged ``parameters`` the test's values are assigned (papermill's convention). Cells are run with the notebook's
folder as the working directory, as Jupyter would.
"""
from __future__ import annotations

import json
import os

import pytest

from tests.app.conftest import ROOT

pytestmark = pytest.mark.slow


def run_notebook(path: str, params: dict | None = None) -> dict:
    """Execute every code cell of ``path``; returns the namespace. A failing cell raises with its index."""
    with open(path, encoding="utf-8") as fh:
        nb = json.load(fh)
    ns: dict = {"__name__": "__notebook__"}
    cwd = os.getcwd()
    os.chdir(os.path.dirname(os.path.abspath(path)))
    try:
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code":
                continue
            src = "".join(cell["source"])
            src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
            try:
                exec(compile(src, f"{os.path.basename(path)}[cell {i}]", "exec"), ns)
            except Exception as exc:
                raise AssertionError(f"{os.path.basename(path)} cell {i} failed: {type(exc).__name__}: {exc}") \
                    from exc
            if "parameters" in cell.get("metadata", {}).get("tags", []):
                ns.update(params or {})
    finally:
        os.chdir(cwd)
    return ns


def _data_params(tmp_path) -> dict:
    """DATA / LOCALITY_PROBES for the study: the built-in fact set when it is installed, else a small file."""
    try:
        from editors.data import builtin_probes, builtin_requests
        builtin_requests(), builtin_probes()
        return {"DATA": "builtin", "LOCALITY_PROBES": "builtin"}
    except Exception:
        from tests.app.conftest import FACT
        path = tmp_path / "facts.json"
        path.write_text(json.dumps([{**FACT, "case_id": f"f{i}"} for i in range(4)]))
        return {"DATA": str(path), "LOCALITY_PROBES": "none"}


def test_notebooks_are_valid_and_parameterised():
    for name in ("quickstart", "collapse_study"):
        nb = json.load(open(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), encoding="utf-8"))
        assert nb["nbformat"] == 4
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1
        code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        assert "import streamlit" not in code and ".show()" not in code  # figures are cell results, inline


def test_quickstart_on_the_default_model():
    ns = run_notebook(os.path.join(ROOT, "notebooks", "quickstart.ipynb"),
                      {"METHOD": "ft", "OVERRIDES": {"num_steps": 5}, "MAX_NEW_TOKENS": 4})
    assert ns["restored"] == ns["before"]  # the cell asserts it too: undo is exact
    assert len(ns["changes"]) >= 1 and (ns["changes"]["delta_fro"] > 0).all()
    assert ns["fig"].data[0].type == "bar"


def test_collapse_study_falls_back_to_installed_methods(tmp_path):
    params = {**_data_params(tmp_path), "METHODS": ["no-such-method", "ft-c"], "FALLBACK": ["ft"], "N_EDITS": 2,
              "EVAL_EVERY": 0, "GENERAL": "none", "OVERRIDES": {"ft": {"num_steps": 3}, "ft-c": {"num_steps": 3}},
              "RUNS_DIR": str(tmp_path / "runs")}
    ns = run_notebook(os.path.join(ROOT, "notebooks", "collapse_study.ipynb"), params)
    assert ns["methods"] == ["ft-c", "ft"]  # the missing method was replaced by the fallback
    for method, run_id in ns["run_ids"].items():
        assert ns["store"].get_run(run_id)["status"] in ("finished", "diverged")
    assert not ns["curves"].empty and len(ns["fig"].data) >= 1
