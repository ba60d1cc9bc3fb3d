"""Agreement with the reference implementation EasyEdit (zjunlp/EasyEdit) on identical inputs: ROME, MEMIT,
AlphaEdit, EMMET and PMET, ΔW per layer (docs/reference_agreement.md says how to set EasyEdit up and what this gave).

Both sides get the same model weights, requests, context templates, covariance statistics and mapped
hyper-parameters:

1. (this interpreter) the default model is saved as a Hugging Face folder whose name contains "llama" (EasyEdit
   picks its code path from the model path), the workbench's cached statistics of every layer needed are written
   in EasyEdit's cache layout (:func:`app.export_stats.export_easyedit_stats`, as ``python -m app export-stats``),
   and each method's config (its preset, the variant ``--variant``, default ``reference``) is resolved, with its
   context templates (sampled by the workbench, or ``--rome-templates FILE``) made explicit; EasyEdit's
   hyper-parameters are mapped from the ``reference`` variant (EasyEdit always computes the reference), so
   ``--variant none`` measures what the preset as shipped does differently; everything goes into
   ``WORK/inputs.json``;
2. (EasyEdit's interpreter, a subprocess: ``--easyedit-python``) this same file runs with ``--reference-side``:
   it imports ``easyeditor`` from ``--easyedit-src``, sets the tokenizer up as EasyEdit's editor does for a llama
   path (pad = eos, right padding), hands EasyEdit the templates through its ``CONTEXT_TEMPLATES_CACHE``, calls
   ``apply_<method>_to_model`` and writes ΔW = W_after - W_before (and the z its ``compute_z`` / ``compute_zs``
   returned) to ``WORK/reference_<method>.safetensors``;
3. (this interpreter) the workbench's editor runs on the same inputs and the table is printed: per layer
   ``1 - cos``, ``rel = ||ΔW_ours - ΔW_ref|| / ||ΔW_ref||`` and ``ratio = ||ΔW_ref|| / ||ΔW_ours||``.

PMET on EasyEdit: run with right padding and the target's leading space (EasyEdit's stock PMET call on a llama path
leaves LEFT padding, so its z optimisation reads pad positions and returns NaN, and it adds the space only for
"gpt" models); ``--pmet-as-is`` runs the stock call. AlphaEdit: EasyEdit computes its projector from the exported
statistics (``P_loc`` names a missing file) and writes it into WORK. Nothing is written into the repository.

Without ``--easyedit-python`` the reference outputs already in WORK are compared (e.g. the preset as shipped after
a reference run: the reference side's inputs do not depend on ``--variant``); an output made from other inputs is
refused (each records a digest of its inputs). Run (about 10 minutes on two cores for all five methods, one request)::

    python -m benchmarks.compare_reference --methods rome,memit,alphaedit,emmet,pmet --n 1 --work /tmp/ee_work \\
        --easyedit-python /path/to/venv/bin/python --easyedit-src /path/to/EasyEdit --out agreement.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, Sequence

import torch

METHODS = ("rome", "memit", "alphaedit", "emmet", "pmet")
CF_EDIT = "../shared/data/counterfact/counterfact-edit.json"
#: EasyEdit 14cea82: module, apply function and hyper-parameter class per method
EASYEDIT = {
    "rome": ("easyeditor.models.rome.rome_main", "apply_rome_to_model", "ROMEHyperParams", "ROME"),
    "memit": ("easyeditor.models.memit.memit_main", "apply_memit_to_model", "MEMITHyperParams", "MEMIT"),
    "alphaedit": ("easyeditor.models.alphaedit.AlphaEdit_main", "apply_AlphaEdit_to_model", "AlphaEditHyperParams",
                  "AlphaEdit"),
    "emmet": ("easyeditor.models.emmet.emmet_main", "apply_emmet_to_model", "EMMETHyperParams", "EMMET"),
    "pmet": ("easyeditor.models.pmet.pmet_main", "apply_pmet_to_model", "PMETHyperParams", "PMET"),
}
#: only EasyEdit's multimodal editors use these, but ``import easyeditor`` imports every editor
STANDIN_PACKAGES = ("timm", "torchvision", "cv2")

log = logging.getLogger("compare_reference")


# =================================================================================================================
# inputs (workbench interpreter)
# =================================================================================================================
def _digest(obj) -> str:
    """sha256 of a JSON value: identifies the inputs a reference output was made from."""
    import hashlib
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _module_template(spec, name_of_layer0: str) -> str:
    """``model.layers.0.mlp.down_proj`` -> ``model.layers.{}.mlp.down_proj`` (EasyEdit's ``*_module_tmp``)."""
    prefix = spec.layer(0)
    assert name_of_layer0.startswith(prefix), name_of_layer0
    return spec.layer("{}") + name_of_layer0[len(prefix):]


def _lm_head_module(lm) -> str:
    """EasyEdit reads ``<lm_head_module>.weight`` as the unembedding: the input embedding when they are tied (then
    ``lm_head.weight`` is not among the named parameters)."""
    out = lm.model.get_output_embeddings().weight
    for name, module in lm.model.named_modules():
        if getattr(module, "weight", None) is out and isinstance(module, torch.nn.Embedding):
            return name
    for name, module in lm.model.named_modules():
        if module is lm.model.get_output_embeddings():
            return name
    raise ValueError("no module holds the unembedding")


def easyedit_hparams(method: str, cfg, lm, model_dir: str, stats: dict, work: str) -> dict:
    """EasyEdit hyper-parameters that compute what the workbench config ``cfg`` computes (names as in EasyEdit's
    hparams dataclasses; values from the config)."""
    spec = lm.spec
    layers = [int(cfg.layer)] if method == "rome" else [int(x) for x in cfg.layers]
    hp: dict[str, Any] = {
        "alg_name": EASYEDIT[method][3], "model_name": model_dir, "device": "cpu", "layers": layers,
        "layer_selection": "all", "fact_token": "subject_last", "v_num_grad_steps": cfg.v_num_grad_steps,
        "v_lr": cfg.v_lr, "v_loss_layer": spec.n_layers - 1 if cfg.v_loss_layer < 0 else cfg.v_loss_layer,
        "v_weight_decay": cfg.v_weight_decay, "clamp_norm_factor": cfg.clamp_norm_factor,
        "kl_factor": cfg.kl_factor, "mom2_adjustment": bool(getattr(cfg, "mom2_adjustment", True)),
        "rewrite_module_tmp": _module_template(spec, spec.mlp_out_module(0)),
        "layer_module_tmp": spec.layer("{}"), "mlp_module_tmp": _module_template(spec, spec.mlp_module(0)),
        "attn_module_tmp": _module_template(spec, spec.attn_out_module(0)).rsplit(".", 1)[0],
        "ln_f_module": spec.final_norm, "lm_head_module": _lm_head_module(lm), "model_parallel": False,
        **stats,
    }
    if method == "rome":
        hp["context_template_length_params"] = [[5, 10], [10, 10]]  # unused: the templates are given
    else:  # a required field of every MEMIT-family hparams class; AlphaEdit's solve does not use it
        hp["mom2_update_weight"] = float(getattr(cfg, "mom2_update_weight", 0.0))
    if method == "emmet":
        hp.update(emmet_lambda=cfg.emmet_lambda, update_norm_lambda=cfg.update_norm_lambda)
    if method == "alphaedit":
        if cfg.nullspace_rule != "absolute":
            log.warning("alphaedit: EasyEdit only has the absolute null-space rule; the workbench runs %r",
                        cfg.nullspace_rule)
        hp.update(nullspace_threshold=cfg.nullspace_threshold, L2=cfg.alpha,
                  P_loc=os.path.join(work, "no_such_projector.pt"))
    if method == "pmet":
        # PMET's compute_zs adds its deltas to the OUTPUTS of these modules: the MLP (down_proj) and attention (o_proj)
        hp.update(nll_loss_factor=1.0, rewrite_module_tmps=[hp["rewrite_module_tmp"]],
                  mlp_module_tmp=hp["rewrite_module_tmp"],
                  attn_module_tmp=_module_template(spec, spec.attn_out_module(0)))
    return hp


def method_config(method: str, model_name: str, variant: str | None, templates):
    """The workbench config of ``method``: preset (+ ``variant``) with the explicit ``templates``."""
    from editors.presets import build_config
    from editors.registry import get_editor_class
    cls = get_editor_class(method)
    values = {"context_templates": templates} if templates is not None else {}
    return cls, build_config(cls.name, model_name, values, variant=variant or "")[0]


def prepare_inputs(lm, methods: Sequence[str], requests, work: str, *, variant: str | None, seed: int,
                   rome_templates: str | None, pmet_as_is: bool) -> dict:
    """Model folder, exported statistics and ``inputs.json`` (module docstring, step 1)."""
    from app.export_stats import export_easyedit_stats
    from editors.templates import resolve_context_templates
    model_dir = os.path.join(work, "models", "llama-" + lm.display_name.lower().replace(" ", "-"))
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        lm.model.save_pretrained(model_dir)
        lm.tokenizer.save_pretrained(model_dir)
    plan, layers, corpus = {}, set(), None
    for method in methods:
        _, cfg = method_config(method, lm.name, variant, None)
        source = rome_templates if (method == "rome" and rome_templates) else cfg.context_templates
        groups = resolve_context_templates(lm, source, seed)
        templates = [t for g in groups for t in g] if method == "rome" else groups
        _, cfg = method_config(method, lm.name, variant, templates)
        # EasyEdit always runs the reference: its hyper-parameters come from the 'reference' variant
        _, ref_cfg = method_config(method, lm.name, "reference", templates)
        plan[method] = {"config": cfg, "reference_config": ref_cfg, "templates": templates}
        layers.update([cfg.layer] if method == "rome" else cfg.layers)
        corpus = (cfg.corpus, cfg.mom2_n_tokens)
    stats_dir = os.path.join(work, "stats")
    manifest = export_easyedit_stats(lm, sorted(layers), stats_dir, model_dir_name=os.path.basename(model_dir),
                                     dtype="float64", corpus=corpus[0], n_tokens=corpus[1])
    stats = {k: manifest["hparams"][k] for k in ("stats_dir", "mom2_dataset", "mom2_n_samples", "mom2_dtype")}
    raw = [{"case_id": r.case_id, "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
            "ground_truth": r.target_true} for r in requests]
    inputs = {"model_dir": model_dir, "requests": raw, "pmet_as_is": pmet_as_is, "statistics": manifest,
              "methods": {}}
    for m, p in plan.items():
        entry = {"hparams": easyedit_hparams(m, p["reference_config"], lm, model_dir, stats, work),
                 "templates": p["templates"]}
        entry["digest"] = _digest({**entry, "requests": raw, "pmet_as_is": pmet_as_is, "model_hash": lm.model_hash})
        inputs["methods"][m] = entry
        p["digest"] = entry["digest"]
    with open(os.path.join(work, "inputs.json"), "w", encoding="utf-8") as fh:
        json.dump(inputs, fh, indent=1)
    return plan


# =================================================================================================================
# the reference side (EasyEdit's interpreter; imports easyeditor, nothing of the workbench)
# =================================================================================================================
class _StandinFinder:
    """Import hook making :data:`STANDIN_PACKAGES` empty packages whose every attribute is a do-nothing class (so
    ``class X(timm.Y)`` imports)."""

    def find_spec(self, fullname, path=None, target=None):
        import importlib.machinery
        if fullname.split(".")[0] in STANDIN_PACKAGES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        import types
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def attribute(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: self})
        module.__getattr__ = attribute
        return module

    def exec_module(self, module):
        pass


def _install_standins() -> None:
    """:class:`_StandinFinder` on ``sys.meta_path``. transformers decides at import time whether torchvision is
    installed, so it is imported first (with the stand-in present it would take it for the real package)."""
    import transformers.utils.import_utils  # noqa: F401
    if not any(isinstance(f, _StandinFinder) for f in sys.meta_path):
        sys.meta_path.append(_StandinFinder())


def reference_side(work: str, src: str, methods: Sequence[str]) -> None:
    """Run EasyEdit on ``WORK/inputs.json`` (module docstring, step 2)."""
    import importlib

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with open(os.path.join(work, "inputs.json"), encoding="utf-8") as fh:
        inputs = json.load(fh)
    _install_standins()
    sys.path.insert(0, os.path.abspath(src))
    import easyeditor
    commit = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for method in methods:
        spec = inputs["methods"][method]
        module_name, apply_name, hp_name, _ = EASYEDIT[method]
        M = importlib.import_module(module_name)
        HP = getattr(easyeditor, hp_name)
        hparams = HP(**{k: v for k, v in spec["hparams"].items() if k in HP.__dataclass_fields__})
        model = AutoModelForCausalLM.from_pretrained(inputs["model_dir"], dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(inputs["model_dir"])
        tok.pad_token_id = tok.eos_token_id
        as_is = method == "pmet" and inputs["pmet_as_is"]
        tok.padding_side = "left" if as_is else "right"
        requests = [dict(r) for r in inputs["requests"]]
        if method == "pmet" and not as_is:
            requests = [dict(r, target_new=" " + r["target_new"]) for r in requests]
        if method == "rome":
            requests = requests[:1]
        M.CONTEXT_TEMPLATES_CACHE = spec["templates"]
        zs: list[torch.Tensor] = []
        wrapped = {}
        for fn_name in ("compute_z", "compute_zs"):
            if hasattr(M, fn_name):
                original = wrapped[fn_name] = getattr(M, fn_name)

                def recording(*a, _fn=original, _name=fn_name, **k):
                    out = _fn(*a, **k)
                    zs.append((out[1] if _name == "compute_zs" else out).detach().float().clone())
                    return out
                setattr(M, fn_name, recording)
        names = {layer: hparams.rewrite_module_tmp.format(layer) + ".weight" for layer in hparams.layers}
        params = dict(model.named_parameters())
        before = {layer: params[n].detach().clone() for layer, n in names.items()}
        kwargs = {"reset_cache": True} if method == "alphaedit" else {}
        cwd = os.getcwd()
        os.chdir(work)  # AlphaEdit writes its projector into the working directory
        t0 = time.perf_counter()
        try:
            getattr(M, apply_name)(model, tok, requests, hparams, copy=False, return_orig_weights=True, **kwargs)
        finally:
            os.chdir(cwd)
            for fn_name, fn in wrapped.items():
                setattr(M, fn_name, fn)
        seconds = time.perf_counter() - t0
        params = dict(model.named_parameters())
        out = {f"dW.{layer}": (params[n].detach() - before[layer]).contiguous() for layer, n in names.items()}
        for i, z in enumerate(zs):
            out[f"z.{i}"] = z.contiguous()
        save_file(out, os.path.join(work, f"reference_{method}.safetensors"))
        with open(os.path.join(work, f"reference_{method}.json"), "w", encoding="utf-8") as fh:
            json.dump({"method": method, "easyedit_commit": commit, "seconds": seconds, "n_requests": len(requests),
                       "padding_side": tok.padding_side, "inputs_digest": spec["digest"]}, fh, indent=1)
        print(f"reference {method}: {seconds:.1f} s", flush=True)


# =================================================================================================================
# the workbench side and the table
# =================================================================================================================
def run_workbench(lm, method: str, cfg, requests, *, with_z: bool) -> tuple[dict[str, torch.Tensor], float]:
    """ΔW per layer (canonical ``[d_out, d_in]``, = nn.Linear's layout) of the workbench's editor, and its seconds
    (``prepare`` excluded); with ``with_z`` also the targets z (recomputed by compute_target_values)."""
    from editors.registry import get_editor_class
    from editors.targets import compute_target_values
    editor = get_editor_class(method)(lm, cfg, seed=0)
    editor.prepare()
    reqs = list(requests[:1] if method == "rome" else requests)
    t0 = time.perf_counter()
    result = editor.edit(reqs)
    seconds = time.perf_counter() - t0
    layers = [cfg.layer] if method == "rome" else list(cfg.layers)
    out = {f"dW.{layer}": lm.spec.to_canonical(result.deltas[lm.spec.mlp_out_weight(layer)]).float()
           for layer in layers}
    if with_z and method != "rome":
        flat = [t for g in editor.templates for t in g]
        Z, _ = compute_target_values(lm, reqs, layers[-1], site=editor.site, templates=flat, **cfg.z_kwargs())
        out.update({f"z.{i}": Z[i] for i in range(Z.shape[0])})
    return out, seconds


def agreement(ref: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> list[dict]:
    """Per tensor in both: ``1 - cos``, ``rel`` and ``ratio`` (module docstring); ``all`` concatenates the ΔWs."""
    rows = []

    def row(name, a, b):
        a, b = a.double().flatten().cpu(), b.double().flatten().cpu()
        return {"tensor": name, "1-cos": 1.0 - float(a @ b / (a.norm() * b.norm())),
                "rel": float((b - a).norm() / a.norm()), "ratio": float(a.norm() / b.norm())}

    keys = sorted(k for k in ref if k in ours)
    for k in keys:
        rows.append(row(k, ref[k], ours[k]))
    dws = [k for k in keys if k.startswith("dW.")]
    if len(dws) > 1:
        rows.append(row("dW.all", torch.cat([ref[k].flatten() for k in dws]),
                        torch.cat([ours[k].flatten() for k in dws])))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--n", type=int, default=1, help="first N CounterFact records, edited as one batch (ROME: 1)")
    ap.add_argument("--data", default="counterfact:" + CF_EDIT, help="editors.data source of the requests")
    ap.add_argument("--work", required=True, help="scratch folder (model copy, statistics, reference outputs)")
    ap.add_argument("--variant", default="reference",
                    help="preset variant of the workbench side (default reference; 'none' = the preset as shipped)")
    ap.add_argument("--rome-templates", default=None, metavar="FILE",
                    help="ROME's templates for both sides (e.g. ../shared/reference/rome_easyedit_cf0.json); default: "
                         "the workbench's sampled templates")
    ap.add_argument("--easyedit-python", default=None, help="Python of a virtual environment with EasyEdit's "
                                                            "requirements; runs the reference side")
    ap.add_argument("--easyedit-src", default=None, help="EasyEdit source tree (the folder holding easyeditor/)")
    ap.add_argument("--pmet-as-is", action="store_true", help="EasyEdit's stock PMET call (left padding, no space)")
    ap.add_argument("--z", action="store_true", help="also compare the targets z (MEMIT family; one more z "
                                                     "optimisation per request on the workbench side)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampled templates")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of each side")
    ap.add_argument("--out", default=None, help="write every row as JSON here")
    ap.add_argument("--reference-side", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        ap.error(f"unknown method {bad[0] if bad else '(none)'!r}; valid: {', '.join(METHODS)}")
    if args.threads < 1 or args.n < 1:
        ap.error("--threads and --n must be >= 1")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.reference_side:
        reference_side(args.work, args.easyedit_src, methods)
        return 0
    if args.easyedit_python and not (args.easyedit_src and os.path.isdir(os.path.join(args.easyedit_src,
                                                                                     "easyeditor"))):
        ap.error("--easyedit-src must name an EasyEdit source tree (a folder holding easyeditor/)")
    from editors.data import load_requests
    from editors.models import load_model
    os.makedirs(args.work, exist_ok=True)
    variant = None if args.variant in ("", "none") else args.variant
    lm = load_model("default", device="cpu")
    requests = load_requests(args.data, args.n)
    plan = prepare_inputs(lm, methods, requests, args.work, variant=variant, seed=args.seed,
                          rome_templates=args.rome_templates, pmet_as_is=args.pmet_as_is)
    if args.easyedit_python:
        cmd = [args.easyedit_python, os.path.abspath(__file__), "--reference-side", "--work", args.work,
               "--easyedit-src", args.easyedit_src, "--methods", ",".join(methods), "--threads", str(args.threads)]
        print("reference side:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    from safetensors.torch import load_file
    report = []
    for method in methods:
        ref_path = os.path.join(args.work, f"reference_{method}.safetensors")
        if not os.path.isfile(ref_path):
            print(f"== {method}: no reference output {ref_path} (run with --easyedit-python)")
            continue
        with open(os.path.join(args.work, f"reference_{method}.json"), encoding="utf-8") as fh:
            ref_info = json.load(fh)
        if ref_info.get("inputs_digest") != plan[method]["digest"]:
            print(f"== {method}: the reference output in {args.work} was made from other inputs (requests, "
                  f"templates or hyper-parameters); rerun with --easyedit-python")
            continue
        ref = load_file(ref_path)
        ours, seconds = run_workbench(lm, method, plan[method]["config"], requests, with_z=args.z)
        rows = agreement(ref, ours)
        n = 1 if method == "rome" else len(requests)
        print(f"== {method} (n={n}, variant {variant or 'none'}): EasyEdit {ref_info['seconds']:.1f} s, "
              f"workbench {seconds:.1f} s")
        print(f"   {'tensor':<8} {'1-cos':>9} {'rel':>9} {'ratio':>9}")
        for r in rows:
            print(f"   {r['tensor']:<8} {r['1-cos']:9.2e} {r['rel']:9.2e} {r['ratio']:9.6f}")
        report.append({"method": method, "n": n, "variant": variant, "seconds_reference": ref_info["seconds"],
                       "seconds_workbench": seconds, "easyedit_commit": ref_info.get("easyedit_commit"),
                       "rows": rows})
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
