"""Second-moment statistics (METHODS.md 0.1): C = E[k kᵀ] of an MLP output projection's input over a text corpus.

Computed on the UNEDITED model and cached on disk (safetensors under :func:`editors.cache.cache_root`, keyed by the
model hash, the layer, the corpus id and the sample size). :func:`float64_device` says where float64 solves run.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from typing import Sequence

import torch

from .cache import cache_path
from .hooks import Trace
from .models import LoadedModel, weights_fingerprint

log = logging.getLogger(__name__)

#: default size of the covariance sample (tokens). For d_ff = 1536 (SmolLM2) this gives a full-rank C with a
#: stable C^{-1}k (see the ROME config's docstring) in well under two minutes on two CPU threads for five layers.
DEFAULT_MOM2_TOKENS = 40_000
DEFAULT_MOM2_SEQ_LEN = 256

_STATS_FORMAT_VERSION = 1


def builtin_corpus_text() -> str:
    """The default covariance corpus: the English prose of Python's own documentation topics
    (``pydoc_data.topics.topics``, about 465k characters, shipped with every CPython).

    ROME/MEMIT use Wikipedia (100k articles); no hub is reachable on our machines, so the default is a corpus that
    is always present. It is technical English rather than encyclopaedic prose: for statistics closer to the
    reference, pass ``corpus=`` the path of your own UTF-8 text file.
    """
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def float64_device(device: torch.device) -> torch.device:
    """Where float64 maths runs for tensors on ``device``: the device itself, or the CPU for MPS (no float64)."""
    return torch.device("cpu") if torch.device(device).type == "mps" else torch.device(device)


def corpus_id(corpus: str = "builtin") -> str:
    """The id statistics of ``corpus`` are cached under: ``<name>-<12 hex of the text's sha256>``; the name is
    "pydoc" for the builtin corpus, else the text file's name (e.g. ``pydoc-71f2ff5d99bd``)."""
    return _corpus(corpus)[1]


def _corpus(corpus: str) -> tuple[str, str]:
    """(text, id) where the id names the corpus and hashes its content."""
    if corpus == "builtin":
        text, name = builtin_corpus_text(), "pydoc"
    else:
        if not os.path.isfile(corpus):
            raise FileNotFoundError(f"covariance corpus {corpus!r} is neither 'builtin' nor a readable text file")
        with open(corpus, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        name = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(corpus))[0])[:40]
    digest = hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()[:12]
    return text, f"{name}-{digest}"


def _stats_path(lm: LoadedModel, layer: int, corpus_id: str, n_tokens: int, seq_len: int,
                cache_dir: str | None) -> str:
    name = f"mom2_v{_STATS_FORMAT_VERSION}_{corpus_id}_n{n_tokens}_len{seq_len}_layer{layer}.safetensors"
    return cache_path("stats", lm.model_hash or "unhashed", name, root=cache_dir)


def layer_covariances(lm: LoadedModel, layers: Sequence[int], *, corpus: str = "builtin",
                      n_tokens: int = DEFAULT_MOM2_TOKENS, seq_len: int = DEFAULT_MOM2_SEQ_LEN,
                      batch_size: int = 8, cache_dir: str | None = None, dtype: torch.dtype = torch.float32
                      ) -> dict[int, torch.Tensor]:
    """C_l = E[k kᵀ] (uncentred) of layer l's MLP-output-projection input over a corpus, ``{l: [d_ff, d_ff]}``.

    The corpus is tokenised once and cut into ``seq_len``-token windows spread evenly over it (no padding); the
    first ``n_tokens`` tokens' worth of windows are used (fewer if the corpus is shorter). Per batch, ``KᵀK`` is
    formed in fp32 and added to a float64 sum. One forward per batch serves every requested layer and stops after
    the highest one. Statistics are of the UNEDITED model: computing them raises ``RuntimeError`` when the weights
    no longer match ``lm.model_hash``; cached results (safetensors, keyed by model hash, layer, corpus id and size)
    are returned whatever the current weights.

    Args:
        corpus: "builtin" (:func:`builtin_corpus_text`) or the path of a UTF-8 text file.
        dtype: of the returned tensors (float64 for solves that need it; the cache holds float64). Float64
            results live on :func:`float64_device` (the CPU for MPS), others on ``lm.device``.
    """
    spec = lm.spec
    layers = sorted(set(int(x) for x in layers))
    for layer in layers:
        if not 0 <= layer < spec.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {spec.n_layers} layers")
    text, corpus_id = _corpus(corpus)
    out: dict[int, torch.Tensor] = {}
    missing = []
    for layer in layers:
        path = _stats_path(lm, layer, corpus_id, n_tokens, seq_len, cache_dir)
        if os.path.exists(path):
            from safetensors.torch import load_file
            out[layer] = load_file(path)["mom2"].to(float64_device(lm.device) if dtype == torch.float64
                                                   else lm.device).to(dtype)
        else:
            missing.append(layer)
    if not missing:
        return out
    if lm.model_hash and weights_fingerprint(lm.model) != lm.model_hash:
        raise RuntimeError("covariance statistics must be computed on the unedited model (the weights no longer "
                           "match the model hash); compute them before the first edit (Editor.prepare)")
    t0 = time.perf_counter()
    windows = corpus_windows(lm.tokenizer, text, n_tokens, seq_len)
    names = {layer: spec.mlp_out_module(layer) for layer in missing}
    top = names[max(missing)]
    d_ff = spec.mlp_size
    acc_device = float64_device(lm.device)
    sums = {layer: torch.zeros((d_ff, d_ff), dtype=torch.float64, device=acc_device) for layer in missing}
    count = 0
    model = lm.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, windows.shape[0], batch_size):
                ids = windows[s:s + batch_size].to(lm.device)
                with Trace(model, list(names.values()), retain_input=True, stop_after=top) as tr:
                    model(input_ids=ids, use_cache=False)
                for layer, name in names.items():
                    K = tr.inputs[name].reshape(-1, d_ff).float()
                    sums[layer] += (K.T @ K).to(acc_device, torch.float64)
                count += ids.numel()
    finally:
        model.train(was_training)
    from safetensors.torch import save_file
    for layer in missing:
        C = sums[layer] / max(count, 1)
        C = (C + C.T) / 2
        path = _stats_path(lm, layer, corpus_id, n_tokens, seq_len, cache_dir)
        tmp = f"{path}.{os.getpid()}.tmp"
        save_file({"mom2": C.cpu().contiguous(), "count": torch.tensor([count])}, tmp,
                  metadata={"model_hash": lm.model_hash, "layer": str(layer), "corpus": corpus_id,
                            "n_tokens": str(count), "seq_len": str(seq_len)})
        os.replace(tmp, path)
        out[layer] = C.to(dtype) if dtype == torch.float64 else C.to(lm.device, dtype)
    log.info("covariance of layers %s: %d tokens of %s in %.1fs", missing, count, corpus_id, time.perf_counter() - t0)
    return out


def cached_layer_covariances(lm: LoadedModel, layers: Sequence[int], *, corpus: str = "builtin",
                             n_tokens: int = DEFAULT_MOM2_TOKENS, seq_len: int = DEFAULT_MOM2_SEQ_LEN,
                             cache_dir: str | None = None) -> dict[int, torch.Tensor]:
    """The float64 ``C_l`` of :func:`layer_covariances` (same arguments) that are already in the cache, on the CPU;
    layers without cached statistics are left out (nothing is computed, so this works on an edited model)."""
    from safetensors.torch import load_file
    cid = corpus_id(corpus)
    out = {}
    for layer in sorted(set(int(x) for x in layers)):
        path = _stats_path(lm, layer, cid, n_tokens, seq_len, cache_dir)
        if os.path.exists(path):
            out[layer] = load_file(path)["mom2"].to(torch.float64)
    return out


def covariance_token_counts(lm: LoadedModel, layers: Sequence[int], *, corpus: str = "builtin",
                            n_tokens: int = DEFAULT_MOM2_TOKENS, seq_len: int = DEFAULT_MOM2_SEQ_LEN,
                            cache_dir: str | None = None) -> dict[int, int]:
    """``{layer: number of tokens}`` the cached ``C_l`` of :func:`layer_covariances` (same arguments) was averaged
    over (``C = Σ k kᵀ / count``, so ``C * count`` is the raw sum other implementations store). Statistics missing
    from the cache are computed first (on the unedited model)."""
    layers = sorted(set(int(x) for x in layers))
    cid = corpus_id(corpus)
    paths = {layer: _stats_path(lm, layer, cid, n_tokens, seq_len, cache_dir) for layer in layers}
    missing = [layer for layer, path in paths.items() if not os.path.exists(path)]
    if missing:
        layer_covariances(lm, missing, corpus=corpus, n_tokens=n_tokens, seq_len=seq_len, cache_dir=cache_dir)
    from safetensors import safe_open
    out = {}
    for layer, path in paths.items():
        with safe_open(path, "pt") as fh:
            out[layer] = int(fh.get_tensor("count").reshape(-1)[0])
    return out


def layer_covariance(lm: LoadedModel, layer: int, *, corpus: str = "builtin", n_tokens: int = DEFAULT_MOM2_TOKENS,
                     seq_len: int = DEFAULT_MOM2_SEQ_LEN, cache_dir: str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """C = E[k kᵀ] of one layer, ``[d_ff, d_ff]`` (see :func:`layer_covariances`)."""
    return layer_covariances(lm, [layer], corpus=corpus, n_tokens=n_tokens, seq_len=seq_len, cache_dir=cache_dir,
                             dtype=dtype)[layer]


def corpus_windows(tok, text: str, n_tokens: int, seq_len: int) -> torch.Tensor:
    """``[n_windows, seq_len]`` token windows spread evenly over the corpus (the sample of
    :func:`layer_covariances`)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n_all = len(ids) // seq_len
    if n_all == 0:
        raise ValueError(f"the covariance corpus has {len(ids)} tokens, fewer than one window of {seq_len}")
    want = max(1, min(n_all, math.ceil(n_tokens / seq_len)))
    if want < math.ceil(n_tokens / seq_len):
        log.warning("covariance corpus holds %d tokens; using all of them (asked for %d)", n_all * seq_len, n_tokens)
    picks = sorted(set(int(i * n_all / want) for i in range(want)))
    return torch.tensor([ids[i * seq_len:(i + 1) * seq_len] for i in picks], dtype=torch.long)


__all__ = ["DEFAULT_MOM2_TOKENS", "DEFAULT_MOM2_SEQ_LEN", "builtin_corpus_text", "float64_device", "corpus_windows",
           "corpus_id", "layer_covariances", "layer_covariance", "covariance_token_counts"]
