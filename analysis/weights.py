"""Numerical health of an edited weight matrix: norms, condition number, effective rank, elementwise statistics.

What the seed papers plot against the number of edits (../shared/guides/EVALUATION.md, "Weight and representation
diagnostics"): Frobenius norm and condition number κ₂ = σ_max/σ_min of the edited matrix (MOSE Fig. 2, PRUNE),
elementwise max / min / mean / median and the norm of the edited layer (AdaEdit Table 1), and the same quantities of
the accumulated update ΔW = W − W0 plus its relative size ‖ΔW‖_F / ‖W0‖_F.

Every quantity here is invariant under transposition, so a weight may be passed in the canonical ``[d_out, d_in]``
orientation or in its parameter layout (GPT-2 ``Conv1D`` stores the transpose) with the same result.

Singular values, three ways (``method``):

* ``"gram"`` (the default for float32 / float16 / bfloat16 weights whose smaller side is at most
  ``exact_max_dim``): eigenvalues of the smaller Gram matrix A Aᵀ in float64. It squares the condition number, but in
  float64 the absolute error of every σ is about sqrt(d·eps64)·σ_max ≈ 3e-7·σ_max, the same size as the perturbation
  the float32 rounding of the weights themselves already causes (~eps32·σ_max), and a σ ≥ 1e-4·σ_max is obtained to
  ~1e-5 relative; tests compare it with ``torch.linalg.svdvals``. It is several times faster (one GEMM + a d×d
  symmetric eigensolve instead of a bidiagonalisation: ~35 ms instead of ~450 ms CPU time for a 576×1536 matrix on
  one core). Measured on constructed 576×1536 float32 matrices with cond 1e3 / 1e5 / 1e6, the Gram route agrees with
  ``svdvals`` to 4e-11 / 2e-7 / 1.4e-5 relative; both differ from the float64 original by more (the float32 rounding).
* ``"svd"``: ``torch.linalg.svdvals`` in float64 (the default for float64 inputs).
* ``"lanczos"`` (the default when the smaller side exceeds ``exact_max_dim``): matrix-free estimates, never forming a
  d×d matrix. Several independent Lanczos runs (full reorthogonalisation, batched as one block) on the operator
  x ↦ A(Aᵀx): σ_max from the largest Ritz value (converges fast and to high accuracy); σ_min from the smallest Ritz
  value (an upper bound that is accurate when the bottom of the spectrum is a soft edge, as for weight matrices and
  random matrices, and loose when the smallest singular values are isolated and tiny); the nuclear norm Σσ and the
  effective rank from stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017) of tr(G^{1/2}) and
  tr(G^{1/2} log G^{1/2}), with the exactly known tr G = ‖W‖_F² as a control variate (within ~0.2% on 600×2000 test
  matrices). A rank-r update with r below the number of steps is resolved exactly (Lanczos terminates on an
  invariant subspace). Measured on a
  600×2000 matrix (tests/unit/test_analysis_weights.py): σ_max exact to 1e-15, σ_min and cond to 1e-7 for a
  random-like spectrum, but 20% off for a spectrum with log-spaced singular values (isolated, tiny σ_min).

Condition numbers. For W, ``cond`` = σ_max / σ_min over all min(d_out, d_in) singular values (inf when σ_min is 0).
For the accumulated update ΔW, which is rank-deficient until enough edits have been made (r ≤ n_edits for ROME), the
plain ratio would be infinite or rounding noise, so ``delta_cond`` is the pseudo-inverse condition number
‖ΔW‖₂‖ΔW⁺‖₂ = σ_1 / σ_r (MOSE section 3's definition; PRUNE decomposes ΔW at its rank r), over the numerically non-zero
singular values σ_i > max(d_out, d_in)·eps(dtype)·σ_1 (numpy's ``matrix_rank`` rule with the eps of the INPUT dtype);
``delta_rank`` is that r.

Effective rank (Roy & Vetterli 2007): exp(H(p)) with p_i = σ_i / Σ_j σ_j, between 1 and min(d_out, d_in).
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch

log = logging.getLogger(__name__)

#: metrics of W (always present)
W_METRICS = ("fro", "spectral", "nuclear", "cond", "effective_rank", "max", "min", "mean", "median")
#: metrics of ΔW = W − W0 (present when W0 is given)
DELTA_METRICS = ("delta_fro", "delta_spectral", "delta_nuclear", "delta_cond", "delta_effective_rank", "delta_rank",
                 "rel_change")
METHODS = ("auto", "gram", "svd", "lanczos")


# ---------------------------------------------------------------------------------------------------------------
# singular values
# ---------------------------------------------------------------------------------------------------------------
def _as_matrix(W: torch.Tensor) -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        W = torch.as_tensor(np.asarray(W))
    if W.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(W.shape)}")
    return W.detach()


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else float(torch.finfo(torch.float32).eps)


def _wide(W64: torch.Tensor) -> torch.Tensor:
    """The orientation A = [d, n] with d ≤ n (singular values are the same)."""
    return W64 if W64.shape[0] <= W64.shape[1] else W64.T


def _resolve_method(shape, dtype: torch.dtype, method: str, exact_max_dim: int) -> str:
    """The method "auto" stands for, given the matrix shape and the dtype the weight was STORED in."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if method != "auto":
        return method
    if min(shape) > exact_max_dim:
        return "lanczos"
    return "svd" if dtype == torch.float64 else "gram"


def _sigma(W64: torch.Tensor, method: str) -> np.ndarray:
    """Full descending spectrum of a float64 matrix by "svd" or "gram"."""
    if min(W64.shape) == 0:
        return np.zeros(0)
    if method == "svd":
        s = torch.linalg.svdvals(W64)
    else:
        A = _wide(W64)
        lam = torch.linalg.eigvalsh(A @ A.T)
        s = lam.clamp_min(0).sqrt().flip(0)
    return s.cpu().numpy()


def singular_values(W: torch.Tensor, *, method: str = "auto", exact_max_dim: int = 2048,
                    threads: int | None = 1) -> np.ndarray:
    """All min(d_out, d_in) singular values of ``W`` (any orientation), descending, float64.

    ``method`` "auto" picks "gram" (float32/16 inputs) or "svd" (float64 inputs); a full spectrum has no
    matrix-free route, so "lanczos" (and "auto" for large matrices) uses "gram". ``threads``: see
    :func:`cpu_threads`.
    """
    W = _as_matrix(W)
    m = _resolve_method(W.shape, W.dtype, method, exact_max_dim)
    if m == "lanczos":
        m = "gram"  # a full spectrum needs the full eigensolve; the Gram route is the cheaper exact one
    with cpu_threads(threads if W.device.type == "cpu" else None):
        return _sigma(W.to(torch.float64), m)


def _spectral_summary(s: np.ndarray, dtype: torch.dtype, shape: tuple[int, int]) -> dict[str, float]:
    """Norms, condition numbers, effective rank and numerical rank from a full descending spectrum."""
    if s.size == 0 or s[0] <= 0:
        return {"spectral": 0.0, "nuclear": 0.0, "cond": math.inf, "cond_pinv": math.inf,
                "effective_rank": 0.0, "rank": 0.0}
    s1 = float(s[0])
    nuclear = float(s.sum())
    tol = max(shape) * _eps(dtype) * s1
    nz = s[s > tol]
    smin = float(s[-1])
    return {
        "spectral": s1,
        "nuclear": nuclear,
        "cond": s1 / smin if smin > 0 else math.inf,
        "cond_pinv": s1 / float(nz[-1]),
        "effective_rank": effective_rank_from_sigma(s),
        "rank": float(nz.size),
    }


def effective_rank_from_sigma(s: np.ndarray) -> float:
    """exp(entropy) of the normalised singular values (Roy & Vetterli 2007); 0 for a zero matrix."""
    s = np.asarray(s, dtype=np.float64)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def effective_rank(W: torch.Tensor, **kw) -> float:
    """Effective rank of ``W`` (Roy & Vetterli 2007)."""
    return effective_rank_from_sigma(singular_values(W, **kw))


# ---------------------------------------------------------------------------------------------------------------
# matrix-free estimates (block Lanczos with full reorthogonalisation, one independent run per probe vector)
# ---------------------------------------------------------------------------------------------------------------
def lanczos_gram(W: torch.Tensor, *, steps: int = 96, probes: int = 8, seed: int = 0
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Ritz values θ and quadrature weights τ² of G = A Aᵀ (A = the wide orientation of ``W``) from ``probes``
    independent Lanczos runs of ``steps`` steps started at random unit vectors (batched: one block product per step).

    Returns per probe (θ ascending, τ² summing to 1). Σ_k τ_k² f(θ_k) ≈ vᵀ f(G) v, so d·mean over probes estimates
    tr f(G) (stochastic Lanczos quadrature). A run that finds an invariant subspace stops early (shorter arrays).
    """
    A = _wide(_as_matrix(W).to(torch.float64))
    d = A.shape[0]
    m = max(1, min(steps, d))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Q = torch.zeros(probes, m, d, dtype=torch.float64, device=A.device)  # Lanczos bases, one per probe
    q = torch.randn(probes, d, generator=gen, dtype=torch.float64).to(A.device)
    q = q / q.norm(dim=1, keepdim=True)
    alpha = torch.zeros(m, probes, dtype=torch.float64)
    beta = torch.zeros(m, probes, dtype=torch.float64)
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros(probes, 1, dtype=torch.float64, device=A.device)
    length = torch.full((probes,), m, dtype=torch.long)
    for j in range(m):
        Q[:, j] = q
        w = (q @ A) @ A.T  # rows: (G q_p)ᵀ, without forming G
        a = (q * w).sum(1, keepdim=True)
        w = w - a * q - b_prev * q_prev
        basis = Q[:, : j + 1]  # [p, j+1, d]
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - torch.bmm(torch.bmm(basis, w[:, :, None]).transpose(1, 2), basis)[:, 0]
        b = w.norm(dim=1, keepdim=True)
        alpha[j] = a[:, 0].cpu()
        beta[j] = b[:, 0].cpu()
        scale = alpha[: j + 1].abs().amax(0).clamp_min(1e-300)
        broke = (beta[j] <= 1e-10 * scale) & (length == m)
        length[broke] = j + 1  # invariant subspace found: the tridiagonal so far is exact
        if bool((length <= j + 1).all()):
            break
        q_prev, q = q, w / b.clamp_min(1e-300)
        b_prev = b
    thetas, weights = [], []
    for p in range(probes):
        L = int(length[p])
        T = torch.diag(alpha[:L, p])
        if L > 1:
            off = beta[: L - 1, p]
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        th, S = torch.linalg.eigh(T)
        thetas.append(th.clamp_min(0).numpy())
        weights.append((S[0] ** 2).numpy())
    return thetas, weights


def _slq_trace(f_vals: list[np.ndarray], weights: list[np.ndarray], g_vals: list[np.ndarray], g_trace: float,
               d: int) -> float:
    """SLQ estimate of tr f(G) with the exactly known tr g(G) as a control variate (g = identity here: tr G =
    ‖W‖_F²): per probe x_p = vᵀf(G)v, y_p = vᵀg(G)v; estimate d·mean(x − c·y) + c·tr g with the regression slope c."""
    x = np.array([(w * f).sum() for f, w in zip(f_vals, weights)])
    y = np.array([(w * g).sum() for g, w in zip(g_vals, weights)])
    c = 0.0
    if x.size > 2 and y.var() > 0:
        c = float(np.cov(x, y)[0, 1] / y.var(ddof=1))
    return float(d * (x - c * y).mean() + c * g_trace)


def _lanczos_summary(W: torch.Tensor, dtype: torch.dtype, *, steps: int, probes: int, seed: int
                     ) -> dict[str, float]:
    d = min(W.shape)
    thetas, weights = lanczos_gram(W, steps=steps, probes=probes, seed=seed)
    short = [t for t in thetas if t.size < min(steps, d)]
    if short:
        # a run that terminated early spans an invariant subspace containing the whole range of G (a random start
        # has a component along every eigenvector): its Ritz values ARE the non-zero spectrum, the rest is zero
        s = np.sort(np.sqrt(short[0]))[::-1]
        s = np.concatenate([s, np.zeros(max(0, d - s.size))])[:d]
        return _spectral_summary(s, dtype, tuple(W.shape))
    lam_max = max(float(t.max()) for t in thetas)
    if lam_max <= 0:
        return {"spectral": 0.0, "nuclear": 0.0, "cond": math.inf, "cond_pinv": math.inf,
                "effective_rank": 0.0, "rank": 0.0}
    s1 = math.sqrt(lam_max)
    tol = max(W.shape) * _eps(dtype) * s1
    s_all = [np.sqrt(t) for t in thetas]
    smin = min(float(s.min()) for s in s_all)
    smin_nz = min((float(s[s > tol].min()) for s in s_all if (s > tol).any()), default=s1)
    # stochastic Lanczos quadrature: tr f(G) ≈ d · mean_p Σ_k τ_pk² f(θ_pk), with tr G = ‖W‖_F² as control variate
    fro2 = float((W.to(torch.float64) ** 2).sum())
    nuclear = _slq_trace(s_all, weights, thetas, fro2, d)
    slog = [np.where(s > 0, s * np.log(np.where(s > 0, s, 1.0)), 0.0) for s in s_all]
    slogs = _slq_trace(slog, weights, thetas, fro2, d)
    rank = d * float(np.mean([(w * (s > tol)).sum() for s, w in zip(s_all, weights)]))
    erank = math.exp(math.log(nuclear) - slogs / nuclear) if nuclear > 0 else 0.0
    return {
        "spectral": s1,
        "nuclear": nuclear,
        "cond": s1 / smin if smin > tol * 1e-6 else math.inf,
        "cond_pinv": s1 / smin_nz,
        "effective_rank": min(erank, float(d)),
        "rank": float(round(rank)),
    }


# ---------------------------------------------------------------------------------------------------------------
# one matrix
# ---------------------------------------------------------------------------------------------------------------
@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """At most ``n`` torch intra-op threads for the block (restored afterwards); ``None`` changes nothing.

    Why: these eigensolves are small. On the shared 2-core CPU under load, two OpenMP threads made the 576×576
    eigensolve 8x and a 576×1536 ``svdvals`` 20x slower than one thread (a descheduled thread stalls the other at
    every barrier), and ``matrix_stats`` of one 576×1536 matrix took 8 s instead of 0.26 s.
    """
    old = torch.get_num_threads()
    if n is None or old <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _median(x: np.ndarray) -> float:
    n = x.size
    if n == 0:
        return math.nan
    k = n // 2
    part = np.partition(x, k)  # one O(n) selection; part[:k] holds the k smallest
    if n % 2:
        return float(part[k])
    return float((part[:k].max() + part[k]) / 2)


def _median_on_device(x: torch.Tensor) -> float:
    """The median of a flat tensor where it lives (a GPU's matrix is not copied to the host): the mean of the two
    middle order statistics for an even size, like :func:`numpy.median` and :func:`_median`."""
    n = x.numel()
    if n == 0:
        return math.nan
    k = n // 2
    upper = torch.kthvalue(x, k + 1).values  # the (k+1)-th smallest
    if n % 2:
        return float(upper)
    return float((torch.kthvalue(x, k).values + upper) / 2)


def _summary(W: torch.Tensor, dtype: torch.dtype, method: str, exact_max_dim: int, steps: int, probes: int,
             seed: int) -> dict[str, float]:
    m = _resolve_method(W.shape, dtype, method, exact_max_dim)
    if m == "lanczos":
        return _lanczos_summary(W, dtype, steps=steps, probes=probes, seed=seed)
    return _spectral_summary(_sigma(W, m), dtype, tuple(W.shape))


def matrix_stats(W: torch.Tensor, W0: torch.Tensor | None = None, *, exact_max_dim: int = 2048,
                 method: str = "auto", lanczos_steps: int = 96, lanczos_probes: int = 8, seed: int = 0,
                 threads: int | None = 1) -> dict[str, float]:
    """Statistics of one weight matrix ``W`` ``[d_out, d_in]`` (either layout) and, with ``W0``, of ΔW = W − W0.

    Keys: ``fro, spectral, nuclear, cond, effective_rank, max, min, mean, median`` and, with ``W0``,
    ``delta_fro, delta_spectral, delta_nuclear, delta_cond, delta_effective_rank, delta_rank, rel_change``
    (see the module docstring for the definitions and for ``method``). ``threads``: cap on torch CPU threads
    while computing (see :func:`cpu_threads`; ``None`` = leave as set). For 576×1536 on one CPU core: ~40 ms
    without ``W0``, ~85 ms with it (CPU time).
    """
    W = _as_matrix(W)
    if W.device.type != "cpu":
        threads = None
    with cpu_threads(threads):
        return _matrix_stats(W, W0, exact_max_dim=exact_max_dim, method=method, lanczos_steps=lanczos_steps,
                             lanczos_probes=lanczos_probes, seed=seed)


def _matrix_stats(W: torch.Tensor, W0: torch.Tensor | None, *, exact_max_dim: int, method: str,
                  lanczos_steps: int, lanczos_probes: int, seed: int) -> dict[str, float]:
    dtype = W.dtype if W.dtype.is_floating_point else torch.float32
    W64 = W.to(torch.float64)
    flat = W64.reshape(-1)
    out: dict[str, float] = {"fro": float(torch.linalg.vector_norm(flat))}
    spec = _summary(W64, dtype, method, exact_max_dim, lanczos_steps, lanczos_probes, seed)
    out.update(spectral=spec["spectral"], nuclear=spec["nuclear"], cond=spec["cond"],
               effective_rank=spec["effective_rank"])
    out["max"] = float(flat.max()) if flat.numel() else math.nan
    out["min"] = float(flat.min()) if flat.numel() else math.nan
    out["mean"] = float(flat.mean()) if flat.numel() else math.nan
    flat_w = W.reshape(-1)
    out["median"] = _median(flat_w.numpy()) if flat_w.device.type == "cpu" else _median_on_device(flat_w)
    if W0 is not None:
        W0 = _as_matrix(W0)
        if tuple(W0.shape) != tuple(W.shape):
            raise ValueError(f"W0 shape {tuple(W0.shape)} != W shape {tuple(W.shape)}")
        W0_64 = W0.to(W64.device, torch.float64)
        D = W64 - W0_64  # exact: the difference of two float32 numbers is representable in float64
        dspec = _summary(D, dtype, method, exact_max_dim, lanczos_steps, lanczos_probes, seed)
        dfro = float(torch.linalg.vector_norm(D))
        w0fro = float(torch.linalg.vector_norm(W0_64))
        out.update(delta_fro=dfro, delta_spectral=dspec["spectral"], delta_nuclear=dspec["nuclear"],
                   delta_cond=dspec["cond_pinv"] if dfro > 0 else math.nan,
                   delta_effective_rank=dspec["effective_rank"], delta_rank=dspec["rank"],
                   rel_change=dfro / w0fro if w0fro > 0 else math.nan)
    return out


# ---------------------------------------------------------------------------------------------------------------
# long-form frames
# ---------------------------------------------------------------------------------------------------------------
LayerOf = Callable[[str], "int | None"] | Mapping[str, int] | None


def preserved_output_change(W: torch.Tensor, W0: torch.Tensor, C: torch.Tensor, *,
                            reference_trace: float | None = None) -> float:
    """How much the outputs of the preserved keys moved: ``sqrt(tr(ΔW C ΔWᵀ) / tr(W0 C W0ᵀ))`` with ΔW = W − W0.

    ``W``, ``W0``: canonical ``[d_out, d_in]``; ``C = E[k kᵀ]`` ``[d_in, d_in]`` of the layer's inputs on the unedited
    model (editors.stats). It is the RMS over preserved keys k of ``‖ΔW k‖`` divided by the RMS of ``‖W0 k‖``:
    MOSE's preservation term ``‖R W0 K0 − W0 K0‖²`` (Eq. 17) and MEMIT's ``‖ΔW K0‖²``, relative (0 = preserved
    outputs unchanged; a rotation by θ of every output gives 2 sin(θ/2)). Float64. ``reference_trace``:
    ``tr(W0 C W0ᵀ)`` when already known.
    """
    W64, W0_64 = W.detach().to(torch.float64), W0.detach().to(torch.float64)
    C64 = C.detach().to(W64.device, torch.float64)
    if W64.shape != W0_64.shape or C64.shape != (W64.shape[1], W64.shape[1]):
        raise ValueError(f"shapes: W {tuple(W64.shape)}, W0 {tuple(W0_64.shape)}, C {tuple(C64.shape)} "
                         f"(need W, W0 [d_out, d_in] and C [d_in, d_in])")
    D = W64 - W0_64
    num = float(((D @ C64) * D).sum())
    den = reference_trace if reference_trace is not None else float(((W0_64 @ C64) * W0_64).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else math.nan


def _layer(layer_of: LayerOf, name: str):
    if layer_of is None:
        return None
    if callable(layer_of):
        return layer_of(name)
    return layer_of.get(name)


def weight_stats_frame(weights: Mapping[str, torch.Tensor], W0s: Mapping[str, torch.Tensor] | None = None, *,
                       step: int | None = None, n_edits: int | None = None, layer_of: LayerOf = None,
                       **stats_kw) -> pd.DataFrame:
    """Long-form statistics of several matrices at one checkpoint.

    Args:
        weights: parameter name -> current weight (parameter layout or canonical; the statistics do not care).
        W0s: parameter name -> unedited weight (adds the ``delta_*`` metrics and ``rel_change``); optional.
        step, n_edits: checkpoint coordinates copied into every row.
        layer_of: ``lm.spec.layer_of`` (name -> layer index) or a mapping; ``None`` leaves ``layer`` empty.
        stats_kw: forwarded to :func:`matrix_stats`.

    Returns:
        columns ``n_edits, step, layer, param, metric, value``; one row per (param, metric).
    """
    rows = []
    for name, W in weights.items():
        W0 = W0s.get(name) if W0s is not None else None
        stats = matrix_stats(W, W0, **stats_kw)
        layer = _layer(layer_of, name)
        for metric, value in stats.items():
            rows.append({"n_edits": n_edits, "step": step, "layer": layer, "param": name, "metric": metric,
                         "value": float(value)})
    return pd.DataFrame(rows, columns=["n_edits", "step", "layer", "param", "metric", "value"])


def spectrum_frame(weights: Mapping[str, torch.Tensor], W0s: Mapping[str, torch.Tensor] | None = None, *,
                   n_edits: int | None = None, layer_of: LayerOf = None, top: int | None = None,
                   method: str = "auto", exact_max_dim: int = 2048, threads: int | None = 1) -> pd.DataFrame:
    """Singular-value spectra for spectrum views: columns ``n_edits, layer, param, which, index, sigma`` where
    ``which`` is "W" or "delta" (ΔW = W − W0, when ``W0s`` has the parameter) and ``index`` starts at 1."""
    rows = []
    for name, W in weights.items():
        layer = _layer(layer_of, name)
        W = _as_matrix(W)
        m = _resolve_method(W.shape, W.dtype, method, exact_max_dim)
        m = "gram" if m == "lanczos" else m
        W64 = W.to(torch.float64)
        mats = [("W", W64)]
        if W0s is not None and name in W0s:
            mats.append(("delta", W64 - _as_matrix(W0s[name]).to(W64.device, torch.float64)))
        for which, M in mats:
            with cpu_threads(threads if M.device.type == "cpu" else None):
                s = _sigma(M, m)
            if top is not None:
                s = s[:top]
            rows.extend({"n_edits": n_edits, "layer": layer, "param": name, "which": which, "index": i + 1,
                         "sigma": float(v)} for i, v in enumerate(s))
    return pd.DataFrame(rows, columns=["n_edits", "layer", "param", "which", "index", "sigma"])


__all__ = ["matrix_stats", "weight_stats_frame", "singular_values", "spectrum_frame", "effective_rank", "cpu_threads",
           "effective_rank_from_sigma", "lanczos_gram", "W_METRICS", "DELTA_METRICS"]
