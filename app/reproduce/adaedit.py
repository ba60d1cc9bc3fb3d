"""AdaEdit (Li & Chu; ../shared/papers/adaedit.txt) under its own protocol, scaled to a small CPU.

Protocol (the paper's section 5 and Appendix E): continuous editing, ONE CounterFact record per edit, never rolled
back; after the last edit every edited record is scored with ROME's CounterFact suite (prob_margin): efficacy =
share of edit prompts with P(new) > P(true), generalisation = the same on the paraphrases, specificity = share of
neighbourhood prompts with P(true) > P(new) (the paper's pre-edit specificity 77.9 / 88.7 is only possible under
this definition, not as agreement with the unedited model). Percent, as the paper prints.

Tables (``table`` column):

* ``Table 2 (CounterFact, Llama-3 8B)``: Pre-edited, MEMIT, AlphaEdit, AdaEdit (and any ``--option methods``
  of ROME, RECT, PRUNE), plus the row ``AdaEdit (residual-stream)`` (the preset variant measuring the layer loop's
  residual on the residual stream; no paper number). The paper: 3000 edits on Llama-3 8B; ours: ``n`` edits on the
  default model.
* ``Table 4 (norm change, Llama-2 7B, 100 edits)``: per edited layer of MEMIT, PMET and AdaEdit, the original
  Frobenius norm, the current one and the percent change after ``n`` edits, beside the paper's at 100 edits.
* ``Table 1 (weight statistics)``: max / min / mean / median / norm of MEMIT's and AdaEdit's last edit layer at the
  checkpoints (the paper's rows are edit counts 0, 1, 5, 10, 50, 100, ...; the paper's values at the same count).
* ``Fig. 4b / 5 (sparsification)``: efficacy / generalisation / specificity after ``n`` edits of AdaEdit's
  perturbation with the strategies vanilla (none), DR (random drop 20%), Top-k% (20%) and SR (SRFusion): the paper
  applies them to MEMIT on Llama-2 7B and gives a figure (no numbers: ``paper`` is NaN); here they are AdaEdit's
  own ``sparsify`` options on its PMET-FFN perturbation.

Options: ``methods`` (comma list for Table 2, default ``memit,alphaedit,adaedit``), ``strategies`` (default
``none,random_drop,topk_magnitude,sr``), ``tables`` (comma list of ``table2,norms,stats,sparsify``; default all),
``data`` (default ``counterfact:<data_dir>/counterfact/counterfact-edit.json``). ``--quick``: 2 edits, AdaEdit and
MEMIT only, strategies none and sr.
"""
from __future__ import annotations

import math
import os

import pandas as pd

from editors.data import load_requests

from ._sequential import check_options, method_sets, option, row, sequential_run

PAPER = "AdaEdit (Li & Chu, 'AdaEdit: Advancing Continuous Knowledge Editing For Large Language Models')"
DEFAULT_N = 10
OPTIONS = ("methods", "strategies", "tables", "data")

#: Table 2 / Table 7 (Llama-3 8B, CounterFact, 3000 continuous edits): efficacy, generalisation, specificity (%)
TABLE2 = {
    "Pre-edited": (10.3, 11.5, 88.7), "ROME": (18.6, 9.4, 1.3), "MEMIT": (27.5, 13.7, 14.1),
    "RECT": (76.7, 42.6, 42.8), "PRUNE": (52.8, 23.3, 29.9), "AlphaEdit": (97.2, 90.9, 68.5),
    "AdaEdit": (97.3, 91.2, 68.2),
}
NAMES = {"rome": "ROME", "memit": "MEMIT", "rect": "RECT", "prune": "PRUNE", "alphaedit": "AlphaEdit",
         "adaedit": "AdaEdit", "pmet": "PMET"}
#: Table 4 (Llama-2 7B, 100 edits): percent norm change per layer 4..8
TABLE4 = {"MEMIT": (3.832, 3.335, 3.384, 4.376, 8.621), "PMET": (0.127, 0.065, 0.053, 0.075, 0.194)}
#: Table 1 (Llama-2 7B): MEMIT's edited-layer statistics at edit counts (max, min, mean, median, norm)
TABLE1_MEMIT = {0: (0.70, -0.94, 2.34e-06, 3.99e-06, 116.57), 1: (0.70, -0.94, 2.34e-06, 3.53e-06, 116.59),
                10: (0.70, -0.94, 1.96e-06, 2.98e-06, 116.91), 50: (0.70, -0.90, 2.02e-06, 1.70e-06, 118.26),
                100: (0.70, -0.89, 1.98e-06, 2.03e-06, 121.68)}
STRATEGY_NAMES = {"none": "vanilla", "random_drop": "DR (20%)", "topk_magnitude": "Top-k% (20%)", "sr": "SR"}
METRICS = ("efficacy", "generalization", "specificity")


def _pct(v: float) -> float:
    return 100.0 * v if v is not None and not math.isnan(v) else math.nan


def run(args) -> pd.DataFrame:
    from . import load_lm
    from ._sequential import margin_metrics

    check_options(args, OPTIONS)
    n = 2 if args.quick else int(args.n or DEFAULT_N)
    methods = option(args, "methods", "memit,adaedit" if args.quick else "memit,alphaedit,adaedit").split(",")
    strategies = option(args, "strategies", "none,sr" if args.quick else "none,random_drop,topk_magnitude,sr"
                        ).split(",")
    tables = set(option(args, "tables", "table2,norms,stats,sparsify").split(","))
    data = option(args, "data", "counterfact:" + os.path.join(args.data_dir, "counterfact", "counterfact-edit.json"))
    sets = method_sets(args)
    lm = load_lm(args)
    requests = load_requests(data, n, skip_invalid=True)
    checkpoints = sorted({c for c in (1, 5, 10, 50, 100) if c <= n} | {n})
    rows: list[dict] = []
    note = f"{n} continuous edits on {lm.display_name} (paper: 3000 on Llama-3 8B)"
    runs: dict[str, dict] = {}

    def seq(method, variant="", extra=None):
        key = f"{method}/{variant}/{sorted((extra or {}).items())}"
        if key not in runs:
            over = {**sets.get(method, {}), **(extra or {})}
            runs[key] = sequential_run(lm, method, requests, checkpoints=checkpoints, variant=variant,
                                       overrides=over, seed=args.seed, tf=False)
        return runs[key]

    if "table2" in tables:
        pre = margin_metrics(lm, requests)
        for m in METRICS:
            rows.append(row("Table 2 (CounterFact, Llama-3 8B)", "Pre-edited", m,
                            TABLE2["Pre-edited"][METRICS.index(m)], _pct(pre[m]), f"{n} records, unedited"))
        for method in methods:
            out = seq(method.strip())
            final = out["checkpoints"][-1]["metrics"]
            name = NAMES.get(method.strip(), method.strip())
            for m in METRICS:
                paper = TABLE2[name][METRICS.index(m)] if name in TABLE2 else math.nan
                rows.append(row("Table 2 (CounterFact, Llama-3 8B)", name, m, paper, _pct(final[m]), note, n=n))
        if "adaedit" in [m.strip() for m in methods]:
            out = seq("adaedit", "residual-stream")
            final = out["checkpoints"][-1]["metrics"]
            for m in METRICS:
                rows.append(row("Table 2 (CounterFact, Llama-3 8B)", "AdaEdit (residual-stream)", m, math.nan,
                                _pct(final[m]), note + "; residual measured on the stream (not in the paper)", n=n))

    if "norms" in tables:
        for method in ("memit", "pmet", "adaedit"):
            out = seq(method)
            last = out["checkpoints"][-1]
            for name, st in sorted(last["weights"].items(), key=lambda kv: lm.spec.layer_of(kv[0])):
                layer = lm.spec.layer_of(name)
                label = f"{NAMES[method]} L{layer}"
                paper = TABLE4.get(NAMES[method], ())
                idx = layer - 4
                pp = paper[idx] if 0 <= idx < len(paper) else math.nan
                rows.append(row("Table 4 (norm change, Llama-2 7B, 100 edits)", label, "original", math.nan,
                                st["fro0"], "Frobenius norm of W0"))
                rows.append(row("Table 4 (norm change, Llama-2 7B, 100 edits)", label, "current", math.nan,
                                st["fro"], f"after {last['n_edits']} edits"))
                rows.append(row("Table 4 (norm change, Llama-2 7B, 100 edits)", label, "perc_change", pp,
                                100.0 * abs(st["fro"] - st["fro0"]) / st["fro0"],
                                f"ours after {last['n_edits']} edits, paper after 100", unit="%"))
                rows.append(row("Table 4 (norm change, Llama-2 7B, 100 edits)", label, "drift_pct", math.nan,
                                100.0 * st["rel_change"], "‖W−W0‖/‖W0‖ (not in the paper)", unit="%"))

    if "stats" in tables:
        for method in ("memit", "adaedit"):
            out = seq(method)
            for cp in out["checkpoints"]:
                name = max(cp["weights"], key=lambda p: lm.spec.layer_of(p))
                st = cp["weights"][name]
                label = f"{NAMES[method]} {cp['n_edits']} edits (L{lm.spec.layer_of(name)})"
                paper = TABLE1_MEMIT.get(cp["n_edits"]) if method == "memit" else None
                for i, metric in enumerate(("max", "min", "mean", "median")):
                    rows.append(row("Table 1 (weight statistics)", label, metric,
                                    paper[i] if paper else math.nan, st[metric], "edited layer, canonical W"))
                rows.append(row("Table 1 (weight statistics)", label, "norm", paper[4] if paper else math.nan,
                                st["fro"], "Frobenius norm"))

    if "sparsify" in tables:
        for strategy in strategies:
            strategy = strategy.strip()
            out = seq("adaedit", "", {} if strategy == "sr" else {"sparsify": strategy})  # sr: the preset
            final = out["checkpoints"][-1]["metrics"]
            for m in METRICS:
                rows.append(row("Fig. 4b / 5 (sparsification)", STRATEGY_NAMES.get(strategy, strategy), m,
                                math.nan, _pct(final[m]),
                                f"AdaEdit's PMET-FFN perturbation, {n} edits (paper: MEMIT, 500 edits, a figure)",
                                n=n))
    return pd.DataFrame(rows)
