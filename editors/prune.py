"""PRUNE: Perturbation-Restrained Sequential Model Editing (Ma, Wang, Xu, Ling, Gu; ICLR 2025).

PRUNE bounds the condition number of the edited matrix by restraining the large singular values of the ACCUMULATED
edit of a run, ``ΔW = W - W0`` (not of each step's update; guides METHODS.md 7)::

    ΔW = U Σ Vᵀ ;  σ_max = largest singular value of W0
    σ_i' = F(σ_i) = log_b(σ_i) + σ_max - log_b(σ_max)   for σ_i >= σ_max, else σ_i
    W = W0 + U Σ' Vᵀ

At each step the base method (ROME or MEMIT) computes its update ``D`` on the model as it is now (which carries the
restrained earlier edits); the would-be accumulated edit ``W_current + D - W0`` is restrained and the step's delta is
``(W0 + restrained) - W_current``, so the engine's additive apply gives exactly the restrained weights. The original
``W0`` of each edited matrix is copied on this editor instance the first time the matrix is edited (the instance
lives for one run). When no singular value reaches ``σ_max`` the base's ``D`` is returned unchanged.

``F`` variants (PRUNE code ``reduce_name``; the PRUNE class default is ``log1_2``): ``"log"`` with base
``log_base`` (1.2 by default; 2, 1.5 also used), ``"ln"`` (natural log; AlphaEdit's MEMIT_prune baseline) and
``"linear"`` ``σ' = σ/2 + σ_max/2``. A restraint never increases a singular value: ``σ' = min(F(σ), σ)`` (for
``log_b`` with ``σ_max < 1/ln b``, F would exceed σ just above σ_max; the reference does not guard this).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .fields import check_choice, check_range
from .multilayer import TINY_OVERRIDES
from .registry import register
from .wrapping import WrappedConfig, WrappedEditor

RESTRAINTS = ("log", "ln", "linear")


def restrain_values(S: torch.Tensor, sigma_max: float, restraint: str = "log", log_base: float = 1.2
                    ) -> torch.Tensor:
    """``F`` applied to the singular values ``S >= sigma_max`` (the others unchanged), never increasing any."""
    if restraint not in RESTRAINTS:
        raise ValueError(f"unknown restraint {restraint!r}; valid: {', '.join(RESTRAINTS)}")
    S = S.double()
    big = S >= sigma_max
    if restraint == "linear":
        F = S / 2 + sigma_max / 2
    else:
        base = math.e if restraint == "ln" else float(log_base)
        lb = math.log(base)
        F = torch.log(S.clamp_min(1e-300)) / lb + sigma_max - math.log(sigma_max) / lb
    return torch.where(big, torch.minimum(F, S), S)


def restrained_bound(sigma_1: float, sigma_max: float, restraint: str = "log", log_base: float = 1.2) -> float:
    """The largest singular value the restrained ΔW can have when the raw one's largest is ``sigma_1``."""
    return float(restrain_values(torch.tensor([sigma_1], dtype=torch.float64), sigma_max, restraint, log_base)[0])


def restrain(delta_acc: torch.Tensor, sigma_max: float, restraint: str = "log", log_base: float = 1.2
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """PRUNE's restraint of an accumulated edit ``delta_acc`` (any orientation; float64 inside).

    Returns the restrained matrix (float64) and ``{n_restrained, sigma_1_before, sigma_1_after}``; when nothing
    reaches ``sigma_max`` the input (as float64) is returned. σ_1 <= ‖A‖_F, so while ‖A‖_F < ``sigma_max`` (the
    first edits of a run) nothing can be restrained and only the singular values are computed (for the info),
    not the singular vectors: the same result, without the full SVD."""
    A = delta_acc.double()
    if float(torch.linalg.vector_norm(A)) < sigma_max:
        s1 = float(torch.linalg.svdvals(A)[0]) if A.numel() else 0.0
        return A, {"n_restrained": 0, "sigma_1_before": s1, "sigma_1_after": s1}
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    S2 = restrain_values(S, sigma_max, restraint, log_base)
    idx = (S2 != S).nonzero().flatten()
    info = {"n_restrained": int(idx.numel()), "sigma_1_before": float(S[0]) if S.numel() else 0.0,
            "sigma_1_after": float(S2.max()) if S2.numel() else 0.0}
    if idx.numel() == 0:
        return A, info
    # change only the restrained components: A + U_r diag(S' - S) V_rᵀ
    A2 = A + (U[:, idx] * (S2[idx] - S[idx])) @ Vh[idx]
    return A2, info


@dataclass
class PRUNEConfig(WrappedConfig):
    """Config of ``prune``: the base method and the restraint function (PRUNE class default: log base 1.2)."""

    version: ClassVar[int] = 1

    restraint: str = field(default="log", metadata={"help": (
        "F applied to singular values σ >= σ_max(W0) of the accumulated edit W - W0 (Ma et al. 2025, section 4): "
        "'log' σ' = log_b(σ) + σ_max - log_b(σ_max) with b = log_base (PRUNE code default 'log1_2'); 'ln' the "
        "same with the natural log (AlphaEdit's MEMIT_prune baseline); 'linear' σ' = σ/2 + σ_max/2.")})
    log_base: float = field(default=1.2, metadata={"help": (
        "b of the 'log' restraint (PRUNE code: log1_2 = 1.2 by default; log2 and log1_5 also offered). Must be > 1.")})

    def validate(self) -> None:
        super().validate()
        check_choice("restraint", self.restraint, RESTRAINTS)
        check_range("log_base", self.log_base, 1, lo_open=True)


# tiny: post-processes a tiny MEMIT (the default base, ROME, has a row of its own)
@register(family="constrained", collapse_study=True, order=90,
          tiny={"base": "memit", "base_overrides": dict(TINY_OVERRIDES)})
class PRUNEEditor(WrappedEditor):
    """PRUNE: the base method's update, with the accumulated edit's singular values above σ_max(W0) restrained."""

    name: ClassVar[str] = "prune"
    config_cls: ClassVar[type] = PRUNEConfig
    summary: ClassVar[str] = ("PRUNE: ROME/MEMIT update; singular values of the accumulated W - W0 above σ_max(W0) "
                              "restrained by log_1.2 (or ln / linear)")

    def __init__(self, lm, config=None, *, cache_dir=None, seed=0):
        super().__init__(lm, config, cache_dir=cache_dir, seed=seed)
        #: param name -> the matrix before this run's first edit of it (parameter layout) and its σ_max
        self.W0: dict[str, torch.Tensor] = {}
        self.sigma_max: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        """The base's state plus, per matrix edited so far, W0 (``W0|name``) and σ_max(W0) (``sigma_max|name``):
        a resumed run restrains against the unedited matrix, not the one it resumed on."""
        out = super().state_dict()
        for name, W0 in self.W0.items():
            out[f"W0|{name}"] = W0.detach().cpu()
            out[f"sigma_max|{name}"] = torch.tensor(self.sigma_max[name], dtype=torch.float64)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        params = dict(self.lm.model.named_parameters())
        self.W0 = {k[3:]: torch.as_tensor(v).to(device=params[k[3:]].device, dtype=params[k[3:]].dtype)
                   for k, v in state.items() if k.startswith("W0|")}
        self.sigma_max = {k[10:]: float(torch.as_tensor(v)) for k, v in state.items() if k.startswith("sigma_max|")}

    def transform_param(self, name: str, delta: torch.Tensor, W: torch.Tensor
                        ) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.config
        if name not in self.W0:
            self.W0[name] = W.clone()
            self.sigma_max[name] = float(torch.linalg.matrix_norm(W.double(), ord=2))
        W0, smax = self.W0[name], self.sigma_max[name]
        acc = W.double() + delta.double() - W0.double()
        acc2, info = restrain(acc, smax, cfg.restraint, cfg.log_base)
        info["sigma_max_W0"] = smax
        if info["n_restrained"]:
            return (W0.double() + acc2 - W.double()).to(delta.dtype), info
        return delta, info


__all__ = ["PRUNEConfig", "PRUNEEditor", "restrain", "restrain_values", "restrained_bound", "RESTRAINTS"]
