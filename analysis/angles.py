"""Angles between weight updates: interference between successive edits, leakage into the preserved-key subspace,
and GeoEdit's per-neuron angle between the old- and new-knowledge task vectors.

* Successive updates (``update_angles``): the angle between the update of step t and that of step t−1 of the same
  matrix, (a) flattened (cosine of the two matrices as vectors, 0°–180°: >90° means the new edit partly undoes the
  previous one) and (b) between the dominant singular directions (lines, so 0°–90°): ``out`` = left singular vectors
  (the value / output space, d_out) and ``in`` = right singular vectors (the key space, d_in). With ``top_k`` > 1 the
  largest principal angle between the top-k subspaces.
* Preserved keys (``preserved_basis`` + ``subspace_angle``): the share s = ‖ΔW U_k‖_F² / ‖ΔW‖_F² of the update's row
  space that lies in the top-k eigenspace U_k of the preserved-key covariance C = K0 K0ᵀ, expressed as the angle
  arccos(√s): 90° = the update is blind to the preserved keys (AlphaEdit's null-space ideal), 0° = it lives where
  they live.
* GeoEdit (geoedit.txt Eq. 10, Fig. 3): per neuron (one row of ``A`` / ``B``; the caller picks the neuron axis, e.g.
  ``editors.geoedit.to_neurons``: columns of an MLP output projection by default) the angle between τ_old and τ_new,
  in the raw parameter space (concentrated near 90° in high dimension) and in the auto-encoder's latent space;
  classes aligned (< φ1 = 85°), orthogonal (φ1..φ2 = 95°), conflicting (> φ2).

All matrices are in the canonical ``[d_out, d_in]`` orientation; pass ``to_canonical=lm.spec.to_canonical`` for
parameter-layout deltas of GPT-2 ``Conv1D`` models. Angles are in degrees.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from analysis.weights import cpu_threads

PHI1 = 85.0
PHI2 = 95.0
CLASSES = ("aligned", "orthogonal", "conflicting")


def _t64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _deg(cos: float) -> float:
    return float(math.degrees(math.acos(max(-1.0, min(1.0, cos)))))


def flat_angle(A, B) -> float:
    """Angle (degrees, 0–180) between two updates seen as flat vectors; NaN when either is zero."""
    a, b = _t64(A).reshape(-1), _t64(B).reshape(-1).to(_t64(A).device)
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return math.nan
    return _deg(float(a @ b) / (na * nb))


def top_singular_vectors(delta, k: int = 1, *, exact_max_dim: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_k [d_out, k], V_k [d_in, k]) of ``delta`` [d_out, d_in].

    Exact (eigenvectors of the smaller Gram matrix in float64, the other side by one product) when the smaller side
    is at most ``exact_max_dim``; beyond, a randomised range finder with subspace iteration (Halko et al. 2011) with
    a local generator, accurate when the top-k singular values are separated from the rest.
    """
    D = _t64(delta)
    k = max(1, min(k, *D.shape))
    if min(D.shape) <= exact_max_dim:
        wide = D.shape[0] <= D.shape[1]
        A = D if wide else D.T
        lam, E = torch.linalg.eigh(A @ A.T)
        E = E[:, -k:].flip(1)  # top-k eigenvectors of A Aᵀ = left singular vectors of A
        s = lam[-k:].flip(0).clamp_min(1e-300).sqrt()
        F = (A.T @ E) / s  # the matching right singular vectors
        return (E, F) if wide else (F, E)
    q = min(min(D.shape), k + 8)
    gen = torch.Generator(device="cpu").manual_seed(0)
    Y = D @ torch.randn(D.shape[1], q, generator=gen, dtype=torch.float64).to(D.device)
    Q, _ = torch.linalg.qr(Y)
    for _ in range(6):
        Q, _ = torch.linalg.qr(D.T @ Q)
        Q, _ = torch.linalg.qr(D @ Q)
    Ub, _, Vh = torch.linalg.svd(Q.T @ D, full_matrices=False)
    return (Q @ Ub)[:, :k], Vh[:k].T


def principal_angle(U1: torch.Tensor, U2: torch.Tensor) -> float:
    """Largest principal angle (degrees, 0–90) between the column spans of two orthonormal bases."""
    s = torch.linalg.svdvals(U1.T @ U2.to(U1.device))
    return _deg(float(s.min()))


def factor_delta(R, W) -> torch.Tensor:
    """The additive update of a left-multiplicative edit W ← R W (MOSE): ΔW = (R − I) W, canonical."""
    R, W = _t64(R), _t64(W)
    return R @ W - W


def _deltas_of(item) -> Mapping[str, torch.Tensor]:
    deltas = getattr(item, "deltas", None)  # an EditResult
    return deltas if deltas is not None else item


def update_angles(deltas_by_step: Mapping[int, Mapping[str, torch.Tensor]] | Sequence[tuple[int, Mapping]], *,
                  layer_of: Callable[[str], int | None] | Mapping[str, int] | None = None, top_k: int = 1,
                  to_canonical: Callable[[torch.Tensor], torch.Tensor] | None = None, threads: int | None = 1
                  ) -> pd.DataFrame:
    """Angles between the updates of successive steps, per parameter.

    Args:
        deltas_by_step: n_edits -> {param: that step's update ΔW_t} (or -> an ``EditResult``: its ``deltas``), or a
            sequence of (n_edits, deltas) pairs. Updates of one step, not the accumulated ΔW.
        layer_of: ``lm.spec.layer_of`` or a mapping; fills ``layer``.
        top_k: size of the dominant subspaces compared by ``angle_top_out`` / ``angle_top_in``.
        to_canonical: layout conversion (``lm.spec.to_canonical``) for GPT-2 Conv1D parameters.
        threads: cap on torch CPU threads for the eigensolves (``analysis.weights.cpu_threads``).

    Returns:
        columns ``n_edits, prev_n_edits, layer, param, metric, value`` with metric in ``angle_flat`` (0–180),
        ``angle_top_out``, ``angle_top_in`` (0–90).
    """
    items = sorted(deltas_by_step.items()) if isinstance(deltas_by_step, Mapping) else sorted(deltas_by_step,
                                                                                            key=lambda x: x[0])
    conv = to_canonical or (lambda t: t)
    rows = []
    prev: dict[str, tuple[int, torch.Tensor, tuple]] = {}
    for n, item in items:
        for name, D in _deltas_of(item).items():
            D = conv(_t64(D))
            if float(D.norm()) == 0:
                continue
            with cpu_threads(threads if D.device.type == "cpu" else None):
                svecs = top_singular_vectors(D, top_k)
            if name in prev:
                pn, PD, (pu, pv) = prev[name]
                layer = None
                if layer_of is not None:
                    layer = layer_of(name) if callable(layer_of) else layer_of.get(name)
                base = {"n_edits": n, "prev_n_edits": pn, "layer": layer, "param": name}
                rows.append({**base, "metric": "angle_flat", "value": flat_angle(D, PD)})
                rows.append({**base, "metric": "angle_top_out", "value": principal_angle(svecs[0], pu)})
                rows.append({**base, "metric": "angle_top_in", "value": principal_angle(svecs[1], pv)})
            prev[name] = (n, D, svecs)
    return pd.DataFrame(rows, columns=["n_edits", "prev_n_edits", "layer", "param", "metric", "value"])


# ---------------------------------------------------------------------------------------------------------------
# preserved-key subspace
# ---------------------------------------------------------------------------------------------------------------
def preserved_basis(*, C=None, K0=None, k: int | None = None, energy: float = 0.99) -> torch.Tensor:
    """Orthonormal basis U_k ``[d_in, k]`` of the top-k eigenspace of C = K0 K0ᵀ (``K0`` ``[d_in, N]``, keys as
    columns; or ``C`` ``[d_in, d_in]`` directly). ``k`` defaults to the smallest k whose eigenvalues hold ``energy``
    of tr C."""
    if (C is None) == (K0 is None):
        raise ValueError("give exactly one of C or K0")
    if K0 is not None:
        K = _t64(K0)
        U, s, _ = torch.linalg.svd(K, full_matrices=False)
        lam = s ** 2
    else:
        Cm = _t64(C)
        lam, U = torch.linalg.eigh((Cm + Cm.T) / 2)
        lam, U = lam.flip(0).clamp_min(0), U.flip(1)
    if k is None:
        total = float(lam.sum())
        if total <= 0:
            raise ValueError("the preserved-key covariance is zero")
        frac = torch.cumsum(lam, 0) / total
        k = int((frac < energy).sum()) + 1
    k = max(1, min(k, U.shape[1]))
    return U[:, :k]


def subspace_share(delta, basis: torch.Tensor) -> float:
    """Share (0–1) of ‖ΔW‖_F² in the row-space directions ``basis`` ``[d_in, k]`` (orthonormal columns)."""
    D = _t64(delta)
    total = float((D ** 2).sum())
    if total == 0:
        return math.nan
    return float(((D @ basis.to(D.device)) ** 2).sum()) / total


def subspace_angle(delta, basis: torch.Tensor) -> float:
    """arccos(√share) in degrees: 90° = the update does not touch the preserved-key subspace."""
    s = subspace_share(delta, basis)
    return math.nan if math.isnan(s) else _deg(math.sqrt(max(0.0, min(1.0, s))))


def key_angle_frame(deltas: Mapping[str, torch.Tensor], bases: Mapping[str, torch.Tensor], *,
                    n_edits: int | None = None, layer_of=None,
                    to_canonical: Callable[[torch.Tensor], torch.Tensor] | None = None) -> pd.DataFrame:
    """Rows ``n_edits, layer, param, metric, value`` with metric ``key_share`` (0–1) and ``key_angle`` (degrees) for
    every parameter that has a basis (see :func:`preserved_basis`)."""
    conv = to_canonical or (lambda t: t)
    rows = []
    for name, D in deltas.items():
        if name not in bases:
            continue
        D = conv(_t64(D))
        share = subspace_share(D, bases[name])
        layer = (layer_of(name) if callable(layer_of) else layer_of.get(name)) if layer_of is not None else None
        angle = math.nan if math.isnan(share) else _deg(math.sqrt(max(0.0, min(1.0, share))))
        rows.append({"n_edits": n_edits, "layer": layer, "param": name, "metric": "key_share", "value": share})
        rows.append({"n_edits": n_edits, "layer": layer, "param": name, "metric": "key_angle", "value": angle})
    return pd.DataFrame(rows, columns=["n_edits", "layer", "param", "metric", "value"])


# ---------------------------------------------------------------------------------------------------------------
# GeoEdit per-neuron angles
# ---------------------------------------------------------------------------------------------------------------
def row_angles(A, B) -> np.ndarray:
    """Angle (degrees) between row i of ``A`` and row i of ``B`` for every i (NaN where a row is zero). For GeoEdit,
    rows of τ_old and τ_new (raw) or of their latent codes h_old and h_new (Eq. 10)."""
    a, b = _t64(A), _t64(B)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1).to(a.device)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(1) / (na * nb)
    ang = torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))
    ang[(na == 0) | (nb == 0)] = math.nan
    return ang.cpu().numpy()


def classify_angles(angles, phi1: float = PHI1, phi2: float = PHI2) -> np.ndarray:
    """GeoEdit's classes per angle: "aligned" (< φ1), "orthogonal" (φ1..φ2), "conflicting" (> φ2); "" for NaN."""
    a = np.asarray(angles, dtype=np.float64)
    out = np.full(a.shape, "", dtype=object)
    out[a < phi1] = CLASSES[0]
    out[(a >= phi1) & (a <= phi2)] = CLASSES[1]
    out[a > phi2] = CLASSES[2]
    return out


def neuron_angle_frame(raw_angles, latent_angles=None, classes=None, *, phi1: float = PHI1, phi2: float = PHI2,
                       layer: int | None = None, param: str | None = None) -> pd.DataFrame:
    """GeoEdit Fig. 3 data: columns ``layer, param, neuron, space ("raw" | "latent"), angle, class``.

    ``classes`` (per neuron: names, or 0/1/2 for aligned/orthogonal/conflicting) defaults to the classification of
    the latent angles (the ones GeoEdit acts on), or of the raw angles when there are no latent ones; each neuron
    keeps its one class in both spaces so the two histograms can be split the same way.
    """
    raw = np.asarray(raw_angles, dtype=np.float64).reshape(-1)
    latent = None if latent_angles is None else np.asarray(latent_angles, dtype=np.float64).reshape(-1)
    if latent is not None and latent.shape != raw.shape:
        raise ValueError(f"raw ({raw.size}) and latent ({latent.size}) angles differ in length")
    if classes is None:
        cls = classify_angles(latent if latent is not None else raw, phi1, phi2)
    else:
        cls = np.asarray(classes).reshape(-1)
        if cls.size != raw.size:
            raise ValueError(f"{cls.size} classes for {raw.size} neurons")
        if np.issubdtype(cls.dtype, np.integer):
            cls = np.array([CLASSES[int(c)] for c in cls], dtype=object)
    frames = [pd.DataFrame({"neuron": np.arange(raw.size), "space": "raw", "angle": raw, "class": cls})]
    if latent is not None:
        frames.append(pd.DataFrame({"neuron": np.arange(raw.size), "space": "latent", "angle": latent, "class": cls}))
    df = pd.concat(frames, ignore_index=True)
    df.insert(0, "param", param)
    df.insert(0, "layer", layer)
    return df


def latent_angle_sweep(encode: Callable[[torch.Tensor], torch.Tensor], X, angles: Sequence[float] = (
        0.0, 30.0, 60.0, 85.0, 90.0, 95.0, 120.0, 150.0, 180.0), *, n_pairs: int = 50, seed: int = 0
                       ) -> pd.DataFrame:
    """How an encoder maps raw angles: for ``n_pairs`` random pairs of rows (x, z) of ``X`` ``[n, d]`` (e.g. neuron
    task vectors), y(θ) = |x|(cos θ u + sin θ w) with u = x/|x| and w the unit part of z orthogonal to x, so the raw
    angle between x and y(θ) is exactly θ inside the data's own span; the latent angle is the angle between
    ``encode(x)`` and ``encode(y)``.

    Returns:
        columns ``pair, raw, latent`` (degrees), one row per (pair, θ).
    """
    Xd = _t64(X)
    if Xd.ndim != 2 or Xd.shape[0] < 2:
        raise ValueError("X must be [n >= 2, d]")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for pair in range(n_pairs):
        i, j = torch.randperm(Xd.shape[0], generator=gen)[:2].tolist()
        x, z = Xd[i], Xd[j]
        if float(x.norm()) == 0:
            continue
        u = x / x.norm()
        w = z - (z @ u) * u
        if float(w.norm()) == 0:
            continue
        w = w / w.norm()
        ys = torch.stack([x.norm() * (math.cos(math.radians(t)) * u + math.sin(math.radians(t)) * w) for t in angles])
        with torch.no_grad():
            h = _t64(encode(torch.cat([x[None], ys]).to(torch.float32)))
        lat = row_angles(h[:1].expand(len(angles), -1), h[1:])
        rows.extend({"pair": pair, "raw": float(t), "latent": float(v)} for t, v in zip(angles, lat))
    return pd.DataFrame(rows, columns=["pair", "raw", "latent"])


def angle_summary(angles, phi1: float = PHI1, phi2: float = PHI2) -> dict[str, float]:
    """``mean, std, share_85_95`` (share within [φ1, φ2]) plus ``share_below_85, share_above_95, n`` (NaN dropped)."""
    a = np.asarray(angles, dtype=np.float64).reshape(-1)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return {"mean": math.nan, "std": math.nan, "share_85_95": math.nan, "share_below_85": math.nan,
                "share_above_95": math.nan, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std()),
            "share_85_95": float(((a >= phi1) & (a <= phi2)).mean()),
            "share_below_85": float((a < phi1).mean()), "share_above_95": float((a > phi2).mean()),
            "n": int(a.size)}


__all__ = ["flat_angle", "top_singular_vectors", "principal_angle", "factor_delta", "update_angles",
           "preserved_basis", "subspace_share", "subspace_angle", "key_angle_frame", "row_angles",
           "classify_angles", "neuron_angle_frame", "latent_angle_sweep", "angle_summary", "PHI1", "PHI2",
           "CLASSES"]
