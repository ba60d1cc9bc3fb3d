"""The architecture stays visible: editors -> analysis -> app -> pages | benchmarks, nothing imports upward, no
import cycles inside app/, product code never uses test helpers, editors/ and analysis/ never import Streamlit, pages
only compose.

The rules are import-linter contracts in pyproject.toml (`lint-imports`, run here); import-linter sees every
``import`` statement (also inside functions), and the test below adds imports by name (``importlib.import_module``,
``__import__``), which it cannot see. A back-edge written into a copy of the tree must break the contracts.
"""
import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: top-level packages, lowest layer first; a module may import its own layer and those below it
LAYERS = (("editors",), ("analysis",), ("app",), ("pages", "benchmarks"))
#: product code: it may not use the test helpers (tests/, editors.testing); benchmarks may
PRODUCT = ("editors", "analysis", "app", "pages")


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def _imports_by_name(path):
    """Module names given as string literals to ``importlib.import_module`` / ``__import__``."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
        arg = node.args[0]
        if name in ("import_module", "__import__") and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            yield arg.value


def _py_files(folder):
    for base, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(base, f)


def _layer(package: str) -> int | None:
    return next((i for i, names in enumerate(LAYERS) if package in names), None)


def _lint_imports(cwd: str) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")
    if not os.path.exists(exe):
        pytest.fail("lint-imports (import-linter, a pinned requirement) is not installed: bash scripts/setup.sh")
    env = dict(os.environ, PYTHONPATH=cwd)
    return subprocess.run([exe, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_import_contracts_are_kept():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "5 kept, 0 broken" in proc.stdout


def test_a_back_edge_breaks_the_contracts(tmp_path):
    """The guard can fail: in a copy of the tree, editors importing app (an upward import) and app importing the test
    helpers each break a contract, with the offending import named."""
    for folder in ("editors", "analysis", "app", "pages", "benchmarks", "tests"):
        shutil.copytree(os.path.join(ROOT, folder), tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.json", "*.yaml", "*.ipynb"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    with open(tmp_path / "editors" / "requests.py", "a", encoding="utf-8") as fh:
        fh.write("\n\ndef _upward():\n    from app import cli  # noqa: F401\n")
    with open(tmp_path / "app" / "settings.py", "a", encoding="utf-8") as fh:
        fh.write("\n\ndef _test_helper():\n    from editors import testing  # noqa: F401\n")
    proc = _lint_imports(str(tmp_path))
    assert proc.returncode != 0
    assert "editors.requests -> app.cli" in proc.stdout and "app.settings -> editors.testing" in proc.stdout
    assert "3 kept, 2 broken" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("folder", ["editors", "analysis", "app", "pages", "benchmarks"])
def test_imports_by_name_respect_the_layers(folder):
    """``importlib.import_module("benchmarks....")`` from app/ is the same back-edge as an ``import`` statement."""
    own = _layer(folder)
    bad = []
    for path in _py_files(folder):
        for name in _imports_by_name(path):
            top = name.split(".")[0]
            layer = _layer(top)
            test_helper = top == "tests" or name == "editors.testing"
            if (layer is not None and layer > own) or (folder in PRODUCT and test_helper):
                bad.append((os.path.relpath(path, ROOT), name))
    assert not bad, f"upward import by name: {bad}"


@pytest.mark.parametrize("folder", ["editors", "analysis"])
def test_library_layers_do_not_import_streamlit_or_app(folder):
    bad = [(os.path.relpath(p, ROOT), m) for p in _py_files(folder) for m in _imports(p)
           if m in ("streamlit", "app", "pages")]
    assert not bad, f"layer violation: {bad}"


def test_editors_do_not_import_analysis_except_evaluation_free():
    # editors are below analysis in the data flow
    bad = [(os.path.relpath(p, ROOT), m) for p in _py_files("editors") for m in _imports(p) if m == "analysis"]
    assert not bad, f"editors must not depend on analysis: {bad}"


def test_pages_do_no_tensor_maths():
    bad = [(os.path.relpath(p, ROOT), m) for p in _py_files("pages") for m in _imports(p) if m in ("torch", "editors")]
    assert not bad, f"pages must only compose (no torch / editors imports): {bad}"
