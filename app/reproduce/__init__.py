"""Reproductions of the seed papers' tables and figures under each paper's own protocol, scaled to a small CPU:
``python -m app study reproduce --paper NAME`` (or :func:`reproduce` from Python).

One module per paper, ``app/reproduce/<name>.py``; ``<name>`` is the ``--paper`` value. Modules are discovered
(:func:`papers`: every module of this package whose name does not start with ``_``), so adding a file is enough.
A paper module exposes:

``PAPER: str``
    the paper's name and citation, e.g. ``"GeoEdit (Feng et al. 2025, arXiv 2502.19953)"``.
``run(args: argparse.Namespace) -> pandas.DataFrame``
    runs the reproduction and returns its table (below). ``args`` is built by :func:`make_args`, the same fields for
    every paper: ``paper``, ``model``, ``n`` (records / edits per setting; None -> the module's ``DEFAULT_N``),
    ``seed``, ``device``, ``threads`` (already applied), ``out`` (a folder, created before ``run``: extra artefacts
    go there), ``data_dir``, ``quick`` (the smallest meaningful run, for smoke tests), ``options`` (dict of
    ``--option KEY=VALUE``, the paper's own knobs; the module validates them, raising :class:`ReproduceError`
    naming the key) and ``sets`` (``--set METHOD.KEY=VALUE`` strings, for ``editors.fields.parse_method_sets``).
``DEFAULT_N: int`` (optional)
    ``n`` when ``--n`` is not given.

The table is long-form, one row per (table, row, metric), with the columns :data:`REQUIRED_COLUMNS`: ``table`` (the
paper's table / figure, e.g. ``"Table 1 (CounterFact)"``), ``row`` (the paper's row label), ``metric``, ``paper``
(the paper's number in the paper's unit; NaN where it gives none), ``ours`` (the same unit; NaN = not run, the note
says why) and ``note`` (``""`` or a short reason). Optional columns (``n``, ``se``, ``variant``, ``unit``, others)
are kept. :func:`reproduce` checks the table, adds ``paper_name``, writes ``<out>/table.csv`` and ``<out>/table.md``
(:func:`format_table`) and returns it. docs/reproductions.md holds the measured tables and the reason for every
disagreement; /work/notes/reproduce_interface.md is the same contract for contributors.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import pkgutil
from types import ModuleType
from typing import Any, Mapping, Sequence

import pandas as pd

REQUIRED_COLUMNS = ("table", "row", "metric", "paper", "ours", "note")
DEFAULT_DATA_DIR = os.path.join("..", "shared", "data")


class ReproduceError(ValueError):
    """A reproduction cannot run as asked (unknown paper, bad option, a module breaking the interface)."""


def papers() -> list[str]:
    """The ``--paper`` names: the modules of this package (not starting with ``_``), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and not m.ispkg)


def paper_module(name: str) -> ModuleType:
    """The module of paper ``name`` (case-insensitive), checked for ``PAPER`` and ``run``.

    Raises:
        ReproduceError: no such paper (the message lists the valid ones), or the module lacks the interface.
    """
    key = str(name).strip().lower()
    valid = papers()
    if key not in valid:
        raise ReproduceError(f"unknown paper {name!r}; valid: {', '.join(valid)}")
    mod = importlib.import_module(f"{__name__}.{key}")
    missing = [a for a in ("PAPER", "run") if not hasattr(mod, a)]
    if missing or not callable(getattr(mod, "run", None)):
        raise ReproduceError(f"app/reproduce/{key}.py does not follow the reproduction interface: missing "
                             f"{', '.join(missing) or 'a callable run'}")
    return mod


def parse_options(items: Sequence[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` -> dict (``--option``).

    Raises:
        ReproduceError: an item without ``=`` or with an empty key.
    """
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ReproduceError(f"--option must be KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def make_args(paper: str, *, model: str = "default", n: int | None = None, seed: int = 0, device: str | None = None,
              threads: int | None = None, out: str | None = None, data_dir: str = DEFAULT_DATA_DIR,
              quick: bool = False, options: Mapping[str, str] | None = None, sets: Sequence[str] = (), lm=None
              ) -> argparse.Namespace:
    """The ``args`` a paper module's ``run`` receives (``n`` stays None here; :func:`reproduce` fills it in).
    ``lm``: an already loaded model (:func:`load_lm` returns it instead of loading ``model``).

    Raises:
        ReproduceError: ``n`` < 1.
    """
    if n is not None and int(n) < 1:
        raise ReproduceError(f"n must be >= 1, got {n}")
    key = str(paper).strip().lower()
    return argparse.Namespace(paper=key, model=model, n=None if n is None else int(n), seed=int(seed), device=device,
                              threads=threads, out=out or os.path.join("runs", "reproduce", key), data_dir=data_dir,
                              quick=bool(quick), options=dict(options or {}), sets=list(sets), lm=lm)


def load_lm(args: argparse.Namespace):
    """``args.lm`` when the caller passed a loaded model (tests, notebooks), else
    ``editors.models.load_model(args.model, device=args.device)`` (call once per run)."""
    if getattr(args, "lm", None) is not None:
        return args.lm
    from editors.models import load_model
    return load_model(args.model, device=args.device)


def check_table(paper: str, table: Any) -> pd.DataFrame:
    """The table a module returned, checked: a DataFrame with :data:`REQUIRED_COLUMNS`, ``paper`` / ``ours``
    numeric (None -> NaN), ``note`` a string.

    Raises:
        ReproduceError: not a DataFrame, a missing column, or a non-numeric value (the row is named).
    """
    if not isinstance(table, pd.DataFrame):
        raise ReproduceError(f"app/reproduce/{paper}.py: run() must return a pandas DataFrame, got "
                             f"{type(table).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ReproduceError(f"app/reproduce/{paper}.py: the table lacks the column(s) {', '.join(missing)} "
                             f"(required: {', '.join(REQUIRED_COLUMNS)})")
    table = table.reset_index(drop=True).copy()
    for col in ("paper", "ours"):
        values = pd.to_numeric(table[col].where(table[col].notna(), math.nan), errors="coerce")
        bad = values.isna() & table[col].notna()
        if bad.any():
            i = int(bad.idxmax())
            raise ReproduceError(f"app/reproduce/{paper}.py: column {col!r} of row {i} ({table.at[i, 'table']} / "
                                 f"{table.at[i, 'row']} / {table.at[i, 'metric']}) is not a number: "
                                 f"{table.at[i, col]!r}")
        table[col] = values.astype(float)
    table["note"] = table["note"].fillna("").astype(str)
    for col in ("table", "row", "metric"):
        table[col] = table[col].astype(str)
    return table


def _cell(v: float) -> str:
    return "/" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def format_table(table: pd.DataFrame, title: str = "") -> str:
    """Markdown: one table per ``table`` value (in first-seen order), one line per ``row``, a ``paper | ours`` pair
    of columns per metric, the rows' notes in a last column."""
    lines = [f"### {title}", ""] if title else []
    for name, g in table.groupby("table", sort=False):
        metrics = list(dict.fromkeys(g["metric"]))
        lines += [f"**{name}**", "", "| row | " + " | ".join(f"{m} paper | {m} ours" for m in metrics) + " | note |",
                  "|---|" + "---|---|" * len(metrics) + "---|"]
        for row, r in g.groupby("row", sort=False):
            cells = []
            for m in metrics:
                hit = r[r["metric"] == m]
                cells += [_cell(float(hit["paper"].iloc[0])) if len(hit) else "",
                          _cell(float(hit["ours"].iloc[0])) if len(hit) else ""]
            notes = "; ".join(dict.fromkeys(x for x in r["note"] if x))
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {notes} |")
        lines.append("")
    return "\n".join(lines)


def reproduce(paper: str, args: argparse.Namespace | None = None, **kwargs) -> pd.DataFrame:
    """Run paper ``paper``'s reproduction: ``args`` as from :func:`make_args` (or ``kwargs`` for it); fills in the
    module's ``DEFAULT_N``, creates ``args.out``, calls ``run``, checks the table, writes ``table.csv`` and
    ``table.md`` there and returns the table (with ``paper_name``).

    Raises:
        ReproduceError: unknown paper, bad arguments, or a table breaking the interface.
    """
    mod = paper_module(paper)
    if args is None:
        args = make_args(paper, **kwargs)
    elif kwargs:
        raise ReproduceError("give either args or keyword arguments, not both")
    args.paper = mod.__name__.rsplit(".", 1)[-1]
    if getattr(args, "n", None) is None and hasattr(mod, "DEFAULT_N"):
        args.n = int(mod.DEFAULT_N)
    os.makedirs(args.out, exist_ok=True)
    table = check_table(args.paper, mod.run(args))
    table["paper_name"] = str(mod.PAPER)
    table.to_csv(os.path.join(args.out, "table.csv"), index=False)
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(format_table(table, str(mod.PAPER)))
    return table


__all__ = ["REQUIRED_COLUMNS", "ReproduceError", "papers", "paper_module", "parse_options", "make_args", "load_lm",
           "check_table", "format_table", "reproduce"]
