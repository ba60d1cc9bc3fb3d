"""Default-model check of MALMEN / AGRADE training: held-in edit success after a short run vs the untrained net.

    python -m benchmarks.bench_hypernet [--method agrade] [--steps 40] [--n-edits 4] [--meta-lr 1e-3]
                                        [--n-held 8] [--cache DIR] [--set KEY=VALUE ...]

Loads the default model once; scores a batch edit of ``--n-held`` HELD-IN records (the first records of the
training data, seen during training) with the untrained hypernetwork (``allow_untrained``) and then after training
``--steps`` meta steps (:func:`app.train.train_hypernet`, checkpoints in ``--cache``, a temporary folder by
default so the user's cache is not touched). Prints ES / GS / LS / Editing Score (tf_token_acc) for both, the
training time and seconds per meta step. Expected: trained ES well above untrained ES. Not a unit test: on a shared
2-core CPU a meta step of SmolLM2-135M takes seconds, so this runs for minutes.

Measured (2026-11-22, 2-core CPU shared with one other job, default SmolLM2-135M-Instruct, defaults except
n_edits 8 and meta_lr 1e-3, ``--steps 200 --n-held 16 --eval-data counterfact:../shared/data/counterfact/
counterfact-edit.json --eval-n 200``), tf_token_acc, batch editing in batches of 8 (model restored between batches):

    method  training        200 edit-split records: ES / GS / LS (Editing Score)   16 held-in train records
    agrade  475 s (2.4 s/step)   0.91 / 0.30 / 0.34 (0.41)                        0.75 / 0.29 / 0.46 (0.43)
    malmen  482 s (2.4 s/step)   0.68 / 0.21 / 0.53 (0.37)                        0.56 / 0.26 / 0.71 (0.43)
    untrained (either)           0.05 / 0.03 / 1.00 (0.06)                        0.05 / 0.03 / 1.00 (0.06)

AGRADE edits more reliably than MALMEN with the same budget (the paper's claim), at a cost in locality on this small
model and budget.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="agrade", choices=("agrade", "malmen"))
    ap.add_argument("--data", default="counterfact:" + os.path.join(ROOT, "..", "shared", "data", "counterfact",
                                                                  "counterfact-train.json"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--n-edits", type=int, default=4, help="records per meta step")
    ap.add_argument("--meta-lr", type=float, default=1e-3)
    ap.add_argument("--n-held", type=int, default=8, help="held-in records scored (the first training records)")
    ap.add_argument("--cache", default=None, help="checkpoint root (default: a temporary folder)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--model", default="default")
    ap.add_argument("--eval-data", default=None,
                    help="also score batch edits of these records (e.g. counterfact:../shared/data/counterfact/"
                         "counterfact-edit.json), untrained and trained, the model restored between batches")
    ap.add_argument("--eval-n", type=int, default=200, help="records of --eval-data (default 200)")
    ap.add_argument("--eval-batch", type=int, default=None, help="records per batch edit (default: --n-edits)")
    args = ap.parse_args(argv)

    from app.train import batch_scores, train_hypernet, validate_edits
    from editors.base import ConfigError
    from editors.data import load_requests
    from editors.fields import parse_sets
    from editors.models import load_model
    from editors.presets import build_config
    from editors.registry import get_editor_class

    try:
        overrides = parse_sets(args.sets)
    except ConfigError as exc:
        ap.error(str(exc))
    overrides.update({"n_edits": args.n_edits, "meta_lr": args.meta_lr})
    cache = args.cache or tempfile.mkdtemp(prefix="bench_hypernet_")
    lm = load_model(args.model)
    cls = get_editor_class(args.method)
    held = load_requests(args.data, args.n_held, skip_invalid=True)
    from editors.hypernet import checkpoint_dir

    cfg, _ = build_config(args.method, lm.name, overrides)
    records = load_requests(args.eval_data, args.eval_n, skip_invalid=True) if args.eval_data else []
    size = args.eval_batch or args.n_edits
    evaluation: dict = {"data": args.eval_data, "records": len(records), "batch": size} if records else {}
    before, t_edit = None, float("nan")
    # the untrained figures are taken BEFORE training: an editor finds a trained checkpoint lazily, so one built
    # with allow_untrained would use the trained net once the checkpoint exists
    if os.path.exists(checkpoint_dir(lm, args.method, cfg, cache)):
        print(f"note: {cache} already holds a checkpoint for this config; untrained figures skipped", file=sys.stderr)
    else:
        untrained = cls(lm, build_config(args.method, lm.name, {**overrides, "allow_untrained": True})[0],
                        cache_dir=cache)
        t0 = time.perf_counter()
        before = validate_edits(lm, untrained, held)
        t_edit = time.perf_counter() - t0
        if records:
            t1 = time.perf_counter()
            evaluation["untrained"] = {**batch_scores(lm, untrained, records, size),
                                       "seconds": round(time.perf_counter() - t1, 1)}
    out = train_hypernet(lm, args.method, overrides, args.data, steps=args.steps, eval_every=args.steps, n_val=8,
                         cache_dir=cache, progress=True)
    trained = cls(lm, cfg, cache_dir=cache)
    after = validate_edits(lm, trained, held)
    if records:
        t1 = time.perf_counter()
        evaluation["trained"] = {**batch_scores(lm, trained, records, size),
                                 "seconds": round(time.perf_counter() - t1, 1)}
    report = {"method": args.method, "steps": out["step"], "train_seconds": round(out["seconds"], 1),
              "seconds_per_step": round(out["seconds"] / max(1, out["step"] - out["resumed_from"]), 2),
              "edit_seconds_untrained": round(t_edit, 1), "held_in_untrained": before, "held_in_trained": after,
              "last_train_row": out["history"][-1] if out["history"] else None, "checkpoint": out["path"],
              "evaluation": evaluation}
    print(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
