"""Context-template benchmark: seconds to sample the ROME / MEMIT templates on an empty cache, and the first ROME edit.

For each spec (``--specs``, default ``rome,memit``) :func:`editors.templates.context_template_groups` runs on a fresh
cache folder (nothing is read from ``~/.cache/editbench``); the number of forward calls of the model is counted with
a forward hook. With ``--first-edit`` the ROME preset then edits CounterFact edit-split record 0 on another fresh
cache folder: ``prepare()`` (the templates; the preset needs no covariance) plus ``edit()``, which is what a user's
first edit costs. The model is loaded before any clock starts.

Run::

    python -m benchmarks.bench_templates --threads 1 --first-edit \\
        --data counterfact:../shared/data/counterfact/counterfact-edit.json

Measured: see docs/reference_agreement.md ("Context templates").
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from typing import Sequence

import torch


class _ForwardCounter:
    """Counts calls of ``module.forward`` while active."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.calls = module, 0

    def __enter__(self) -> "_ForwardCounter":
        def hook(module, args):
            self.calls += 1
        self._handle = self.module.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def time_templates(lm, specs: Sequence[str], seed: int = 0) -> list[dict]:
    """One row per spec: seconds and decoder forward calls of a fresh ``context_template_groups``."""
    from editors.templates import context_template_groups
    rows = []
    for spec in specs:
        with tempfile.TemporaryDirectory() as cache, _ForwardCounter(lm.model.base_model) as count:
            t0, c0 = time.perf_counter(), time.process_time()
            groups = context_template_groups(lm, seed, spec, cache_dir=cache)
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append({"what": f"templates {spec}", "seconds": secs, "cpu_seconds": cpu, "forwards": count.calls,
                     "templates": sum(len(g) for g in groups)})
    return rows


def time_first_rome_edit(lm, data: str, seed: int = 0) -> dict:
    """The ROME preset's first edit of the first request of ``data`` on an empty cache (prepare + edit)."""
    from editors.data import load_requests
    from editors.presets import build_config
    from editors.rome import ROMEEditor
    req = load_requests(data, 1)[0]
    cfg, _ = build_config("rome", lm.name)
    with tempfile.TemporaryDirectory() as cache:
        editor = ROMEEditor(lm, cfg, cache_dir=cache, seed=seed)
        t0, c0 = time.perf_counter(), time.process_time()
        editor.prepare()
        t_prep = time.perf_counter() - t0
        result = editor.edit([req])
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"what": "first ROME edit (prepare + edit)", "seconds": secs, "cpu_seconds": cpu,
            "prepare_seconds": t_prep, "steps": result.info.get("steps"), "target_prob": result.info.get("target_prob")}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", default="rome,memit", help="comma-separated template specs")
    ap.add_argument("--first-edit", action="store_true", help="also time the ROME preset's first edit")
    ap.add_argument("--data", default="counterfact:../shared/data/counterfact/counterfact-edit.json",
                    help="request source of --first-edit (its first record is edited)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from editors.models import load_model
    lm = load_model("default", device="cpu")
    rows = time_templates(lm, [s.strip() for s in args.specs.split(",") if s.strip()], args.seed)
    if args.first_edit:
        rows.append(time_first_rome_edit(lm, args.data, args.seed))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"threads {torch.get_num_threads()}, load average {load:.1f}")
    for r in rows:
        extra = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                          if k not in ("what", "seconds"))
        print(f"{r['what']:<36} {r['seconds']:8.2f} s   ({extra})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
