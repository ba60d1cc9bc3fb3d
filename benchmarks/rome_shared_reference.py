"""ROME's defaults against EasyEdit's stored ROME update (../shared/reference/rome_easyedit_cf0.*): what the early
stop and the template sampling each change, on CounterFact edit-split record 0 (no EasyEdit needed).

Four edits with the JSON's hyper-parameters, crossing the templates (the JSON's 21, or the workbench's own sampled
ones, seed 0) with the early stop (none = the reference and the preset since v3, or ``--early-stop P``, default 0.95,
the preset's value until v2). Printed per edit: cos(ΔW, ΔW_EasyEdit), ||ΔW - ΔW_EasyEdit|| / ||ΔW_EasyEdit||,
||ΔW_EasyEdit|| / ||ΔW||, the v* steps and the target probability they reached. The model is left unchanged.

Run::

    python -m benchmarks.rome_shared_reference --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEM = os.path.join(ROOT, "..", "shared", "reference", "rome_easyedit_cf0")


def rows(lm, stem: str, early_stop: float, seed: int = 0) -> list[dict]:
    from safetensors.torch import load_file

    from editors.presets import build_config
    from editors.requests import make_request
    from editors.rome import ROMEEditor
    with open(stem + ".json", encoding="utf-8") as fh:
        ref = json.load(fh)
    ref_dW = load_file(stem + ".safetensors")["dW"].double()
    hp, r = ref["hparams"], ref["request"]
    req = make_request(source=stem + ".json", record=0, case_id=r["case_id"], prompt=r["prompt"],
                       subject=r["subject"], target_new=r["target_new"], target_true=r["ground_truth"])
    base = {"layer": hp["layers"][0],
            "v_num_grad_steps": hp["v_num_grad_steps"], "v_lr": hp["v_lr"], "v_weight_decay": hp["v_weight_decay"],
            "clamp_norm_factor": hp["clamp_norm_factor"], "kl_factor": hp["kl_factor"],
            "v_loss_layer": hp["v_loss_layer"], "mom2_adjustment": hp["mom2_adjustment"]}
    out = []
    for templates, source in (("the reference's", stem + ".json"), ("own (seed %d)" % seed, "rome")):
        for stop in (0.0, early_stop):
            cfg, _ = build_config("rome", lm.name, {**base, "context_templates": source, "early_stop_prob": stop},
                                  variant="reference")
            result = ROMEEditor(lm, cfg, seed=seed).edit([req])
            dW = result.deltas[lm.spec.mlp_out_weight(cfg.layer)].double()
            cos = float(torch.nn.functional.cosine_similarity(dW.flatten(), ref_dW.flatten(), dim=0))
            out.append({"templates": templates, "early_stop_prob": stop, "cos": cos,
                        "rel": float((dW - ref_dW).norm() / ref_dW.norm()), "ratio": float(ref_dW.norm() / dW.norm()),
                        "steps": result.info["steps"], "target_prob": result.info["target_prob"]})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", default=STEM, help="path of the reference files without .json/.safetensors")
    ap.add_argument("--early-stop", type=float, default=0.95, help="the early-stop probability to compare")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    for ext in (".json", ".safetensors"):
        if not os.path.isfile(args.reference + ext):
            ap.error(f"reference file {args.reference + ext} not found")
    torch.set_num_threads(args.threads)
    from editors.models import load_model
    lm = load_model("default", device="cpu")
    print(f"{'templates':<16} {'early stop':>10} {'cos':>12} {'rel':>9} {'ratio':>9} {'steps':>6} {'p(target)':>9}")
    for r in rows(lm, args.reference, args.early_stop):
        print(f"{r['templates']:<16} {r['early_stop_prob'] or 'none':>10} {r['cos']:12.9f} {r['rel']:9.2e} "
              f"{r['ratio']:9.4f} {r['steps']:6.0f} {r['target_prob']:9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
