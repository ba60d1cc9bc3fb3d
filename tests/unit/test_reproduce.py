"""The reproduction dispatcher (app/reproduce/__init__.py, ``python -m app study reproduce --paper NAME``): paper
modules are discovered, an unknown paper names the valid ones, a module's table is checked, written as CSV and
markdown, and the GeoEdit module runs through it (tiny model, real zsRE records)."""
from __future__ import annotations

import math
import os
import textwrap

import pandas as pd
import pytest

import app.reproduce as rp
from app.cli import main as cli_main
from editors.testing import tiny_model
from tests.conftest import shared_path


def _fake_paper(tmp_path, monkeypatch, body: str, name: str = "fakepaper") -> str:
    """A paper module ``name`` in a folder added to the package's search path (discovery sees it)."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body), encoding="utf-8")
    monkeypatch.setattr(rp, "__path__", [*rp.__path__, str(tmp_path)])
    monkeypatch.delitem(__import__("sys").modules, f"app.reproduce.{name}", raising=False)
    return name


GOOD = """
    import pandas as pd
    PAPER = "Fake (Doe 2024)"
    DEFAULT_N = 7
    SEEN = {}

    def run(args):
        SEEN.update(vars(args))
        return pd.DataFrame([
            {"table": "Table 1", "row": "MEMIT", "metric": "reliability", "paper": 61.9, "ours": 65.6, "note": "n=16"},
            {"table": "Table 1", "row": "MEMIT", "metric": "locality", "paper": None, "ours": 91.7, "note": ""},
            {"table": "Table 1", "row": "ROME", "metric": "reliability", "paper": 18.4, "ours": None,
             "note": "not run", "se": 2.0},
            {"table": "Fig. 2", "row": "raw", "metric": "mean", "paper": 90.0, "ours": 89.5, "note": ""}])
"""


def test_papers_are_discovered_and_geoedit_is_one():
    names = rp.papers()
    assert "geoedit" in names and names == sorted(names)
    mod = rp.paper_module("GeoEdit")  # case-insensitive
    assert mod.PAPER.startswith("GeoEdit") and callable(mod.run) and mod.DEFAULT_N == 16


def test_unknown_paper_lists_the_valid_ones(capsys):
    with pytest.raises(rp.ReproduceError, match=r"unknown paper 'nope'; valid: .*geoedit"):
        rp.paper_module("nope")
    assert cli_main(["study", "reproduce", "--paper", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown paper 'nope'" in err and "geoedit" in err
    assert cli_main(["study", "reproduce"]) == 2 and "needs --paper" in capsys.readouterr().err


def test_a_module_without_the_interface_is_refused(tmp_path, monkeypatch):
    name = _fake_paper(tmp_path, monkeypatch, "PAPER = 'x'\n", name="norun")
    with pytest.raises(rp.ReproduceError, match=r"app/reproduce/norun.py .*missing run"):
        rp.paper_module(name)


def test_reproduce_fills_defaults_checks_and_writes_the_table(tmp_path, monkeypatch):
    (tmp_path / "mods").mkdir()
    name = _fake_paper(tmp_path / "mods", monkeypatch, GOOD)
    out = tmp_path / "out"
    table = rp.reproduce(name, out=str(out), options={"k": "v"}, sets=["rome.layers=5"], seed=3)
    mod = rp.paper_module(name)
    seen = mod.SEEN
    assert seen["n"] == 7 and seen["paper"] == name and seen["seed"] == 3 and seen["options"] == {"k": "v"}
    assert seen["sets"] == ["rome.layers=5"] and seen["quick"] is False and os.path.isdir(seen["out"])
    assert list(table.columns[:6]) == list(rp.REQUIRED_COLUMNS) and (table["paper_name"] == "Fake (Doe 2024)").all()
    assert math.isnan(table.loc[1, "paper"]) and math.isnan(table.loc[2, "ours"]) and table.loc[2, "se"] == 2.0
    back = pd.read_csv(out / "table.csv")
    assert len(back) == 4 and back.loc[0, "ours"] == 65.6
    md = (out / "table.md").read_text(encoding="utf-8")
    assert "### Fake (Doe 2024)" in md and "**Table 1**" in md and "**Fig. 2**" in md
    assert "| row | reliability paper | reliability ours | locality paper | locality ours | note |" in md
    assert "| MEMIT | 61.90 | 65.60 | / | 91.70 | n=16 |" in md  # one line per row, paper beside ours
    assert "| ROME | 18.40 | / |  |  | not run |" in md
    # an explicit n wins over DEFAULT_N
    rp.reproduce(name, out=str(out), n=2)
    assert mod.SEEN["n"] == 2


@pytest.mark.parametrize("table, match", [
    ([1, 2], "must return a pandas DataFrame"),
    (pd.DataFrame([{"table": "T", "row": "r", "metric": "m", "paper": 1.0}]), r"lacks the column\(s\) ours, note"),
    (pd.DataFrame([{"table": "T", "row": "r", "metric": "m", "paper": "high", "ours": 1.0, "note": ""}]),
     r"column 'paper' of row 0 \(T / r / m\) is not a number: 'high'"),
])
def test_check_table_errors(table, match):
    with pytest.raises(rp.ReproduceError, match=match):
        rp.check_table("p", table)


def test_argument_errors():
    with pytest.raises(rp.ReproduceError, match="KEY=VALUE"):
        rp.parse_options(["novalue"])
    assert rp.parse_options(["a=1", " b = x=y "]) == {"a": "1", "b": "x=y"}
    with pytest.raises(rp.ReproduceError, match="n must be >= 1"):
        rp.make_args("geoedit", n=0)
    assert rp.make_args("GeoEdit").out == os.path.join("runs", "reproduce", "geoedit")


def test_geoedit_options_are_checked():
    from app.reproduce import geoedit
    for options, match in (({"bogus": "1"}, "unknown option"), ({"datasets": "wiki"}, "unknown dataset 'wiki'"),
                           ({"rows": "mend"}, "no Table 1 row for mend")):
        with pytest.raises(rp.ReproduceError, match=match):
            geoedit.run(rp.make_args("geoedit", options=options, lm=object()))
    assert [r.method for r in geoedit.select_rows("geoedit")] == [None] + ["geoedit", "geoedit-mw"] * 2
    assert [r.label for r in geoedit.select_rows("none,rome")] == ["Original model", "ROME"]
    assert [r.label for r in geoedit.select_rows("geoedit-ft")] == [
        "Original model", "GeoEdit_FT (paper: importance fusion)", "GeoEdit_FT +MW (geoedit-mw)"]


@pytest.mark.timeout(600)
def test_geoedit_runs_through_the_dispatcher_on_a_tiny_model(tmp_path):
    shared_path("zsre", "zsre-800.json")
    args = rp.make_args("geoedit", n=2, quick=True, out=str(tmp_path), lm=tiny_model("llama"),
                        options={"datasets": "zsre"}, sets=["geoedit.layers=1", "geoedit.ae_steps=4",
                                                            "geoedit.num_steps=2"])
    table = rp.reproduce("geoedit", args)
    tables = list(dict.fromkeys(table["table"]))
    assert tables == ["Table 1 (zsRE)", "Table 2 (zsRE; paper: zsRE)", "Fig. 3", "Fig. 4"]
    t1 = table[table["table"] == "Table 1 (zsRE)"]
    assert list(dict.fromkeys(t1["row"])) == ["Original model", "GeoEdit_FT (paper: importance fusion)",
                                              "GeoEdit_FT +MW (geoedit-mw)"]
    mw = t1[(t1["row"] == "GeoEdit_FT +MW (geoedit-mw)") & (t1["metric"] == "reliability")].iloc[0]
    assert mw["paper"] == 85.21 and 0 <= mw["ours"] <= 100 and "+MW" in mw["note"] and "classes" in mw["note"]
    orig = t1[t1["row"] == "Original model"].set_index("metric")
    assert orig.loc["reliability", "paper"] == 43.70 and math.isnan(orig.loc["locality", "ours"])
    t2 = table[table["table"].str.startswith("Table 2")]
    assert list(dict.fromkeys(t2["row"])) == ["GeoEdit", "- Synergistic", "- Orthogonal", "- Conflict", "+ MW"]
    assert {"table.csv", "table.md", "geoedit.md", "geoedit_table1.csv"} <= set(os.listdir(tmp_path))
