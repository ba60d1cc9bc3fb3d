"""EMMET: equality-constrained mass model editing (Gupta et al., "A Unified Framework for Model Editing", 2024;
scalable-model-editing/unified-model-editing emmet/emmet_main.py).

MEMIT minimises ``||ΔW K0||² + ||(W+ΔW) K - V||²`` (least squares on the edited keys); EMMET instead keeps the
preserved keys' outputs while meeting the edits EXACTLY (guides METHODS.md section 3)::

    min ||ΔW K0||²   s.t.   (W + ΔW) K = V
    C' = λ C (+ update_norm_lambda I),   D = Kᵀ C'⁻¹ K (+ emmet_lambda I when the batch has > 1 request)
    ΔW = R D⁻¹ Kᵀ C'⁻¹                      (float64; D⁻¹ by pinv when D is singular)

With ``emmet_lambda = 0`` the constraint holds exactly: ``ΔW K = R D⁻¹ D = R``. For one request the update is
ROME's closed form ``r (C⁻¹k)ᵀ / (kᵀC⁻¹k)``. Targets and the layer spread are MEMIT's (residual site, linear).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .fields import check_range
from .multilayer import TINY_OVERRIDES, LayerState, MultiLayerConfig, MultiLayerEditor
from .registry import register

log = logging.getLogger(__name__)


def emmet_solve(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, *, mom2_update_weight: float = 1.0,
                emmet_lambda: float = 0.1, update_norm_lambda: float = 0.0, info: dict | None = None
                ) -> torch.Tensor:
    """EMMET's closed form ``ΔW = R D⁻¹ Kᵀ C'⁻¹`` ``[d, d_ff]`` (see the module docstring).

    Args:
        K: keys ``[d_ff, n]``; R: residuals ``V - W K`` ``[d, n]``; C: ``E[k kᵀ]`` ``[d_ff, d_ff]``.
        info: if given, receives ``pseudo_inverse`` (bool: D was inverted by pinv) and ``cond_D``.
    """
    Cp = mom2_update_weight * C
    if update_norm_lambda:
        Cp = Cp + update_norm_lambda * torch.eye(Cp.shape[0], dtype=Cp.dtype, device=Cp.device)
    CinvK = torch.linalg.solve(Cp, K)  # [d_ff, n] = C'⁻¹ K  (C' symmetric, so (C'⁻¹K)ᵀ = Kᵀ C'⁻¹)
    D = K.T @ CinvK  # [n, n]
    n = D.shape[0]
    if n > 1 and emmet_lambda:
        D = D + emmet_lambda * torch.eye(n, dtype=D.dtype, device=D.device)  # counters an ill-conditioned D
    pinv = False
    Dinv_RT = None
    try:
        Dinv_RT = torch.linalg.solve(D, R.T)  # D⁻¹ Rᵀ, [n, d]; D symmetric so R D⁻¹ = (D⁻¹ Rᵀ)ᵀ
        if not torch.isfinite(Dinv_RT).all():
            Dinv_RT = None
    except RuntimeError:  # torch.linalg.LinAlgError: singular D
        Dinv_RT = None
    if Dinv_RT is None:
        pinv = True
        Dinv_RT = torch.linalg.pinv(D, hermitian=True) @ R.T
    if info is not None:
        info["pseudo_inverse"] = pinv
        info["cond_D"] = float(torch.linalg.cond(D)) if n > 0 else 0.0
    return Dinv_RT.T @ CinvK.T


@dataclass
class EMMETConfig(MultiLayerConfig):
    """Config of ``emmet``. Defaults: unified-model-editing hparams/EMMET/llama2-7b.json (one layer, clamp 4,
    25 steps, v_lr 0.5, wd 1e-3, kl 0.0625, mom2_update_weight 1, emmet_lambda 0.1) mapped to SmolLM2-135M (METHODS.md
    section 13: layer 5)."""

    version: ClassVar[int] = 1

    layers: tuple[int, ...] = field(default=(5,), metadata={"help": (
        "Edit layers (strictly ascending; targets at the last). EMMET's hparams edit ONE layer (Llama-2-7b / GPT-J "
        "[5], GPT-2 XL [17]); METHODS.md 13 maps that to [5] of SmolLM2-135M. Several layers use MEMIT's linear "
        "spread.")})
    v_lr: float = field(default=0.5, metadata={"help": (
        "Adam learning rate of the target optimisation (EMMET llama2-7b: 0.5).")})
    v_weight_decay: float = field(default=1e-3, metadata={"help": (
        "Weight of ||delta|| / ||z_init||^2 in the target loss (EMMET llama2-7b: 1e-3).")})
    clamp_norm_factor: float = field(default=4.0, metadata={"help": (
        "||delta|| <= clamp_norm_factor * ||z_init|| (EMMET llama2-7b: 4; one layer has to write the whole change).")})
    mom2_update_weight: float = field(default=1.0, metadata={"help": (
        "λ: C' = λC (EMMET hparams: 1 for Llama-2-7b / GPT-J, 1000 GPT-2 XL; EasyEdit llama3.2-3b 100000). With the "
        "equality constraint λ only sets the scale against emmet_lambda and update_norm_lambda.")})
    emmet_lambda: float = field(default=0.1, metadata={"help": (
        "Ridge added to D = Kᵀ C'⁻¹ K when a batch has more than one request, against an ill-conditioned D "
        "(EMMET hparams: 0.1; unified-model-editing's emmet_main tests D.shape[0] > 1). 0 = the constraint "
        "(W+ΔW)K = V holds exactly. EasyEdit 14cea82 adds it also for ONE request: its ΔW is then this one times "
        "D/(D + emmet_lambda), 1 - 5.2e-6 on CounterFact record 0 (D = 19140; docs/reference_agreement.md).")})
    update_norm_lambda: float = field(default=0.0, metadata={"help": (
        "Adds update_norm_lambda · I to C' (a penalty on ||ΔW||², EMMET hparams: 0).")})

    def validate(self) -> None:
        super().validate()
        check_range("mom2_update_weight", self.mom2_update_weight, 0, lo_open=True)
        for name in ("emmet_lambda", "update_norm_lambda"):
            check_range(name, getattr(self, name), 0)


@register(family="locate-then-edit", order=60, tiny=TINY_OVERRIDES)
class EMMETEditor(MultiLayerEditor):
    """EMMET (Gupta et al. 2024): equality-constrained batched edit, ΔW = R D⁻¹ Kᵀ C'⁻¹."""

    name: ClassVar[str] = "emmet"
    config_cls: ClassVar[type] = EMMETConfig
    summary: ClassVar[str] = ("EMMET: equality-constrained batch edit (W+ΔW)K = V preserving covariance-weighted "
                              "outputs, ΔW = R D⁻¹ Kᵀ C'⁻¹")
    site: ClassVar[str] = "residual"
    spread: ClassVar[str] = "linear"
    solve_dtype: ClassVar[torch.dtype] = torch.float64

    def solve(self, K: torch.Tensor, R: torch.Tensor, state: LayerState) -> torch.Tensor:
        cfg = self.config
        return emmet_solve(K, R, state.C, mom2_update_weight=cfg.mom2_update_weight, emmet_lambda=cfg.emmet_lambda,
                           update_norm_lambda=cfg.update_norm_lambda, info=state.info)
