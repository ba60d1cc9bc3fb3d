"""AGRADE (Gu et al., AAAI 2025; ../shared/papers/agrade.txt) under its own protocol, scaled to a small CPU.

Protocol (section Experiments, Appendix A/C): BATCH editing (the model restored after every batch), hypernetworks
trained on CounterFact's train split and scored on the edit split: ES (edit prompt), GS (paraphrases), LS
(neighbourhood prompts: agreement with the unedited model) as teacher-forced token accuracy (``tf_token_acc``; the
paper's indicator of f(x) = y, token by token), Score = their harmonic mean; percent. The paper: batches of 8192,
LLaMA2-7B / GPT-J / Mistral, training to convergence; ours: ``--option steps`` meta steps of ``--option
train_edits`` records (default 200 x 8, ~8 min per net on a quiet 2-core CPU), ``n`` edit records scored in batches
of ``--option batch`` (8). Trained nets are cached under ``~/.cache/editbench/hypernets`` (keyed by model and config)
and REUSED: a second run with the same settings trains nothing.

Tables (``table`` column):

* ``Table 1 (CounterFact, LLaMA2-7B)``: MALMEN and AGRADE (and the untrained net) beside the paper's LLaMA2 rows.
* ``Table 2 (ablations, LLaMA2 CounterFact)``: AGRADE, w/o adjustment c, w/o regularisation, w/o weights
  projection, w/o gradient projection (which here IS MALMEN: editors/agrade.py shows the meta-gradients are
  identical), and Eq. 4 against the previous module's projected G (``projection_reference=projected``, not in the
  paper). ``--option rows`` picks them (names: agrade, malmen, untrained, no_c, no_reg, no_wproj, no_gproj,
  eq4_projected).
* ``Eq. 4 (what it removes)``: per edited layer, on one batch edit with each trained AGRADE net (raw and projected
  reference): cosine of G with the previous module's G before Eq. 4 and the share of ‖G‖ Eq. 4 removes (no paper
  numbers).

``--quick``: 2 meta steps of 2 records, 4 edit records, rows agrade and malmen (a smoke test, not a result).
"""
from __future__ import annotations

import math
import os
import tempfile

import pandas as pd

from editors.data import load_requests

from ._sequential import check_options, method_sets, option, row

PAPER = "AGRADE (Gu et al., AAAI 2025, 'Editing Large Language Models via Adaptive Gradient Guidance')"
DEFAULT_N = 64
OPTIONS = ("rows", "steps", "train_edits", "meta_lr", "batch", "train_data", "data", "cache")

#: Table 1, LLaMA2-7B, CounterFact (ES, GS, LS, Score)
TABLE1 = {"MALMEN": (45.97, 26.08, 37.88, 34.69), "AGRADE": (83.41, 57.81, 72.54, 69.65)}
#: Table 2, ablations on LLaMA2, CounterFact
TABLE2 = {"AGRADE": (83.41, 57.81, 72.54, 69.65), "w/o adjustment c": (15.69, 11.03, 12.59, 12.83),
          "w/o regularization": (80.12, 52.48, 68.90, 65.14),
          "w/o weights projection": (79.61, 53.28, 65.49, 64.37),
          "w/o gradient projection": (76.41, 52.49, 68.91, 64.30)}
#: row name -> (method, overrides, label, table)
ROWS = {
    "agrade": ("agrade", {}, "AGRADE", "both"),
    "malmen": ("malmen", {}, "MALMEN", "table1"),
    "untrained": ("agrade", {"allow_untrained": True}, "untrained hypernetwork", "table1"),
    "no_c": ("agrade", {"use_c": False}, "w/o adjustment c", "table2"),
    "no_reg": ("agrade", {"regularise": False}, "w/o regularization", "table2"),
    "no_wproj": ("agrade", {"weight_projection": False}, "w/o weights projection", "table2"),
    "no_gproj": ("agrade", {"gradient_projection": False}, "w/o gradient projection", "table2"),
    "eq4_projected": ("agrade", {"projection_reference": "projected"}, "Eq. 4 vs projected G_prev", "table2"),
}
METRICS = ("ES", "GS", "LS", "score")


def eq4_diagnostics(lm, editor, batch) -> list[dict]:
    """Per edited layer after the first: ``cos_prev`` (G with the G_prev Eq. 4 uses, before projection) and
    ``removed`` = 1 − ‖G_after‖/‖G_before‖ (the share of G's norm Eq. 4 takes away), from one edit's artifacts."""
    res = editor.edit(list(batch))
    art = res.artifacts
    layers = sorted(art["G_before"], key=int)
    out = []
    for i, layer in enumerate(layers[1:]):
        before, after = art["G_before"][layer].double(), art["G_after"][layer].double()
        out.append({"layer": int(layer), "cos_prev": float(art["cos_prev"][i]),
                    "removed": 1.0 - float(after.norm() / before.norm().clamp_min(1e-30))})
    return out


def run(args) -> pd.DataFrame:
    from app.train import batch_scores, train_hypernet
    from editors.presets import build_config
    from editors.registry import get_editor_class

    from . import load_lm

    check_options(args, OPTIONS)
    quick = args.quick
    n = 4 if quick else int(args.n or DEFAULT_N)
    wanted = [r.strip() for r in option(args, "rows", "agrade,malmen" if quick else ",".join(ROWS)).split(",")]
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        from . import ReproduceError
        raise ReproduceError(f"--option rows: unknown row {unknown[0]!r}; valid: {', '.join(ROWS)}")
    steps = option(args, "steps", 2 if quick else 200, int)
    train_edits = option(args, "train_edits", 2 if quick else 8, int)
    meta_lr = option(args, "meta_lr", 1e-3, float)
    batch = option(args, "batch", 2 if quick else 8, int)
    cache = option(args, "cache", None)
    train_data = option(args, "train_data", "counterfact:" + os.path.join(args.data_dir, "counterfact",
                                                                         "counterfact-train.json"))
    data = option(args, "data", "counterfact:" + os.path.join(args.data_dir, "counterfact", "counterfact-edit.json"))
    sets = method_sets(args)
    lm = load_lm(args)
    records = load_requests(data, n, skip_invalid=True)
    rows: list[dict] = []
    note = (f"{n} edit records in batches of {batch}; {steps} meta steps x {train_edits} train records "
            f"(paper: batches of 8192, trained to convergence) on {lm.display_name}")
    empty_cache = None  # the untrained row's own, empty cache: the untrained net shares AGRADE's cache key
    # (allow_untrained is not hashed), so with the shared cache it would load the trained AGRADE net
    for key in wanted:
        method, over, label, where = ROWS[key]
        overrides = {**sets.get(method, {}), "n_edits": train_edits, "meta_lr": meta_lr, **over}
        row_cache = cache
        if key == "untrained":
            empty_cache = empty_cache or tempfile.TemporaryDirectory(prefix="editbench-untrained-")
            row_cache = empty_cache.name
        else:
            train_hypernet(lm, method, {k: v for k, v in overrides.items() if k != "allow_untrained"}, train_data,
                           steps=steps, eval_every=steps, n_val=min(8, n), seed=args.seed, cache_dir=cache,
                           progress=False)
        cfg, _ = build_config(method, lm.name, overrides)
        editor = get_editor_class(method)(lm, cfg, seed=args.seed, cache_dir=row_cache)
        _check_trained(editor, label, trained=key != "untrained")
        scores = batch_scores(lm, editor, records, batch)
        tables = ("table1", "table2") if where == "both" else (where,)
        for t in tables:
            name = "Table 1 (CounterFact, LLaMA2-7B)" if t == "table1" else "Table 2 (ablations, LLaMA2 CounterFact)"
            paper_rows = TABLE1 if t == "table1" else TABLE2
            for i, m in enumerate(METRICS):
                paper = paper_rows[label][i] if label in paper_rows else math.nan
                rows.append(row(name, label, m, paper, 100.0 * scores[m],
                                note if key != "untrained" else f"{n} edit records in batches of {batch}; no "
                                f"training (the freshly initialised net)", n=n))
        diag = []
        if key in ("agrade", "eq4_projected"):
            diag = [(label, editor)]
        elif key == "untrained":  # both Eq. 4 references on the same untrained net (nothing to train)
            for ref in ("raw", "projected"):
                c, _ = build_config(method, lm.name, {**overrides, "projection_reference": ref})
                ed = get_editor_class(method)(lm, c, seed=args.seed, cache_dir=row_cache)
                _check_trained(ed, f"untrained, {ref} G_prev", trained=False)
                diag.append((f"untrained, {ref} G_prev", ed))
        for name, ed in diag:
            for d in eq4_diagnostics(lm, ed, records[:batch]):
                for metric in ("cos_prev", "removed"):
                    rows.append(row("Eq. 4 (what it removes)", f"{name} L{d['layer']}", metric, math.nan,
                                    d[metric], "one batch edit; cos with G_prev, share of ‖G‖ removed",
                                    unit="ratio"))
    if empty_cache is not None:
        empty_cache.cleanup()
    return pd.DataFrame(rows)


def _check_trained(editor, label: str, *, trained: bool) -> None:
    """A row is what its label says: a trained row edits with a trained net, the untrained row with a fresh one."""
    meta = editor.checkpoint_meta()
    if (meta is not None) != trained:
        from . import ReproduceError
        raise ReproduceError(f"row {label!r}: expected {'a trained' if trained else 'an untrained'} hypernetwork, "
                             f"got {'a checkpoint of step ' + str(meta.get('step')) if meta else 'none'}")
