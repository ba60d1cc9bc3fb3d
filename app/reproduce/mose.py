"""MOSE (Xu, Ma, Peng, Sun, Ling, Gu; AAAI 2026; ../shared/papers/mose.txt) under its own protocol, scaled.

Protocol (section 6.1-6.2, Appendix B): single-sequential editing (one CounterFact record per edit, never rolled
back); after the last edit, every edited record is scored with teacher-forced token accuracy: reliability (edit
prompt), generalisation (paraphrases), locality (neighbourhood prompts: agreement with the model BEFORE editing,
Eq. 27), as the paper's 0-1 fractions.

Tables (``table`` column):

* ``Table 1 (CounterFact, single-sequential)``: ROME, MEMIT, RECT, EMMET, PRUNE, AlphaEdit, MOSE (``--option
  methods``; default ``memit,alphaedit,mose``) beside the paper's LLaMA3-8B numbers after 4000 edits; ours after
  ``n`` edits of the default model. Also the MOSE variants ``reference`` (the authors' code: fixed layers 4-8,
  residual target, λ = 15,000) and ``shared-target`` (one target optimisation per edit), no paper numbers.
* ``Fig. 2 (norm and condition number)``: per method and checkpoint, the edited matrices' Frobenius norm and
  condition number relative to the unedited ones (mean over edited layers), and beside them the drift ‖W−W0‖/‖W0‖
  and the preserved outputs' change (the paper's figure has no numbers; ``paper`` NaN). MOSE's norm and
  condition-number ratios are 1 by construction; the drift is what moves.
* ``λ / target size``: MOSE at several λ (``--option lams``, default ``300,3000,15000``, fixed layers 4-6): per edit
  the share of the requested change left unwritten (``fit_after`` of the top edit layer, 1 = nothing written), the
  largest rotation angle, the preserved outputs' change per edit, the length of the requested change against
  ``||W k||`` (a rotation moves ``W k`` by at most ``2 ||W k|| sin(θ/2)``) and efficacy after ``n`` edits.
* ``Table 3 (time per edit)``: seconds per edit on this machine (the paper: one A800; ours: the CPU, one thread) and
  the number of target optimisations per MOSE edit (3-4 with the paper's per-layer selection, 1 shared).

``--quick``: 2 edits, MOSE and MEMIT, λ 300 and 15000.
"""
from __future__ import annotations

import math
import os

import pandas as pd

from editors.data import load_requests

from ._sequential import check_options, method_sets, option, row, sequential_run

PAPER = "MOSE (Xu, Ma, Peng, Sun, Ling & Gu, AAAI 2026, 'Multiplicative Orthogonal Sequential Editing')"
DEFAULT_N = 10
OPTIONS = ("methods", "lams", "lambda_layers", "tables", "data", "variants")

#: Table 1 (LLaMA3-8B, CounterFact, 4000 single-sequential edits): reliability, generalization, locality
TABLE1 = {"ROME": (0.0, 0.0, 0.0), "MEMIT": (0.0, 0.0, 0.0), "RECT": (0.5688, 0.3288, 0.2517),
          "EMMET": (0.6398, 0.4937, 0.3253), "PRUNE": (0.7886, 0.7140, 0.5763),
          "AlphaEdit": (0.9018, 0.8260, 0.7831), "MOSE": (0.9887, 0.9863, 0.8972)}
NAMES = {"rome": "ROME", "memit": "MEMIT", "rect": "RECT", "emmet": "EMMET", "prune": "PRUNE",
         "alphaedit": "AlphaEdit", "mose": "MOSE"}
#: Table 3 (A800, seconds per edited sample)
TABLE3 = {"ROME": 12.09, "MEMIT": 16.16, "RECT": 12.88, "AlphaEdit": 18.53, "MOSE": 18.60}
METRICS = ("reliability", "generality", "locality")


def _mean(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(sum(xs) / len(xs)) if xs else math.nan


def _mose_covariances(lm, layers):
    from editors.stats import cached_layer_covariances
    return cached_layer_covariances(lm, layers)


def run(args) -> pd.DataFrame:
    from . import load_lm

    check_options(args, OPTIONS)
    n = 2 if args.quick else int(args.n or DEFAULT_N)
    methods = [m.strip() for m in option(args, "methods", "memit,mose" if args.quick else "memit,alphaedit,mose"
                                         ).split(",")]
    variants = [v.strip() for v in option(args, "variants", "" if args.quick else "reference,shared-target"
                                          ).split(",") if v.strip()]
    lams = [float(x) for x in option(args, "lams", "300,15000" if args.quick else "300,3000,15000").split(",")]
    tables = set(option(args, "tables", "table1,fig2,lambda,time").split(","))
    lambda_layers = option(args, "lambda_layers", "4,5,6")
    data = option(args, "data", "counterfact:" + os.path.join(args.data_dir, "counterfact", "counterfact-edit.json"))
    sets = method_sets(args)
    lm = load_lm(args)
    requests = load_requests(data, n, skip_invalid=True)
    checkpoints = sorted({max(1, n // 4), max(1, n // 2), n})
    covs = _mose_covariances(lm, range(lm.spec.n_layers))
    note = f"{n} sequential edits on {lm.display_name} (paper: 4000 on LLaMA3-8B)"
    rows: list[dict] = []
    runs: dict[tuple, dict] = {}

    def seq(method, variant="", extra=None):
        key = (method, variant, tuple(sorted((extra or {}).items())))
        if key not in runs:
            runs[key] = sequential_run(lm, method, requests, checkpoints=checkpoints, variant=variant,
                                       overrides={**sets.get(method, {}), **(extra or {})}, seed=args.seed,
                                       covariances=covs, margin=False)
        return runs[key]

    settings = [(m, "") for m in methods] + ([("mose", v) for v in variants] if "mose" in methods else [])
    if "table1" in tables or "fig2" in tables or "time" in tables:
        for method, variant in settings:
            out = seq(method, variant)
            name = NAMES.get(method, method) + (f" ({variant})" if variant else "")
            if "table1" in tables:
                final = out["checkpoints"][-1]["metrics"]
                for m in METRICS:
                    paper = TABLE1[NAMES[method]][METRICS.index(m)] if not variant and NAMES.get(method) in TABLE1 \
                        else math.nan
                    rows.append(row("Table 1 (CounterFact, single-sequential)", name, m, paper, final[m], note, n=n))
            if "fig2" in tables:
                for cp in out["checkpoints"]:
                    w = cp["weights"].values()
                    label = f"{name} @ {cp['n_edits']}"
                    for metric, vals in (("fro_rel", [s["fro"] / s["fro0"] for s in w]),
                                         ("cond_rel", [s["cond"] / s["cond0"] for s in w]),
                                         ("drift", [s["rel_change"] for s in w]),
                                         ("preserve", [s.get("preserve_change", math.nan) for s in w])):
                        rows.append(row("Fig. 2 (norm and condition number)", label, metric, math.nan,
                                        _mean(vals), "mean over edited matrices (figure: no numbers)",
                                        n=cp["n_edits"], unit="ratio"))
            if "time" in tables:
                nopt = [i.get("n_target_optimisations") for i in out["infos"] if "n_target_optimisations" in i]
                rows.append(row("Table 3 (time per edit)", name, "seconds",
                                TABLE3.get(NAMES.get(method, ""), math.nan) if not variant else math.nan,
                                out["seconds_per_edit"], "ours: CPU, one thread, shared machine; paper: A800",
                                unit="s"))
                if nopt:
                    rows.append(row("Table 3 (time per edit)", name, "target_optimisations", math.nan,
                                    _mean(nopt), "per edit"))

    if "lambda" in tables:
        for lam in lams:
            out = seq("mose", "", {"lam": lam, "layer_selection": "fixed", "layers": lambda_layers})
            tops = [info["layers"][str(max(int(k) for k in info["layers"]))] for info in out["infos"]]
            final = out["checkpoints"][-1]["metrics"]
            label = f"MOSE λ={lam:g} (layers {lambda_layers})"
            table = "λ / target size"
            z = [info.get("z", {}) for info in out["infos"]]
            rows += [
                row(table, label, "unwritten_share", math.nan, _mean([t["fit_after"] for t in tops]),
                    "‖RWK−V‖/‖WK−V‖ at the top layer, mean over edits (1 = nothing written)"),
                row(table, label, "rotation_deg", math.nan, _mean([t["rotation_deg"] for t in tops]),
                    "largest principal angle of R at the top layer"),
                row(table, label, "preserve_change_per_edit", math.nan,
                    _mean([_mean([v["preserve_change"] for v in info["layers"].values()]) for info in out["infos"]]),
                    "relative change of preserved outputs per layer per edit"),
                row(table, label, "requested_change", math.nan, _mean([zz.get("delta_norm_mean", math.nan)
                                                                       for zz in z]),
                    "‖δ‖ of the target (mean)"),
                row(table, label, "wk_norm", math.nan, _mean([zz.get("init_norm_mean", math.nan) for zz in z]),
                    "‖W k‖ = ‖v_init‖ at the top layer's FFN output (mean)"),
                row(table, label, "reliability", math.nan, final["reliability"], note, n=n),
            ]
    return pd.DataFrame(rows)
