"""``python -m app export-stats``: the cached covariance statistics in the layout EasyEdit (and kmeng01/rome, memit)
reads, so that a reference run uses exactly this workbench's statistics (docs/reference_agreement.md).

EasyEdit's ``layer_stats`` looks for its cached statistics before it builds a dataset::

    {stats_dir}/{model_dir}/{mom2_dataset}_stats/{module}_{mom2_dtype}_mom2_{mom2_n_samples}.npz

* ``model_dir``: the last component of the model's path (``model.config._name_or_path``); EasyEdit also picks its
  model branch from that path ("llama" in it selects the Llama code), so save the model under such a name
  (``--save-model DIR``);
* ``mom2_dataset``: only a name once the file exists (default here ``pydoc``, the builtin corpus; a name EasyEdit
  does not know makes it fail instead of downloading Wikipedia when a file is missing);
* ``module``: the module whose INPUT is collected, the MLP output projection (``model.layers.5.mlp.down_proj``);
* ``mom2_dtype`` only names the file (the arrays keep the dtype written here);
* keys: ``mom2.mom2`` = the RAW SUM Σ k kᵀ over the counted tokens ``[d_ff, d_ff]`` (EasyEdit's ``moment()`` is
  ``mom2 / count``; this workbench caches ``C = Σ k kᵀ / count``, so ``C * count`` is written), ``mom2.count`` (the
  token count), ``mom2.constructor`` (a string, ignored on load) and ``sample_size`` = ``mom2_n_samples``
  (REQUIRED: EasyEdit compares it and fails without it).

A ``manifest_<dtype>_<n>.json`` beside the files records the model hash, corpus id, token counts and sha256s.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

DTYPES = ("float32", "float64")
CONSTRUCTOR = "util.runningstats.SecondMoment()"


def stats_file_name(module: str, dtype: str, n: int) -> str:
    """EasyEdit's file name of one layer's statistics."""
    return f"{module}_{dtype}_mom2_{n}.npz"


def method_layers(config: Any) -> list[int]:
    """The layers whose statistics a method config uses: ``layers`` (MEMIT family, MOSE) or ``layer`` (ROME), plus
    MOSE's ``candidate_layers``."""
    layers = set()
    if hasattr(config, "layers"):
        layers.update(int(x) for x in config.layers)
    elif hasattr(config, "layer"):
        layers.add(int(config.layer))
    layers.update(int(x) for x in getattr(config, "candidate_layers", ()) or ())
    if not layers:
        raise ValueError(f"{type(config).__name__} names no edit layers")
    return sorted(layers)


def export_easyedit_stats(lm, layers: Sequence[int], out_dir: str, *, model_dir_name: str, dataset: str = "pydoc",
                          n: int | None = None, dtype: str = "float32", corpus: str = "builtin",
                          n_tokens: int | None = None, cache_dir: str | None = None) -> dict:
    """Write the statistics of ``layers`` under ``out_dir`` in EasyEdit's layout (module docstring) and return the
    manifest (also written as JSON). Statistics missing from the cache are computed first (unedited model).

    Args:
        model_dir_name: the folder name EasyEdit will derive from the model's path.
        n: ``mom2_n_samples`` to name the files with and store as ``sample_size`` (default: ``n_tokens``).
        n_tokens: the covariance sample of this workbench (default: editors.stats.DEFAULT_MOM2_TOKENS).
    """
    import numpy as np
    import torch

    from editors.stats import DEFAULT_MOM2_TOKENS, corpus_id, covariance_token_counts, layer_covariances
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not model_dir_name or "/" in model_dir_name or model_dir_name in (".", ".."):
        raise ValueError(f"model directory name {model_dir_name!r} must be one path component")
    n_tokens = DEFAULT_MOM2_TOKENS if n_tokens is None else int(n_tokens)
    n = n_tokens if n is None else int(n)
    layers = sorted(set(int(x) for x in layers))
    kw = dict(corpus=corpus, n_tokens=n_tokens, cache_dir=cache_dir)
    Cs = layer_covariances(lm, layers, dtype=torch.float64, **kw)
    counts = covariance_token_counts(lm, layers, **kw)
    folder = os.path.join(out_dir, model_dir_name, f"{dataset}_stats")
    os.makedirs(folder, exist_ok=True)
    files = {}
    for layer in layers:
        module = lm.spec.mlp_out_module(layer)
        path = os.path.join(folder, stats_file_name(module, dtype, n))
        raw = (Cs[layer].cpu() * counts[layer]).numpy().astype(dtype)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **{"mom2.mom2": raw, "mom2.count": np.array(counts[layer]),
                         "mom2.constructor": np.array(CONSTRUCTOR), "sample_size": np.array(n)})
        os.replace(tmp, path)
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        files[str(layer)] = {"module": module, "file": os.path.relpath(path, out_dir), "count": counts[layer],
                             "sha256": digest}
    manifest = {"what": "this workbench's C = E[k kᵀ] per layer in EasyEdit's layer_stats cache layout (mom2.mom2 "
                        "= C * count)",
                "model": lm.name, "model_hash": lm.model_hash, "corpus": corpus_id(corpus), "n_tokens": n_tokens,
                "hparams": {"stats_dir": os.path.abspath(out_dir), "mom2_dataset": dataset, "mom2_n_samples": n,
                            "mom2_dtype": dtype},
                "layers": files}
    with open(os.path.join(folder, f"manifest_{dtype}_{n}.json"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
    return manifest


def add_export_stats_parser(sub) -> None:
    p = sub.add_parser("export-stats", help="write the covariance statistics in EasyEdit's cache layout",
                       description="Write this workbench's cached covariance statistics (computed first if missing) "
                                   "for a method's layers in the layout EasyEdit's layer_stats reads, so that a "
                                   "reference run uses the same statistics (docs/reference_agreement.md).")
    p.add_argument("--method", default="memit", help="method whose preset names the layers (default memit)")
    p.add_argument("--model", default="default", help="'default', a model directory or hub id")
    p.add_argument("--out", required=True, help="the stats_dir to write (EasyEdit hparams stats_dir)")
    p.add_argument("--layers", default=None, help="comma-separated layers instead of the method's")
    p.add_argument("--save-model", default=None, metavar="DIR",
                   help="also save the model (save_pretrained) to DIR; its folder name becomes the model folder "
                        "name (use a name with 'llama' in it for Llama-family models: EasyEdit picks its code path "
                        "from the model's path)")
    p.add_argument("--model-dir-name", default=None,
                   help="the model folder name EasyEdit derives from the model path (default: the --save-model "
                        "folder's name, else the model's path name)")
    p.add_argument("--dataset", default="pydoc", help="mom2_dataset to name the folder with (default pydoc)")
    p.add_argument("--n", type=int, default=None, help="mom2_n_samples (default: the method's mom2_n_tokens)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="mom2_dtype: the arrays' dtype and the name's (default float32, EasyEdit's stock hparams)")
    p.add_argument("--cache-dir", default=None, help="statistics cache root (default $EDITBENCH_CACHE or "
                                                     "~/.cache/editbench)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")


class ExportStatsError(ValueError):
    """Bad input to ``export-stats`` (unknown method, bad layer / n, ...); the CLI reports it as a usage error."""


def run_export_stats(args) -> None:
    """``python -m app export-stats`` (``args`` from :func:`add_export_stats_parser`); prints what it wrote.

    Raises:
        ExportStatsError: an unknown method, a bad config, layer or ``--n``.
    """
    from editors.base import ConfigError
    from editors.models import load_model
    from editors.presets import build_config
    from editors.registry import UnknownMethodError

    try:
        config, _ = build_config(args.method, args.model)
        layers = ([int(x) for x in args.layers.split(",") if x.strip()] if args.layers else method_layers(config))
    except (UnknownMethodError, ConfigError, ValueError) as exc:
        raise ExportStatsError(str(exc)) from exc
    if args.n is not None and args.n < 1:
        raise ExportStatsError(f"--n must be >= 1, got {args.n}")
    lm = load_model(args.model)
    for layer in layers:
        if not 0 <= layer < lm.spec.n_layers:
            raise ExportStatsError(f"layer {layer} out of range: the model has {lm.spec.n_layers} layers")
    name = args.model_dir_name
    if args.save_model:
        lm.model.save_pretrained(args.save_model)
        lm.tokenizer.save_pretrained(args.save_model)
        name = name or os.path.basename(os.path.normpath(args.save_model))
    name = name or os.path.basename(os.path.normpath(lm.name)) or lm.display_name
    try:
        manifest = export_easyedit_stats(
            lm, layers, args.out, model_dir_name=name, dataset=args.dataset, n=args.n, dtype=args.dtype,
            corpus=getattr(config, "corpus", "builtin"), n_tokens=getattr(config, "mom2_n_tokens", None),
            cache_dir=args.cache_dir)
    except ValueError as exc:
        raise ExportStatsError(str(exc)) from exc
    for layer, entry in manifest["layers"].items():
        print(f"layer {layer}: {os.path.join(args.out, entry['file'])} ({entry['count']} tokens)")
    print("set in the EasyEdit hparams:")
    for key, value in manifest["hparams"].items():
        print(f"  {key}: {value}")
    if not args.save_model:
        print(f"and load the model from a folder named {name!r} (EasyEdit reads the statistics of the folder its "
              f"model path ends with)")


__all__ = ["DTYPES", "stats_file_name", "method_layers", "export_easyedit_stats", "add_export_stats_parser",
           "ExportStatsError", "run_export_stats"]
