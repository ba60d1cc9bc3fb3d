"""The CUDA check of issue 16, as ONE prepared script for a session that is lent a GPU (the `device` tool).

The device has no network and cannot receive the default model's 98 MB GGUF file, so the check uses a RANDOMLY
INITIALISED model of the default model's exact shape (SmolLM2-135M-Instruct: Llama, 30 layers, d 576, d_ff 1536,
its config.json) and the default tokenizer, both saved beside this script by ``--prepare`` on a machine that has
the default model. What it measures, per dtype (float32, bfloat16, float16) on CUDA:

* load: seconds to build the model on the device, its weights' memory;
* one edit per editor family (rome, memit, alphaedit, mose, ft, malmen) with the default model's presets
  (``mom2_n_tokens`` reduced so that covariances take seconds): seconds per edit (after one warm-up edit),
  peak CUDA memory of the edit, finiteness of the update;
* agreement: the same edit on the CPU in float32 vs CUDA float32 (TF32 off): cosine and relative difference of each
  delta (factor R for MOSE); tolerance stated below (AGREE_COS).

Prepare (here, on a machine with the default model), then run on the device (about 5-8 minutes)::

    python scripts/gpu_check.py --prepare                 # writes scripts/gpu_assets/ (git-ignored, ~3.5 MB)
    # device tool: run(command="PYTHONPATH=. python3 scripts/gpu_check.py --out $OUT", carry=["scripts/gpu_assets"],
    #                  timeout_s=540)

It writes ``gpu_check.json`` (and prints a table) under ``--out``. A CPU-only machine may run it with ``--device cpu
--dtypes float32 --methods rome`` to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "gpu_assets")
#: one method per editor family, and the overrides that keep one edit short on a 30-layer model
FAMILIES = {
    "rome": ("locate-then-edit", {}),
    "memit": ("locate-then-edit", {}),
    "alphaedit": ("constrained", {}),
    "mose": ("multiplicative", {}),
    "ft": ("fine-tuning", {}),
    "malmen": ("hypernetwork", {"allow_untrained": True}),
}
STATS_TOKENS = 20_000
#: CPU float32 vs CUDA float32 agreement we require of every delta (cosine)
AGREE_COS = 0.99


def prepare(out: str) -> None:
    """Save the default model's config.json and tokenizer (no weights) to ``out``."""
    import shutil

    from editors.models import default_snapshot_dir
    src = default_snapshot_dir()
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(src):
        if name != "model.safetensors":
            shutil.copy(os.path.join(src, name), os.path.join(out, name))
    print(f"wrote {sorted(os.listdir(out))} to {out}")


def random_default(device: str, dtype: torch.dtype, seed: int = 0):
    """A random model of the default model's shape with its tokenizer, as a LoadedModel named 'default' (so the
    default model's presets apply)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from editors.models import wrap_model
    cfg = AutoConfig.from_pretrained(ASSETS)
    tok = AutoTokenizer.from_pretrained(ASSETS)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model = model.to(device=device, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return wrap_model(model, tok, name="default", display_name=f"random SmolLM2-135M shape ({dtype})",
                      device=torch.device(device))


def edit_once(lm, method: str, overrides: dict, requests, seed: int = 0):
    from editors.presets import build_config
    from editors.registry import get_editor_class
    ov = dict(overrides)
    cls = get_editor_class(method)
    fields = {f["name"] for f in cls.config_cls.field_help()}
    if "mom2_n_tokens" in fields:
        ov["mom2_n_tokens"] = STATS_TOKENS
    if "context_templates" in fields:
        ov["context_templates"] = '["{}"]'  # no template generation with a random model
    if method in ("rect", "prune"):
        ov = {"base_overrides": ov}
    cfg, _ = build_config(method, "default", ov)
    editor = cls(lm, cfg, seed=seed)
    t0 = time.perf_counter()
    editor.prepare()
    prep = time.perf_counter() - t0
    return editor, prep


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepare", action="store_true", help="write the assets (config + tokenizer) and stop")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--methods", default=",".join(FAMILIES))
    ap.add_argument("--no-agreement", action="store_true", help="skip the CPU float32 reference edits")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(ASSETS)
        return 0
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("EDITBENCH_CACHE", os.path.join(args.out, "cache"))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from editors.base import apply_result
    from editors.data import builtin_requests
    requests = list(builtin_requests())[:3]
    methods = [m for m in args.methods.split(",") if m]
    report: dict = {"device": args.device, "torch": torch.__version__, "results": [], "agreement": [],
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    deltas_cuda32: dict[str, dict] = {}
    t_all = time.perf_counter()
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        t0 = time.perf_counter()
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        lm = random_default(args.device, dtype)
        sync(args.device)
        load_s = time.perf_counter() - t0
        weights_mb = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2 ** 20
        print(f"[{dname}] model on {args.device} in {load_s:.1f}s, weights {weights_mb:.0f} MB", flush=True)
        for m in methods:
            row = {"dtype": dname, "method": m, "family": FAMILIES.get(m, ("?",))[0], "load_s": load_s,
                   "weights_mb": weights_mb}
            try:
                editor, prep = edit_once(lm, m, FAMILIES.get(m, ("", {}))[1], requests)
                row["prepare_s"] = prep
                editor.edit(requests[:1])  # warm-up (kernels, caches)
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                sync(args.device)
                t1 = time.perf_counter()
                res = editor.edit(requests[1:2])
                sync(args.device)
                row["s_per_edit"] = time.perf_counter() - t1
                if args.device.startswith("cuda"):
                    row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
                row["finite"] = bool(res.is_finite())
                undo = apply_result(lm, res)
                undo(lm.model)
                row["update_dtypes"] = sorted({str(d.dtype) for d in [*res.deltas.values(), *res.factors.values()]})
                if dname == "float32":
                    deltas_cuda32[m] = {n: d.detach().double().cpu() for n, d in
                                        [*res.deltas.items(), *res.factors.items()]}
                row["ok"] = True
            except Exception as exc:  # report and go on: one failing method must not hide the others
                row["ok"] = False
                row["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            report["results"].append(row)
            print(json.dumps(row), flush=True)
        del lm
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if not args.no_agreement and deltas_cuda32 and args.device != "cpu":
        torch.set_num_threads(min(16, os.cpu_count() or 1))
        cpu = random_default("cpu", torch.float32)
        for m, ref in deltas_cuda32.items():
            try:
                editor, _ = edit_once(cpu, m, FAMILIES.get(m, ("", {}))[1], requests)
                editor.edit(requests[:1])  # the same sequence as on CUDA (the warm-up edit is not applied)
                res = editor.edit(requests[1:2])
                got = {n: d.detach().double() for n, d in [*res.deltas.items(), *res.factors.items()]}
                for n, d in ref.items():
                    c = got[n]
                    cos = float((c.flatten() @ d.flatten()) / (c.norm() * d.norm()).clamp_min(1e-300))
                    rel = float((c - d).norm() / d.norm().clamp_min(1e-300))
                    report["agreement"].append({"method": m, "param": n, "cos": cos, "rel_diff": rel,
                                                "ok": cos >= AGREE_COS or (m == "mose" and rel < 0.05)})
            except Exception as exc:
                report["agreement"].append({"method": m, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        for a in report["agreement"]:
            print(json.dumps(a), flush=True)
    report["seconds"] = time.perf_counter() - t_all
    report["agree_cos"] = AGREE_COS
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    bad = [r for r in report["results"] if not r.get("ok")] + [a for a in report["agreement"] if not a.get("ok")]
    print(f"done in {report['seconds']:.0f}s; {len(bad)} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
