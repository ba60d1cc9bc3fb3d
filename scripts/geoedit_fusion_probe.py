"""Which part of GeoEdit's importance fusion costs the edit on the default model: the paper's method, then fixed
(α, β) pairs for every neuron on the SAME two fine-tunings (GeoEditEditor.edit_with_details(runs=...)), each scored
by teacher-forced reliability / generality / locality (EVALUATION.md ``tf_token_acc``) on the first ``--n``
CounterFact edit records, edited as one batch. Measured results: docs/reproductions.md (GeoEdit).

Usage:
    python scripts/geoedit_fusion_probe.py [--n 16] [--pairs 0.5:0.5,0.5:1,0.3:0.5,0:1,1:1] [--threads 1]
"""
from __future__ import annotations

import argparse

import torch

from analysis.evaluation import TF, evaluate_requests, locality_pairs, locality_reference, summarize
from app.reproduce.geoedit import load_dataset
from editors.base import apply_result
from editors.models import load_model
from editors.presets import build_config
from editors.registry import get_editor_class


def _pairs(text: str) -> list[tuple[float, float]]:
    out = []
    for item in text.split(","):
        a, sep, b = item.partition(":")
        if not sep:
            raise SystemExit(f"--pairs: expected ALPHA:BETA, got {item!r}")
        out.append((float(a), float(b)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="CounterFact edit records, one batch")
    ap.add_argument("--pairs", default="0.5:0.5,0.5:1,0.3:0.5,0:1,1:1", help="fixed ALPHA:BETA pairs, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default="../shared/data")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_model("default")
    requests = load_dataset("counterfact", args.n, args.data_dir)
    reference = locality_reference(lm, locality_pairs(requests))
    cls = get_editor_class("geoedit")

    def score(result) -> str:
        undo = apply_result(lm, result)
        try:
            s = summarize(evaluate_requests(lm, requests, reference, protocols=(TF,)))
        finally:
            undo(lm.model)
        return " / ".join(f"{100 * s[(m, TF)]:.1f}" for m in ("reliability", "generality", "locality"))

    config, _ = build_config("geoedit", "default", {}, use_preset=False)
    result, details = cls(lm, config, seed=0).edit_with_details(requests)
    print(f"paper's method ({result.info['variant']}): rel / gen / loc {score(result)}, α mean "
          f"{result.artifacts['alpha'].mean():.3f}, β mean {result.artifacts['beta'].mean():.3f}, |τ_edit|/|τ_new| "
          f"{result.info['edit_to_new_norm']:.3f}", flush=True)
    for alpha, beta in _pairs(args.pairs):
        config, _ = build_config("geoedit", "default", {"fusion": "fixed", "fixed_alpha": alpha, "fixed_beta": beta},
                                 use_preset=False)
        result, _ = cls(lm, config, seed=0).edit_with_details(requests, runs=details.runs)
        print(f"fixed α={alpha:g} β={beta:g}: rel / gen / loc {score(result)}, |τ_edit|/|τ_new| "
              f"{result.info['edit_to_new_norm']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
