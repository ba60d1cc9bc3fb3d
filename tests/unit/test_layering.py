"""The architecture stays visible: editors/ and analysis/ never import streamlit or app/; pages only compose."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def _py_files(folder):
    for base, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(base, f)


@pytest.mark.parametrize("folder", ["editors", "analysis"])
def test_library_layers_do_not_import_streamlit_or_app(folder):
    bad = [(os.path.relpath(p, ROOT), m) for p in _py_files(folder) for m in _imports(p) if m in ("streamlit", "app", "pages")]
    assert not bad, f"layer violation: {bad}"


def test_editors_do_not_import_analysis_except_evaluation_free():
    # editors are below analysis in the data flow
    bad = [(os.path.relpath(p, ROOT), m) for p in _py_files("editors") for m in _imports(p) if m == "analysis"]
    assert not bad, f"editors must not depend on analysis: {bad}"


def test_pages_do_no_tensor_maths():
    bad = [(os.path.relpath(p, ROOT), m) for p in _py_files("pages") for m in _imports(p) if m in ("torch", "editors")]
    assert not bad, f"pages must only compose (no torch / editors imports): {bad}"
