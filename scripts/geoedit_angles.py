"""GeoEdit Fig. 3 on the embedded default model: per-neuron angles between τ_old and τ_new, raw vs latent.

One GeoEdit batch edit of the first ``--n`` built-in facts (``editors.data.load_requests("builtin", n)``); for every
neuron (``neuron_axis``; default the FFN neuron = a column of each edited MLP output projection, d_n = 576 on
SmolLM2-135M; ``--set neuron_axis=out`` for rows, d_n = 1536) the angle between the old-fact and
the new-fact task vectors in parameter space ("raw") and between their auto-encoder codes ("latent", the space
GeoEdit classifies in). Prints mean, std and the share within [85°, 95°] (``analysis.angles.angle_summary``) for both,
the latent class counts and the Spearman agreement of latent and raw angles. The paper (Sec. 5.3): raw angles
concentrate near 90°, latent ones spread over 0-180°.

``--sweep``: how the trained auto-encoder maps raw angles (``analysis.angles.latent_angle_sweep`` on pairs built from
the edit's own neuron task vectors at raw 0/30/60/85/90/95/120/150/180°): latent mean / min / max per raw angle.

Usage:
    python scripts/geoedit_angles.py [--n 8] [--source builtin] [--layers 24] [--device cpu] [--sweep]
        [--set key=value ...]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from analysis.angles import angle_summary, latent_angle_sweep, neuron_angle_frame
from editors.data import load_requests
from editors.geoedit import GeoEditEditor
from editors.models import load_model
from editors.presets import build_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="number of facts edited in one batch")
    ap.add_argument("--source", default="builtin", help="editors.data.load_requests source (default: builtin)")
    ap.add_argument("--layers", default=None, help="comma-separated layers (MLP output projections; default: "
                                                   "GeoEdit's default, 24)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="GeoEdit config override")
    ap.add_argument("--sweep", action="store_true", help="also map a raw-angle sweep through the trained AE")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    overrides = {"layers": args.layers} if args.layers else {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        overrides[k] = v
    cfg, _ = build_config("geoedit", "default", overrides, use_preset=False)
    requests = load_requests(args.source, args.n)
    lm = load_model("default", device=args.device)
    started = time.perf_counter()
    result, details = GeoEditEditor(lm, cfg, seed=args.seed).edit_with_details(requests)
    art = result.artifacts
    frame = neuron_angle_frame(art["raw_angle"], art["latent_angle"], art["neuron_class"])
    print(f"GeoEdit angles on {lm.display_name}: {len(requests)} facts from {args.source}, layers {cfg.layers}, "
          f"{result.info['n_neurons']} neurons ({'rows' if result.info['neuron_axis'] == 'out' else 'columns'}, "
          f"d_n = {result.info['d_n']}), latent {result.info['latent_dim']}, "
          f"edit {time.perf_counter() - started:.0f}s")
    print(f"{'space':8s} {'mean':>8s} {'std':>8s} {'share 85-95':>12s} {'<85':>7s} {'>95':>7s} {'n':>6s}")
    for space in ("raw", "latent"):
        s = angle_summary(frame.loc[frame["space"] == space, "angle"].to_numpy())
        print(f"{space:8s} {s['mean']:8.2f} {s['std']:8.2f} {s['share_85_95']:12.3f} {s['share_below_85']:7.3f} "
              f"{s['share_above_95']:7.3f} {s['n']:6d}")
    print("latent classes:", result.info["class_counts"], f"({result.info['variant']})")
    print(f"Spearman(latent, raw) = {result.info['angle_spearman']:.3f}; |τ_edit|/|τ_new| = "
          f"{result.info['edit_to_new_norm']:.3f}")
    print("AE relative reconstruction error:", {k: round(v, 3) for k, v in result.info["ae_recon_rel_error"].items()})
    print("fine-tuning loss old: %.3f -> %.3f, new: %.3f -> %.3f" % (
        result.info["old"]["loss_initial"], result.info["old"]["loss_final"], result.info["new"]["loss_initial"],
        result.info["new"]["loss_final"]))
    if args.sweep:
        X = torch.cat([details.rows["old"], details.rows["new"]]) / details.scale
        sweep = latent_angle_sweep(details.ae.encode, X, n_pairs=200, seed=args.seed)
        g = sweep.groupby("raw")["latent"]
        print("raw -> latent (200 pairs built from the task vectors):")
        for raw, mean, lo, hi in zip(g.mean().index, g.mean(), g.min(), g.max()):
            print(f"  {raw:6.1f} -> mean {mean:6.2f}  min {lo:6.2f}  max {hi:6.2f}")
        print(f"  max |latent - raw| = {(sweep['latent'] - sweep['raw']).abs().max():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
