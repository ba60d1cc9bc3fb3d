"""How far editing moves the model's hidden states on a fixed probe set.

* ``capture_states``: one vector per prompt from a decoder layer's output (residual stream), read by a forward hook
  (``editors.hooks.Trace``, the forward stops right after that layer) at the last prompt token, the last subject
  token, or averaged over the relation tokens (MOSE Fig. 5: "final-layer representations of relation tokens").
* ``project`` / ``project_groups``: 2-D PCA, t-SNE or UMAP fitted JOINTLY on all groups (before + after, or MOSE's
  single-update + cumulative-update), so that distances between groups mean something (AdaEdit Fig. 4a/6, MOSE Fig. 5,
  AGRADE Fig. 3, which reduces with PCA before t-SNE as done here).
* Numbers that need no projection: ``mean_cosine_shift`` (mean over prompts of 1 − cos(before_i, after_i); 0 = no
  change), ``linear_cka`` (Kornblith et al. 2019; 1 = same geometry up to rotation and isotropic scaling) and
  ``mmd_rbf`` (biased squared maximum mean discrepancy with a Gaussian kernel whose bandwidth is the median pairwise
  distance of the pooled sample; 0 = same distribution).
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from editors.hooks import Trace
from editors.models import LoadedModel

log = logging.getLogger(__name__)

POSITIONS = ("last", "subject_last", "relation")
PROJECTIONS = ("pca", "tsne", "umap")


# ---------------------------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------------------------
def _token_positions(tok, prompt: str, position: str, subject: str | None) -> tuple[list[int], list[int]]:
    """(input ids, indices whose states are averaged) for one prompt."""
    if position == "last":
        ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
        return ids, [len(ids) - 1]
    if not subject:
        raise ValueError(f"position {position!r} needs the subject of every prompt")
    cs = prompt.find(subject)
    if cs < 0:
        raise ValueError(f"subject {subject!r} not found in prompt {prompt!r}")
    ce = cs + len(subject)
    if getattr(tok, "is_fast", False):
        enc = tok(prompt, add_special_tokens=True, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = enc["offset_mapping"]
        special = [s == e for s, e in offsets]  # special tokens have empty spans
        in_subject = [not sp and s < ce and e > cs for (s, e), sp in zip(offsets, special)]
    else:  # no offsets: token counts of the prefixes before and through the subject (as rome's repr_tools)
        ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
        n_pre = len(tok(prompt[:cs].rstrip(), add_special_tokens=True)["input_ids"]) if prompt[:cs].strip() else \
            len(tok("", add_special_tokens=True)["input_ids"])
        n_end = len(tok(prompt[:ce], add_special_tokens=True)["input_ids"])
        n_special = len(tok("", add_special_tokens=True)["input_ids"])
        special = [i < n_special for i in range(len(ids))]
        in_subject = [n_pre <= i < n_end for i in range(len(ids))]
    subj = [i for i, f in enumerate(in_subject) if f]
    if not subj:
        raise ValueError(f"subject {subject!r} covers no token of {prompt!r}")
    if position == "subject_last":
        return ids, [subj[-1]]
    rel = [i for i, (f, sp) in enumerate(zip(in_subject, special)) if not f and not sp]
    if not rel:
        raise ValueError(f"prompt {prompt!r} has no token outside its subject {subject!r}")
    return ids, rel


@torch.no_grad()
def capture_states(lm: LoadedModel, prompts: Sequence[str], layer: int, position: str = "last",
                   subjects: Sequence[str] | None = None, *, batch_size: int = 32) -> np.ndarray:
    """Hidden states ``[n_prompts, d_model]`` (float32) at the output of decoder layer ``layer`` (negative counts
    from the end: -1 = the last layer, before the final norm).

    ``position``: "last" (last prompt token), "subject_last" (last token of the subject) or "relation" (mean over
    the prompt's tokens outside the subject, special tokens excluded); the last two need ``subjects``.
    """
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; valid: {', '.join(POSITIONS)}")
    if subjects is not None and len(subjects) != len(prompts):
        raise ValueError(f"{len(subjects)} subjects for {len(prompts)} prompts")
    n_layers = lm.spec.n_layers
    li = layer + n_layers if layer < 0 else layer
    if not 0 <= li < n_layers:
        raise ValueError(f"layer {layer} out of range for {n_layers} layers")
    name = lm.spec.layer(li)
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    items = [_token_positions(tok, p, position, subjects[i] if subjects is not None else None)
             for i, p in enumerate(prompts)]
    out = np.zeros((len(items), lm.spec.hidden_size), dtype=np.float32)
    model = lm.model
    was = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (seq, _) in enumerate(chunk):
                ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
            with Trace(model, [name], retain_output=True, stop_after=name) as tr:
                model.base_model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))
            h = tr.outputs[name].float()
            for r, (_, pos) in enumerate(chunk):
                out[start + r] = h[r, pos].mean(0).cpu().numpy()
    finally:
        model.train(was)
    return out


# ---------------------------------------------------------------------------------------------------------------
# projections
# ---------------------------------------------------------------------------------------------------------------
def project_groups(groups: Mapping[str, np.ndarray], method: str = "pca", seed: int = 0, *, pca_dims: int = 50,
                   perplexity: float | None = None, n_neighbors: int | None = None, n_jobs: int = 1
                   ) -> pd.DataFrame:
    """2-D projection fitted jointly on every group's states.

    Args:
        groups: label -> states ``[n_label, d]`` (same d).
        method: "pca", "tsne" (after PCA to ``pca_dims``) or "umap" (after PCA to ``pca_dims``).
        perplexity / n_neighbors: t-SNE / UMAP neighbourhood (default 30 / 15, capped for small samples).
        n_jobs: threads for the fit (BLAS / OpenMP pools are capped for its duration: on a shared, busy machine
            oversubscribed OpenMP threads made a 200-point t-SNE 8x slower than one thread).

    Returns:
        columns ``x, y, which, idx`` (``idx`` = row within its group).
    """
    if method not in PROJECTIONS:
        raise ValueError(f"unknown projection {method!r}; valid: {', '.join(PROJECTIONS)}")
    labels, arrays = [], []
    for label, X in groups.items():
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"group {label!r}: expected [n, d] states, got shape {X.shape}")
        labels.append(label)
        arrays.append(X)
    if len({a.shape[1] for a in arrays}) > 1:
        raise ValueError("groups differ in state dimension")
    Z = np.concatenate(arrays, axis=0)
    n = Z.shape[0]
    if n < 3:
        raise ValueError(f"need at least 3 states in total to project, got {n}")
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=max(1, n_jobs)):
        Y = _fit_2d(Z, method, seed, pca_dims, perplexity, n_neighbors, n_jobs)
    which = np.concatenate([[label] * a.shape[0] for label, a in zip(labels, arrays)])
    idx = np.concatenate([np.arange(a.shape[0]) for a in arrays])
    return pd.DataFrame({"x": Y[:, 0], "y": Y[:, 1], "which": which, "idx": idx})


def _fit_2d(Z: np.ndarray, method: str, seed: int, pca_dims: int, perplexity: float | None,
            n_neighbors: int | None, n_jobs: int) -> np.ndarray:
    from sklearn.decomposition import PCA
    n = Z.shape[0]
    if method == "pca":
        Y = PCA(n_components=2, random_state=seed).fit_transform(Z)
    else:
        k = min(pca_dims, Z.shape[1], n)
        Zr = PCA(n_components=k, random_state=seed).fit_transform(Z) if k < Z.shape[1] else Z
        if method == "tsne":
            from sklearn.manifold import TSNE
            perp = perplexity if perplexity is not None else 30.0
            perp = float(min(perp, max(1.0, (n - 1) / 3)))
            Y = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed,
                     n_jobs=n_jobs).fit_transform(Zr)
        else:
            import umap  # imported here: slow to import (numba compiles on first use)
            nn = n_neighbors if n_neighbors is not None else 15
            nn = int(max(2, min(nn, n - 1)))
            Y = umap.UMAP(n_components=2, n_neighbors=nn, random_state=seed, n_jobs=n_jobs).fit_transform(Zr)
    return np.asarray(Y, dtype=np.float64)


def project(before: np.ndarray, after: np.ndarray, method: str = "pca", seed: int = 0, *,
            labels: tuple[str, str] = ("before", "after"), **kw) -> pd.DataFrame:
    """Joint 2-D projection of states before and after editing: columns ``x, y, which, idx``."""
    return project_groups({labels[0]: before, labels[1]: after}, method, seed, **kw)


def single_vs_cumulative_frame(single: np.ndarray, cumulative: np.ndarray, *, unedited: np.ndarray | None = None,
                               method: str = "tsne", seed: int = 0, **kw) -> pd.DataFrame:
    """MOSE Fig. 5: the same prompts' states with only their own update ΔW_i applied ("single update") and with the
    accumulated update applied ("cumulative update"), optionally with the unedited states, projected jointly."""
    groups = {}
    if unedited is not None:
        groups["unedited"] = unedited
    groups["single update"] = single
    groups["cumulative update"] = cumulative
    return project_groups(groups, method, seed, **kw)


# ---------------------------------------------------------------------------------------------------------------
# projection-free numbers
# ---------------------------------------------------------------------------------------------------------------
def _f64(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"expected [n, d] states, got shape {X.shape}")
    return X


def mean_cosine_shift(before, after) -> float:
    """Mean over paired rows of 1 − cos(before_i, after_i) (0 = unchanged directions, 1 = orthogonal)."""
    B, A = _f64(before), _f64(after)
    if B.shape != A.shape:
        raise ValueError(f"paired states differ in shape: {B.shape} vs {A.shape}")
    nb, na = np.linalg.norm(B, axis=1), np.linalg.norm(A, axis=1)
    ok = (nb > 0) & (na > 0)
    cos = (B[ok] * A[ok]).sum(1) / (nb[ok] * na[ok])
    return float(np.mean(1.0 - cos)) if cos.size else math.nan


def linear_cka(X, Y) -> float:
    """Linear centred kernel alignment between paired representations ``[n, d1]`` and ``[n, d2]`` (Kornblith et
    al. 2019): ‖Ycᵀ Xc‖_F² / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F); 1 for identical geometry up to rotation and scale."""
    X, Y = _f64(X), _f64(Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"CKA needs paired rows: {X.shape[0]} vs {Y.shape[0]}")
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    if X.shape[0] < max(X.shape[1], Y.shape[1]):  # cheaper in the n×n Gram form
        K, L = Xc @ Xc.T, Yc @ Yc.T
        num, den = (K * L).sum(), np.linalg.norm(K) * np.linalg.norm(L)
    else:
        num = np.linalg.norm(Yc.T @ Xc) ** 2
        den = np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc)
    return float(num / den) if den > 0 else math.nan


def _sq_dists(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    d = (A ** 2).sum(1)[:, None] + (B ** 2).sum(1)[None, :] - 2 * A @ B.T
    return np.maximum(d, 0.0)


def median_bandwidth(Z, *, max_points: int = 1000, seed: int = 0) -> float:
    """Median pairwise Euclidean distance of the rows of ``Z`` (at most ``max_points`` sampled rows)."""
    Z = _f64(Z)
    if Z.shape[0] > max_points:
        Z = Z[np.random.default_rng(seed).choice(Z.shape[0], max_points, replace=False)]
    D = _sq_dists(Z, Z)
    off = D[np.triu_indices(Z.shape[0], k=1)]
    off = off[off > 0]
    return float(np.sqrt(np.median(off))) if off.size else 1.0


def mmd_rbf(X, Y, *, bandwidth: float | None = None, squared: bool = True) -> float:
    """Biased (V-statistic) MMD² between samples ``X`` ``[n, d]`` and ``Y`` ``[m, d]`` with the Gaussian kernel
    exp(−‖x − y‖² / (2 σ²)); σ defaults to the median pairwise distance of the pooled sample. ``squared=False``
    returns MMD (the square root)."""
    X, Y = _f64(X), _f64(Y)
    sigma = bandwidth if bandwidth is not None else median_bandwidth(np.concatenate([X, Y]))
    g = 1.0 / (2.0 * sigma ** 2)
    kxx = np.exp(-g * _sq_dists(X, X)).mean()
    kyy = np.exp(-g * _sq_dists(Y, Y)).mean()
    kxy = np.exp(-g * _sq_dists(X, Y)).mean()
    m2 = max(0.0, float(kxx + kyy - 2 * kxy))
    return m2 if squared else math.sqrt(m2)


def shift_metrics(before, after) -> dict[str, float]:
    """``mean_cosine_shift``, ``linear_cka`` and ``mmd_rbf`` of paired states before / after editing."""
    return {"mean_cosine_shift": mean_cosine_shift(before, after), "linear_cka": linear_cka(before, after),
            "mmd_rbf": mmd_rbf(before, after)}


def shift_frame(before, after, *, n_edits: int | None = None, layer: int | None = None,
                position: str | None = None) -> pd.DataFrame:
    """:func:`shift_metrics` as long-form rows ``n_edits, layer, position, metric, value``."""
    return pd.DataFrame([{"n_edits": n_edits, "layer": layer, "position": position, "metric": k, "value": v}
                         for k, v in shift_metrics(before, after).items()],
                        columns=["n_edits", "layer", "position", "metric", "value"])


__all__ = ["capture_states", "project", "project_groups", "single_vs_cumulative_frame", "mean_cosine_shift",
           "linear_cka", "mmd_rbf", "median_bandwidth", "shift_metrics", "shift_frame", "POSITIONS",
           "PROJECTIONS"]
