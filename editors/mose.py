"""MOSE: Multiplicative Orthogonal Sequential Editing (Xu, Ma, Peng, Sun, Ling, Gu; AAAI 2026; mose.txt).

The paper's closed form (section 5.1), NOT the public code's gradient-trained OFT wrapper (guides METHODS.md 8):
the MLP output projection ``W`` (canonical ``[d, d_ff]``) of an edit layer is LEFT-multiplied by an orthogonal
``R ∈ O(d)``::

    min_R  λ ||R W K0 - W K0||²_F + ||R W K_E - V_E||²_F          (Eq. 17)
         = min_{R ∈ O(d)} ||R A - B||²_F,  A = [√λ W K0 | W K_E],  B = [√λ W K0 | V_E]      (Eq. 18)
    M = B Aᵀ = λ W C0 Wᵀ + V_E (W K_E)ᵀ = U Σ Vᵀ                     (Eq. 19, C0 = K0 K0ᵀ)
    R = U Vᵀ                                                         (Eq. 20, orthogonal Procrustes)

``K0`` enters only through ``C0``, the cached second moment ``E[k kᵀ]`` of the layer's keys on the unedited model
(:func:`editors.stats.layer_covariances`, normalised by its token count, so λ weighs "one average preserved key"
against one edit). ``W`` is the CURRENT weight (sequential editing: ``W_t = R_t W_{t-1}``); the solve is float64.
Because ``R`` is orthogonal, ``W' = R W`` has exactly the singular values of ``W``: its Frobenius norm and condition
number never change (Eq. 5-14). The result carries ``R`` as ``factors[param]`` (``[d, d]``, canonical).

Keys ``K_E`` and targets ``V_E`` (Appendix A: "the method of Meng et al. 2022, 2023"): ``k*`` is the input of the
MLP output projection at the subject's last token, averaged over context templates (MEMIT ``compute_ks``); the
target is optimised at the FFN OUTPUT of the edit layer (:func:`editors.targets.compute_target_values`,
``site="mlp_out"``, Eq. 24).

Layer selection (section 5.2, Eq. 21-22), ``layer_selection="score"`` (default): for every candidate layer ``l`` the
target ``V_E^l`` is optimised at that layer and scored::

    s_l = ||V_E^l - W^l K_E^l||_F / (||W^l||_2 · ||σ(x W_fc^l)||)          (Eq. 22)

``σ(x W_fc^l)`` is the FFN activation of the subject, i.e. the key ``K_E^l`` itself (the input of the output
projection); Eq. 22 writes it inside the norm, but a ``[d]`` residual cannot be divided elementwise by a ``[d_ff]``
activation, so its norm (the "activation strength" of Eq. 21) is used. ``l* = argmin_l s_l``; the edited layers are
``l*`` and its ``neighbours`` neighbours on each side ("that layer along with its two adjacent layers"), clipped to
the model's layers. ``layer_selection="fixed"`` edits ``layers`` (the section 6.4 ablation's predefined layer).

Several edit layers (the paper defers to MEMIT here): the target lives at the top edit layer ``L`` and is
accounted for on the residual stream, as MEMIT does. Writing ``δ = V_E^L - v_init`` at the FFN output of ``L`` is
the same as adding ``δ`` to the residual stream after layer ``L``, so the residual-stream target is
``z = h_L(now) + δ``. The layers are edited in ascending order; for layer ``l_i`` (position ``i`` of ``m``), on the
model with the rotations of ``l_0 .. l_{i-1}`` already in place::

    K_E = keys of l_i;   r = (z - h_L(current)) / (m - i)       (MEMIT's linear spread)
    V_E = W K_E + r ;    R_i = Procrustes(W, C0, K_E, V_E, λ) ;  W <- R_i W (temporarily)

With one edit layer this is ``V_E = W K_E + δ``. Every weight is restored bit for bit before returning.

Options beside the paper's rule (issue 14). ``target_site="residual"``: the target is optimised on the residual stream
after the top edit layer (MEMIT / AlphaEdit's target, which the authors' closed-form code uses, with its clamp 0.75
and weight decay 0.5); then ``z`` is that target itself. ``selection_target="shared"``: ONE target optimisation per
edit, at the highest layer any selection can edit (``max`` of the candidates' neighbourhoods), instead of one per
candidate layer (+1 when the top edit layer is not a candidate: 92-98% of an edit's time). Eq. 22's numerator is then
the same ``||δ||`` for every candidate (``V_E^l = W^l K^l + δ``), so ``l* = argmax_l ||W^l||_2 ||K^l||``: the
activation-strength half of the rule (Eq. 21) normalised by the spectral norm; the residual is measured at that
layer. The preset variant ``reference`` is the authors' code's setting (fixed layers 4-8, residual target, λ =
15,000), ``shared-target`` the cheap selection.

The λ / target-size trade-off: a rotation cannot make ``R W k`` longer or shorter than ``W k``, and with the
preservation term it can turn it only by a small angle, so it moves ``W k`` by at most ``2 ||W k|| sin(θ/2)``. On
SmolLM2-135M the targets ask the MLP output to move ~98 while ``||W k|| ≈ 34``; at λ = 300 every edit is a 40-96°
rotation in one plane and preserved outputs move 3-5% per layer per edit; at the reference's 15,000 89-95% of the
change is left unwritten (``fit_after``) and edits fail (docs/reproductions.md, ## MOSE, measures both).

A rotation cannot change the length of ``W k``: a target whose norm differs from ``||W k||`` is only reached in
direction. ``info["layers"][l]["fit_after"]`` reports how much of the requested change each layer did not write.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from .base import EditError, Editor, EditResult
from .fields import check_choice, check_range, help_meta
from .keys import compute_keys, current_values
from .multilayer import SPREADS, TINY_OVERRIDES, MultiLayerConfig, check_layers, spread_residual
from .registry import register
from .requests import EditRequest
from .stats import layer_covariances
from .targets import compute_target_values, target_value_summary
from .templates import resolve_context_templates

log = logging.getLogger(__name__)

LAYER_SELECTIONS = ("score", "fixed")
TARGET_SITES = ("mlp_out", "residual")
SELECTION_TARGETS = ("per_layer", "shared")


# =================================================================================================================
# the closed form
# =================================================================================================================
def procrustes_rotation(W: torch.Tensor, C: torch.Tensor | None, K: torch.Tensor, V: torch.Tensor, lam: float,
                        *, WCW: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """MOSE's orthogonal update ``R = U Vᵀ`` of ``M = λ W C Wᵀ + V (W K)ᵀ = U Σ Vᵀ`` (mose.txt Eq. 17-20).

    Args:
        W: current weight, canonical ``[d, d_ff]``.
        C: preserved-key second moment ``[d_ff, d_ff]`` (``K0 K0ᵀ``, here ``E[k kᵀ]``); may be None when ``WCW``
            is given.
        K: edit keys ``[d_ff, n]``.
        V: edit targets ``[d, n]`` (what ``R W K`` should be).
        lam: λ of Eq. 17 (> 0; 0 is allowed and gives the unregularised Procrustes rotation).
        WCW: ``W C Wᵀ`` ``[d, d]`` if already known.

    Returns:
        ``R [d, d]`` float64 (orthogonal) and diagnostics: ``orth_error`` ``||RᵀR - I||_F``, ``r_minus_i``
        ``||R - I||_F``, ``rotation_deg`` (the largest principal angle of R, degrees), ``fit_before``
        ``||WK - V||_F``, ``fit_after`` ``||RWK - V||_F / ||WK - V||_F`` (1 = nothing written, 0 = exact),
        ``preserve_change`` ``sqrt(tr((R-I) WCWᵀ (R-I)ᵀ) / tr(WCWᵀ))`` (relative change of preserved outputs).
    """
    W64, K64, V64 = W.double(), K.double(), V.double()
    if WCW is None:
        if C is None:
            raise ValueError("procrustes_rotation needs C or WCW")
        WCW = W64 @ C.double() @ W64.T
    WCW = WCW.double()
    WK = W64 @ K64  # [d, n]
    M = lam * WCW + V64 @ WK.T
    U, _, Vh = torch.linalg.svd(M)
    R = U @ Vh
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    D = R - eye
    fit_before = float((WK - V64).norm())
    fit_after = float((R @ WK - V64).norm())
    tr = float(torch.trace(WCW))
    change = float(torch.trace(D @ WCW @ D.T)) if tr > 0 else 0.0
    theta = max_rotation_angle(R)
    info = {
        "orth_error": float((R.T @ R - eye).norm()),
        "r_minus_i": float(D.norm()),
        "rotation_deg": math.degrees(theta),
        "det": float(torch.linalg.det(R)),
        "fit_before": fit_before,
        "fit_after": fit_after / fit_before if fit_before > 0 else 0.0,
        "preserve_change": math.sqrt(max(change, 0.0) / tr) if tr > 0 else 0.0,
    }
    return R, info


def max_rotation_angle(R: torch.Tensor) -> float:
    """The largest rotation angle θ_max (radians) of an orthogonal ``R``.

    R's eigenvalues are e^{±iθ_j} (and ±1), so the symmetric ``2I - R - Rᵀ = (R - I)ᵀ(R - I)`` has eigenvalues
    ``2 - 2 cos θ_j`` and ``θ_max = arccos(1 - λ_max / 2)``: one symmetric eigensolve (``eigvalsh``) instead of the
    non-symmetric ``eigvals(R)``, which is several times slower at d = 4096 and needs complex arithmetic."""
    if not R.numel():
        return 0.0
    R64 = R.double()
    eye = torch.eye(R64.shape[0], dtype=R64.dtype, device=R64.device)
    lam = float(torch.linalg.eigvalsh(2 * eye - R64 - R64.T)[-1])
    return math.acos(min(1.0, max(-1.0, 1.0 - lam / 2)))


def layer_score(W: torch.Tensor, K: torch.Tensor, V: torch.Tensor, spectral_norm: float | None = None) -> float:
    """Eq. 22's layer score ``||V - W K||_F / (||W||_2 · ||K||_F)`` (``W [d, d_ff]``, ``K [d_ff, n]``, ``V [d, n]``).

    The key ``K`` is the FFN activation ``σ(x W_fc)`` of Eq. 21-22 (module docstring for why its norm is used).
    """
    W64, K64, V64 = W.double(), K.double(), V.double()
    s2 = spectral_norm if spectral_norm is not None else spectral(W64)
    denom = s2 * float(K64.norm())
    return float((V64 - W64 @ K64).norm()) / denom if denom > 0 else math.inf


def spectral(W: torch.Tensor) -> float:
    """``||W||_2`` from the eigenvalues of the smaller Gram matrix (float64; a d x d eigensolve, not an SVD)."""
    A = W.double()
    G = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
    return math.sqrt(max(float(torch.linalg.eigvalsh(G)[-1]), 0.0))


def edit_layers_around(l_star: int, neighbours: int, n_layers: int) -> tuple[int, ...]:
    """``l* - neighbours .. l* + neighbours`` clipped to ``[0, n_layers)`` (mose.txt section 5.2)."""
    return tuple(i for i in range(l_star - neighbours, l_star + neighbours + 1) if 0 <= i < n_layers)


# =================================================================================================================
# config
# =================================================================================================================
@dataclass
class MOSEConfig(MultiLayerConfig):
    """Config of ``mose`` (closed form of mose.txt section 5).

    Defaults for SmolLM2-135M (30 layers; no public hparams exist for the closed form): candidate layers 4-6
    around ROME's layer 5 (METHODS.md 13), one neighbour on each side (the paper), ROME-style target optimisation at
    the FFN output (METHODS.md 0.4), and λ = 300 (see ``lam``; checked on the default model by
    tests/integration/test_mose_adaedit_rect_prune_default.py).
    """

    version: ClassVar[int] = 1

    lam: float = field(default=300.0, metadata=help_meta(
        "λ of Eq. 16-18: weight of preserving the outputs of the preserved keys K0 against writing the edit. C0 is "
        "E[k kᵀ] (normalised by its token count), so λ counts 'average preserved keys' per edit. λ → ∞ gives R = I "
        "(nothing changes); λ → 0 the unregularised Procrustes rotation (ill-posed for one edit). The paper gives no "
        "value; 300 on SmolLM2-135M, well below the λ at which edits start to fail (docs/DEFAULTS.md). The info "
        "'preserve_change' reports how much the preserved outputs moved."))
    layer_selection: str = field(default="score", metadata=help_meta(
        "'score': the paper's rule (Eq. 21-22): optimise the FFN-output target at every layer of "
        "candidate_layers, pick l* = argmin ||V_E - W K_E||_F / (||W||_2 ||k||) and edit l* with its neighbours. "
        "'fixed': edit exactly `layers` (the predefined-layer ablation of section 6.4)."))
    candidate_layers: tuple[int, ...] = field(default=(4, 5, 6), metadata=help_meta(
        "Layers scored by Eq. 22 when layer_selection='score'. Each costs one target optimisation per edit (plus "
        "one for the top edit layer when it is not a candidate): the paper scores every layer; 4-6 around ROME's "
        "layer 5 on SmolLM2-135M keeps the cost of an edit to a few ROME edits."))
    neighbours: int = field(default=1, metadata=help_meta(
        "Layers edited on each side of l* (section 5.2: 'we modify that layer along with its two adjacent layers' "
        "= 1; 0 = the single selected layer of the section 6.4 ablation). Clipped at the first / last layer."))
    layers: tuple[int, ...] = field(default=(4, 5, 6), metadata=help_meta(
        "Edit layers when layer_selection='fixed' (strictly ascending; the target lives at the last one). The "
        "public MOSE code's fixed lists are three adjacent layers (Llama3-8B [19,20,21]); 4-6 here."))
    v_num_grad_steps: int = field(default=25, metadata=help_meta(
        "Adam steps of the FFN-output target optimisation (Eq. 24; ROME Llama3-8B hparams: 25)."))
    v_lr: float = field(default=0.5, metadata=help_meta(
        "Adam learning rate of the target optimisation (ROME Llama3-8B hparams: 0.5; METHODS.md 13)."))
    v_weight_decay: float = field(default=1e-3, metadata=help_meta(
        "Weight of the reference's decay term ||δ|| / ||v_init||² in the target loss (ROME hparams: 1e-3)."))
    clamp_norm_factor: float = field(default=4.0, metadata=help_meta(
        "||δ|| <= clamp_norm_factor · ||v_init|| after every step (ROME hparams: 4). A rotation keeps ||W k||, so "
        "only the direction of a much longer target can be reached."))
    target_site: str = field(default="mlp_out", metadata=help_meta(
        "Where the target is optimised: 'mlp_out' = the edit layer's FFN output (the paper's Appendix A, ROME's "
        "Eq. 24; default) or 'residual' = the residual stream after the top edit layer (MEMIT / AlphaEdit; the "
        "authors' closed-form code, with clamp 0.75 and weight decay 0.5: the preset variant 'reference')."))
    selection_target: str = field(default="per_layer", metadata=help_meta(
        "layer_selection='score' only. 'per_layer' (the paper's Eq. 22): a target optimised at every candidate "
        "layer, plus one at the top edit layer when it is not a candidate (3-4 optimisations per edit, 92-98% of "
        "its time). 'shared': one target at the highest layer any selection can edit, the same δ scored at every "
        "candidate (module docstring; the preset variant 'shared-target')."))
    spread: str = field(default="linear", metadata=help_meta(
        "How the remaining residual is shared by the edit layers still to come: 'linear' (MEMIT: r / (m - i)) or "
        "'sqrt' (PMET: r / sqrt(m - i))."))

    def validate(self) -> None:
        super().validate()
        if not self.lam >= 0 or not math.isfinite(self.lam):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam}")
        check_choice("layer_selection", self.layer_selection, LAYER_SELECTIONS)
        if self.layer_selection == "score":
            check_layers(self.candidate_layers)
        check_range("neighbours", self.neighbours, 0)
        check_choice("spread", self.spread, SPREADS)
        check_choice("target_site", self.target_site, TARGET_SITES)
        check_choice("selection_target", self.selection_target, SELECTION_TARGETS)


# =================================================================================================================
# the editor
# =================================================================================================================
@register(family="multiplicative", collapse_study=True, order=110,
          tiny={"candidate_layers": (1, 2), **TINY_OVERRIDES})
class MOSEEditor(Editor):
    """MOSE (closed form): W <- R W with R orthogonal (Procrustes, Eq. 17-20), layers chosen by Eq. 22."""

    name: ClassVar[str] = "mose"
    config_cls: ClassVar[type] = MOSEConfig
    summary: ClassVar[str] = ("MOSE: multiplicative orthogonal edit W <- RW, R = UVᵀ of λWC0Wᵀ + V_E(WK_E)ᵀ "
                              "(Procrustes); layer l* by Eq. 22 plus its neighbours; norms and cond(W) unchanged")

    def __init__(self, lm, config=None, *, cache_dir: str | None = None, seed: int = 0):
        super().__init__(lm, config, cache_dir=cache_dir, seed=seed)
        self.C: dict[int, torch.Tensor] = {}
        self.templates: list[list[str]] = []
        self._prepared = False

    # ---- which layers ------------------------------------------------------------------------------------
    def possible_layers(self) -> tuple[int, ...]:
        """Every layer this config may edit (covariances are computed for these in :meth:`prepare`)."""
        cfg, n = self.config, self.spec.n_layers
        if cfg.layer_selection == "fixed":
            out = set(cfg.layers)
        else:
            out = {i for c in cfg.candidate_layers for i in edit_layers_around(c, cfg.neighbours, n)}
        bad = sorted(i for i in out | set(cfg.candidate_layers if cfg.layer_selection == "score" else ())
                     if not 0 <= i < n)
        if bad:
            raise EditError(f"{self.name}: layers {bad} out of range; {self.lm.display_name} has layers 0..{n - 1}")
        return tuple(sorted(out))

    def prepare(self) -> None:
        if self._prepared:
            return
        cfg = self.config
        layers = self.possible_layers()
        self.C = layer_covariances(self.lm, layers, corpus=cfg.corpus, n_tokens=cfg.mom2_n_tokens,
                                          cache_dir=self.cache_dir, dtype=torch.float64)
        self.templates = resolve_context_templates(self.lm, cfg.context_templates, self.seed,
                                                   cache_dir=self.cache_dir)
        self._prepared = True

    # ---- the edit ----------------------------------------------------------------------------------------
    def _targets(self, requests: Sequence[EditRequest], layer: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(Z, init, z_info)`` at the configured target site of ``layer`` (``[n, d]`` each)."""
        flat = [t for g in self.templates for t in g]
        Z, info = compute_target_values(self.lm, requests, layer, site=self.config.target_site, templates=flat,
                                               **self.config.z_kwargs())
        return Z.detach(), info.pop("init").detach(), info

    def edit(self, requests: Sequence[EditRequest]) -> EditResult:
        started = time.perf_counter()
        self.prepare()
        cfg = self.config
        requests = list(requests)
        if not requests:
            raise EditError(f"{self.name}: no requests to edit")
        spec = self.spec
        params = dict(self.model.named_parameters())
        info: dict[str, Any] = {"n_requests": len(requests), "layer_selection": cfg.layer_selection}
        targets: dict[int, tuple[torch.Tensor, torch.Tensor, dict]] = {}

        target_layer = None
        if cfg.layer_selection == "score":
            scores: dict[str, float] = {}
            strength: dict[str, float] = {}
            shared = cfg.selection_target == "shared"
            if shared:  # one target at the highest layer any selection can edit
                target_layer = max(self.possible_layers())
                targets[target_layer] = self._targets(requests, target_layer)
            for layer in cfg.candidate_layers:
                if not shared:
                    targets[layer] = self._targets(requests, layer)
                Z, init, _ = targets[target_layer if shared else layer]
                K = compute_keys(self.lm, layer, requests, self.templates).T  # [d_ff, n]
                W = spec.to_canonical(params[spec.mlp_out_weight(layer)].detach())
                # Eq. 22's V_E^l: the FFN-output target itself, or W K + δ (a residual / shared target's change)
                V = Z.T if not shared and cfg.target_site == "mlp_out" else W.double() @ K.double() + (Z - init).T
                scores[str(layer)] = layer_score(W, K, V)
                strength[str(layer)] = float(K.double().norm())
            l_star = min(cfg.candidate_layers, key=lambda x: (scores[str(x)], x))
            layers = edit_layers_around(l_star, cfg.neighbours, spec.n_layers)
            info.update({"l_star": l_star, "scores": scores, "activation_strength": strength})
        else:
            layers = check_layers(cfg.layers, spec.n_layers)
        info["edit_layers"] = list(layers)
        top = layers[-1] if target_layer is None else target_layer
        if top not in targets:
            targets[top] = self._targets(requests, top)
        Z, init, z_info = targets[top]
        info["z"] = target_value_summary(z_info)
        info["target_layer"] = top
        info["target_site"] = cfg.target_site
        info["n_target_optimisations"] = len(targets)

        # every target optimisation (the candidate layers' too), from the per-request times z recorded
        info["seconds_z"] = sum(sum(z[2]["seconds"]) for z in targets.values())
        t1 = time.perf_counter()
        factors, per_layer = self._rotate(requests, layers, Z - init, target_layer=top)
        info["seconds_layers"] = time.perf_counter() - t1
        info["layers"] = per_layer
        info["max_orth_error"] = max(v["orth_error"] for v in per_layer.values())
        return self._result(factors=factors, info=info, started=started)

    def _rotate(self, requests: Sequence[EditRequest], layers: Sequence[int], delta: torch.Tensor, *,
                target_layer: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        """The ascending per-layer Procrustes rotations (module docstring); the model is restored on return.
        ``delta [n, d]``: the target change at ``target_layer`` (default: the top edit layer), carried to the
        residual stream there."""
        cfg, spec = self.config, self.spec
        params = dict(self.model.named_parameters())
        top = layers[-1] if target_layer is None else target_layer
        names = {layer: spec.mlp_out_weight(layer) for layer in layers}
        saved = {layer: params[names[layer]].detach().clone() for layer in layers}
        factors: dict[str, torch.Tensor] = {}
        per_layer: dict[str, dict] = {}
        try:
            z = current_values(self.lm, top, requests, site="residual") + delta  # [n, d]
            for i, layer in enumerate(layers):
                K = compute_keys(self.lm, layer, requests, self.templates).T.double()  # [d_ff, n]
                cur = current_values(self.lm, top, requests, site="residual")
                r_total = (z - cur).T.double()  # [d, n]
                r = spread_residual(r_total, i, len(layers), cfg.spread)
                p = params[names[layer]]
                W = spec.to_canonical(p.detach()).double()
                V = W @ K + r
                R, rinfo = procrustes_rotation(W, self.C[layer], K, V, cfg.lam)
                if not torch.isfinite(R).all():
                    raise EditError(f"{self.name}: the rotation of layer {layer} is not finite")
                R32 = R.to(torch.float32).contiguous()
                with torch.no_grad():  # exactly what apply_result does: W <- R W in fp32
                    new = R32.to(p.device) @ spec.to_canonical(p.data).to(torch.float32)
                    p.copy_(spec.to_param_layout(new).to(p.dtype))
                factors[names[layer]] = R32
                per_layer[str(layer)] = {"position": i, "residual_norm": float(r_total.norm(dim=0).mean()),
                                         "spread_norm": float(r.norm(dim=0).mean()),
                                         "key_norm": float(K.norm(dim=0).mean()), **rinfo}
        finally:
            with torch.no_grad():
                for layer in layers:
                    params[names[layer]].copy_(saved[layer])
        return factors, per_layer


__all__ = ["MOSEConfig", "MOSEEditor", "procrustes_rotation", "max_rotation_angle", "layer_score",
           "edit_layers_around", "spectral"]
