"""AdaEdit (Li & Chu; ../shared/papers/adaedit.txt): FFN-only targets, the MEMIT/PMET solve, and SRFusion.

No public code exists (guides METHODS.md 9); the paper is the spec.

1. Perturbation (section 4.1, Eq. 1 and its closed form): ``Δ = R* K1ᵀ (λC + K1 K1ᵀ)⁻¹`` with ``R* = V1 - W0 K1``,
   where the targets ``V1`` are computed from FFN-only hidden states ("we alter the optimization goal ... W is
   computed with FFN-only hidden states"; "the same [layers] as MEMIT or PMET"). This is PMET's FFN-only variant
   (:mod:`editors.pmet`): the target is optimised at the MLP output of the last edit layer ``L`` and the residual is
   spread over the layers ``L-4 .. L`` by ``1/sqrt(L - i)``; the batched multi-layer loop is
   :func:`editors.multilayer.multilayer_update`.
2. SRFusion (section 4.2, Eq. 2-4), applied to EVERY layer's ``Δ`` before it is merged:

   * ``Δ ≈ Σ_{i≤r} σ_i u_i v_iᵀ`` (top ``r`` singular triples, Eq. 2);
   * ``u'_i = T_k(u_i)``, ``v'_i = T_k(v_i)``: keep the ``k`` entries of largest absolute value, zero the rest;
   * ``u'_i <- (||u_i|| / ||u'_i||) u'_i`` and the same for ``v'_i`` (Eq. 3: the original ℓ2 norms, 1 for SVD
     vectors);
   * ``Δ̂ = Σ_{i≤r} σ_i u'_i v'_iᵀ`` (Eq. 4).

   The sparsification runs inside the layer loop (the solve returns ``Δ̂``), so the layers above see, and their
   residuals account for, the sparsified update that is actually merged.

Where the layer loop measures the residual (``residual_site``): PMET's reference (and this workbench's PMET) reads
the current value at the last edit layer's MLP OUTPUT (``"mlp_out"``, the default: what "the same settings as PMET"
gives). Editing layers L-4..L-1 also changes the input of layer L's MLP, and so its output: measured on SmolLM2-135M
(7 sequential CounterFact edits, docs/reproductions.md ## AdaEdit) the MLP-output residual GROWS while the layers
below L are edited (111 -> 133), so layer L's update is 2x the residual-stream accounting's (8.1 vs 4.2) and the
per-edit total 26% larger (28.5 vs 21.1). ``"residual"`` carries the target change δ found at
the MLP output to the residual stream (writing δ at L's MLP output adds δ to the stream after L) and measures the
residual there, as MEMIT does (:func:`editors.multilayer.multilayer_update`, ``residual_site``); docs/reproductions.md
(## AdaEdit) measures whether that delays the collapse.

For the paper's comparison of sparsification strategies (Fig. 4b and 5) ``sparsify`` also offers ``"random_drop"``
(DR: each entry of ``Δ`` is kept with probability ``keep_fraction``; the paper sets the others to zero, with no
rescaling; ``dr_rescale`` adds DARE's 1/keep_fraction), ``"topk_magnitude"`` (keep the ``keep_fraction`` of
entries of largest ``|Δ|``) and ``"none"`` (the vanilla PMET-FFN update, the dashed line of Fig. 4b).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from .base import EditResult
from .fields import check_choice, check_range, help_meta
from .memit import memit_solve
from .multilayer import SITES, SPREADS, TINY_OVERRIDES, LayerState, MultiLayerConfig, MultiLayerEditor, MultiLayerOutput
from .registry import register
from .requests import EditRequest

log = logging.getLogger(__name__)

SPARSIFY = ("sr", "random_drop", "topk_magnitude", "none")


# =================================================================================================================
# sparsification strategies
# =================================================================================================================
def resolve_k(k: float, length: int) -> int:
    """Entries ``T_k`` keeps of a vector of ``length``: ``k`` itself when ``k >= 1`` (a count), else
    ``ceil(k · length)`` (a fraction in (0, 1)); always within ``[1, length]``."""
    if not k > 0:
        raise ValueError(f"k must be > 0, got {k}")
    n = int(round(k)) if k >= 1 else math.ceil(k * length)
    return max(1, min(length, n))


def _top_indices(a: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last dimension; ties go to the lower position (a stable
    sort, so the choice is deterministic on every device)."""
    return torch.sort(a, dim=-1, descending=True, stable=True).indices[..., :k]


def hard_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    """``T_k``: keep the ``k`` entries of largest ``|x|`` along the last dimension (exactly ``k``, ties broken by
    position), zero the rest."""
    if k >= x.shape[-1]:
        return x.clone()
    idx = _top_indices(x.abs(), k)
    out = torch.zeros_like(x)
    return out.scatter(-1, idx, x.gather(-1, idx))


@dataclass
class SRFactors:
    """The sparsified triples of :func:`sr_fusion`: ``Δ̂ = U' diag(S) V'ᵀ``.

    Attributes:
        U: ``[m, r]`` sparsified, renormalised left singular vectors (columns).
        S: ``[r]`` the kept singular values.
        V: ``[n, r]`` sparsified, renormalised right singular vectors (columns).
        k_u, k_v: non-zeros kept per column of U and of V.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    k_u: int
    k_v: int


#: values of AdaEditConfig.svd
SVD_METHODS = ("auto", "exact", "randomized")
#: extra columns of the randomised range finder beyond r, and its power iterations
SVD_OVERSAMPLE, SVD_POWER_ITERS = 8, 2


def top_svd(D: torch.Tensor, r: int, *, method: str = "auto", oversample: int = SVD_OVERSAMPLE,
            n_iter: int = SVD_POWER_ITERS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading singular triples ``(U [m, q], S [q], Vh [q, n])`` of ``D`` (float64), at least ``r`` of them.

    ``"exact"``: the full thin SVD (O(m n min(m, n))). ``"randomized"`` (Halko, Martinsson & Tropp 2011, Alg. 4.4):
    an orthonormal basis ``Q`` of ``D Ω`` for a seeded Gaussian ``Ω [n, q]``, ``q = r + oversample``, refined by
    ``n_iter`` power iterations, then the SVD of ``Qᵀ D [q, n]``: O(m n q). When ``rank(D) <= q`` (a MEMIT-family
    Δ of a batch of at most q edits) ``Q`` spans D's column space and the triples are exact to rounding; above
    that the top-r ones are approximated with error ~ (σ_{q+1} / σ_r)^(2 n_iter + 1). ``"auto"``: randomized when
    ``min(m, n) > 4 q``, else exact.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"svd method must be one of {', '.join(SVD_METHODS)}, got {method!r}")
    D = D.double()
    q = min(int(r) + int(oversample), *D.shape)
    if method == "exact" or (method == "auto" and min(D.shape) <= 4 * q):
        return torch.linalg.svd(D, full_matrices=False)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(D.shape[1], q, generator=gen, dtype=torch.float64).to(D.device)
    Q, _ = torch.linalg.qr(D @ omega)
    for _ in range(int(n_iter)):
        Q, _ = torch.linalg.qr(D.T @ Q)
        Q, _ = torch.linalg.qr(D @ Q)
    Ub, S, Vh = torch.linalg.svd(Q.T @ D, full_matrices=False)
    return Q @ Ub, S, Vh


def sr_factors(delta: torch.Tensor, r: int, k: float, *, svd: str = "exact") -> SRFactors:
    """Eq. 2-3 of adaedit.txt on ``delta [m, n]`` (float64 inside): top-``r`` SVD triples (numerically zero
    singular values are dropped; ``svd``: how they are found, :func:`top_svd`), hard threshold ``T_k`` of every
    singular vector, renormalised to its original ℓ2 norm."""
    D = delta.double()
    U, S, Vh = top_svd(D, r, method=svd)
    tol = max(D.shape) * torch.finfo(torch.float64).eps * (float(S[0]) if S.numel() else 0.0)
    keep = min(int(r), int((S > tol).sum()))
    U, S, V = U[:, :keep], S[:keep], Vh[:keep].T
    k_u, k_v = resolve_k(k, D.shape[0]), resolve_k(k, D.shape[1])
    Us = hard_threshold(U.T, k_u).T  # threshold each column
    Vs = hard_threshold(V.T, k_v).T
    Us = Us * (U.norm(dim=0) / Us.norm(dim=0).clamp_min(1e-300))
    Vs = Vs * (V.norm(dim=0) / Vs.norm(dim=0).clamp_min(1e-300))
    return SRFactors(U=Us, S=S, V=Vs, k_u=k_u, k_v=k_v)


def sr_fusion(delta: torch.Tensor, r: int, k: float, *, svd: str = "exact") -> torch.Tensor:
    """SRFusion (adaedit.txt Eq. 2-4): ``Δ̂ = Σ_{i≤r} σ_i u'_i v'_iᵀ`` in ``delta``'s dtype."""
    f = sr_factors(delta, r, k, svd=svd)
    return ((f.U * f.S) @ f.V.T).to(delta.dtype)


def random_drop(delta: torch.Tensor, keep_fraction: float, generator: torch.Generator, *,
                rescale: bool = False) -> torch.Tensor:
    """DR (adaedit.txt section 3.1): keep each entry with probability ``keep_fraction``, zero the others
    (``rescale``: divide the kept ones by ``keep_fraction``, as DARE does)."""
    mask = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < keep_fraction
    out = delta * mask.to(delta.device, delta.dtype)
    return out / keep_fraction if rescale else out


def topk_magnitude(delta: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Top-k% (adaedit.txt section 3.1): keep the ``round(keep_fraction · numel)`` entries of largest ``|Δ|`` (ties
    to the lower flat index)."""
    n = max(1, min(delta.numel(), int(round(keep_fraction * delta.numel()))))
    flat = delta.reshape(-1)
    idx = _top_indices(flat.abs(), n)
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(delta.shape)


# =================================================================================================================
# config
# =================================================================================================================
@dataclass
class AdaEditConfig(MultiLayerConfig):
    """Config of ``adaedit``. The perturbation uses PMET's FFN-only settings (EasyEdit hparams/PMET/llama-7b.yaml:
    layers [4..8] = L-4..L, v_lr 0.5, λ 15000; the paper: "hyperparameters ... in accord with the EasyEdit
    framework") mapped to SmolLM2-135M (METHODS.md 13), except the target clamp and steps (ROME's values for an
    MLP-output target: see ``clamp_norm_factor``). r and k are not published; the defaults are argued in their help
    texts."""

    version: ClassVar[int] = 1

    v_num_grad_steps: int = field(default=25, metadata=help_meta(
        "Adam steps of the FFN-only target optimisation (section 4.1; EasyEdit PMET llama-7b: 20, ROME / MEMIT "
        "Llama3-8B: 25). 25 with the wider clamp below."))
    v_lr: float = field(default=0.5, metadata=help_meta(
        "Adam learning rate of the FFN-only target optimisation (EasyEdit PMET llama-7b: 0.5)."))
    clamp_norm_factor: float = field(default=4.0, metadata=help_meta(
        "||δ|| <= clamp_norm_factor · ||mlp_out_init|| (EasyEdit PMET llama-7b: 1; ROME, whose target is also the "
        "MLP output: 4). 4, because on SmolLM2-135M 1 leaves hard facts out of reach (docs/DEFAULTS.md)."))
    mom2_update_weight: float = field(default=15000.0, metadata=help_meta(
        "λ in Δ = R* K1ᵀ (λC + K1 K1ᵀ)⁻¹ (section 4.1 / Appendix C.1 Eq. 6: C0 = λ·E[k kᵀ]; PMET/MEMIT: 15000)."))
    spread: str = field(default="sqrt", metadata=help_meta(
        "How the residual R* is spread over the edit layers ('we need to spread the residual delta weights to all "
        "target layers ... the same as MEMIT or PMET'): 'sqrt' (PMET, FFN-only targets: R / sqrt(L - i)) or "
        "'linear' (MEMIT: R / (L - i))."))
    sparsify: str = field(default="sr", metadata=help_meta(
        "Fusion of each layer's Δ: 'sr' = SRFusion (Eq. 2-4, AdaEdit); 'random_drop' = DR and 'topk_magnitude' = "
        "Top-k% (the strategies of section 3.1 / Fig. 4b and 5, rate keep_fraction); 'none' = vanilla (PMET-FFN)."))
    r: int = field(default=4, metadata=help_meta(
        "SRFusion rank: singular triples kept (Eq. 2). Δ of a batch of n edits has rank <= n (Observation 3.4), so "
        "any r >= batch size keeps every triple; 4 covers batches up to 4 and truncates larger ones."))
    k: float = field(default=0.45, metadata=help_meta(
        "SRFusion hard threshold T_k: entries kept per singular vector (Eq. 2 step 2). A value >= 1 is a count "
        "(the same k for u_i and v_i, clipped to their lengths); a value in (0, 1) is a fraction of each vector's "
        "length. Default 0.45: a rank-1 Δ̂ then has 0.45² ≈ 20% non-zero entries, the density at which the paper "
        "finds the perturbation still fully effective (Observation 3.2, Fig. 4b)."))
    svd: str = field(default="auto", metadata=help_meta(
        "How SRFusion finds the top-r singular triples: 'exact' (full thin SVD, O(d d_ff min(d, d_ff)) per layer "
        "per edit: 4096x14336 on an 8B model), 'randomized' (seeded range finder with r+8 columns and 2 power "
        "iterations, O(d d_ff (r+8)); exact to rounding when the batch has at most r+8 edits, since Δ then has "
        "rank <= r+8), 'auto' (randomized when min(d, d_ff) > 4 (r+8), else exact)."))
    keep_fraction: float = field(default=0.2, metadata=help_meta(
        "Rate of 'random_drop' / 'topk_magnitude': fraction of Δ's entries kept (section 3.1: 'only retaining 20% "
        "of parameters does not hurt')."))
    dr_rescale: bool = field(default=False, metadata=help_meta(
        "'random_drop' only: divide the kept entries by keep_fraction (DARE, Yu et al. 2024). The paper sets the "
        "dropped entries to zero and mentions no rescaling: off by default."))

    residual_site: str = field(default="mlp_out", metadata=help_meta(
        "Where the residual z - current of the layer loop is measured: 'mlp_out' = the last edit layer's MLP output "
        "(PMET's reference code, which AdaEdit follows: 'the same settings as MEMIT or PMET'); 'residual' = the "
        "residual stream after that layer, the target change δ carried there (MEMIT's accounting; editing the "
        "lower layers then no longer inflates the residual the upper ones are asked to write). Module docstring."))
    z_attention: bool = field(default=False, metadata=help_meta(
        "Optimise a delta at the last edit layer's attention output jointly with the MLP-output target (PMET's "
        "reference compute_zs; the paper: 'computes the target knowledge representations by separately optimizing "
        "the attention and FFN hidden states'). Off by default (the FFN-only target); the preset variant 'paper' "
        "turns it on."))
    adaptive_nll: bool = field(default=False, metadata=help_meta(
        "PMET compute_zs' adaptive NLL (x0.1 once the target is the argmax everywhere, stop at a KL term <= 0.01). "
        "Off by default; the preset variant 'paper' turns it on."))

    def z_kwargs(self) -> dict:
        return {**super().z_kwargs(), "attn_delta": self.z_attention, "adaptive_nll": self.adaptive_nll}

    def validate(self) -> None:
        super().validate()
        check_range("mom2_update_weight", self.mom2_update_weight, 0, lo_open=True)
        check_choice("residual_site", self.residual_site, SITES)
        check_choice("spread", self.spread, SPREADS)
        check_choice("sparsify", self.sparsify, SPARSIFY)
        check_range("r", self.r, 1)
        check_range("k", self.k, 0, lo_open=True, note="a count >= 1 or a fraction in (0, 1)")
        check_choice("svd", self.svd, SVD_METHODS)
        check_range("keep_fraction", self.keep_fraction, 0, 1, lo_open=True)


# =================================================================================================================
# the editor
# =================================================================================================================
@register(family="constrained", collapse_study=True, order=100, tiny=TINY_OVERRIDES)
class AdaEditEditor(MultiLayerEditor):
    """AdaEdit: PMET-FFN perturbation per layer, fused by SRFusion (SVD, top-r, hard-threshold, renormalise)."""

    name: ClassVar[str] = "adaedit"
    config_cls: ClassVar[type] = AdaEditConfig
    summary: ClassVar[str] = ("AdaEdit: FFN-only targets + MEMIT/PMET solve, each layer's ΔW fused by SRFusion "
                              "(top-r SVD, top-k entries per singular vector, norms restored); DR / top-k% options")
    site: ClassVar[str] = "mlp_out"
    solve_dtype: ClassVar[torch.dtype] = torch.float64

    def __init__(self, lm, config=None, *, cache_dir=None, seed=0):
        super().__init__(lm, config, cache_dir=cache_dir, seed=seed)
        #: a config field here (a class attribute in the rest of the MEMIT family)
        self.spread = self.config.spread
        self.residual_site = self.config.residual_site
        self._n_calls = 0

    def edit(self, requests: Sequence[EditRequest]) -> EditResult:
        self._n_calls += 1  # seeds the random-drop masks of this call (deterministic per editor seed)
        return super().edit(requests)

    def solve(self, K: torch.Tensor, R: torch.Tensor, state: LayerState) -> torch.Tensor:
        cfg = self.config
        delta = memit_solve(K, R, state.C, mom2_update_weight=cfg.mom2_update_weight)
        fused = self.fuse(delta, state.layer)
        d64, f64 = delta.double(), fused.double()
        norm = float(d64.norm())
        state.info.update({
            "raw_delta_norm": norm,
            "density": float((fused != 0).double().mean()),
            "norm_ratio": float(f64.norm()) / norm if norm > 0 else 0.0,
            "cosine_to_raw": float((d64 * f64).sum()) / (norm * float(f64.norm())) if norm > 0 and
            float(f64.norm()) > 0 else 0.0,
            "raw_fit_error": float((d64 @ K.double() - R.double()).norm() / R.double().norm().clamp_min(1e-30)),
        })
        return fused

    def fuse(self, delta: torch.Tensor, layer: int) -> torch.Tensor:
        """Apply the configured sparsification to one layer's ``Δ`` (canonical ``[d, d_ff]``)."""
        cfg = self.config
        if cfg.sparsify == "sr":
            return sr_fusion(delta, cfg.r, cfg.k, svd=cfg.svd)
        if cfg.sparsify == "random_drop":
            gen = torch.Generator(device="cpu").manual_seed(
                (int(self.seed) * 1_000_003 + self._n_calls * 10_007 + int(layer)) % (2 ** 63))
            return random_drop(delta, cfg.keep_fraction, gen, rescale=cfg.dr_rescale)
        if cfg.sparsify == "topk_magnitude":
            return topk_magnitude(delta, cfg.keep_fraction)
        return delta

    def finish(self, out: MultiLayerOutput, info: dict, artifacts: dict) -> None:
        info["sparsify"] = self.config.sparsify


__all__ = ["AdaEditConfig", "AdaEditEditor", "sr_fusion", "sr_factors", "SRFactors", "hard_threshold", "top_svd",
           "resolve_k", "random_drop", "topk_magnitude", "SPARSIFY"]
