"""RECT: Relative Editing Constraint (Gu et al., EMNLP 2024, "Model Editing Harms General Abilities of Large Language
Models: Regularization to the Rescue"; JasonForJoy/Model-Editing-Hurt easyeditor/models/rome/rome_main.py).

After the base method (ROME or MEMIT) computed its update ``ΔW`` on the model as it is now, only the entries that
change their weight the most RELATIVELY are kept (guides METHODS.md 6)::

    rel = |ΔW| / (|W| + eps)          (elementwise, W = the current weight)
    keep the top ``keep_fraction`` of entries by ``rel``, zero the rest; W <- W + masked ΔW

The official helper (``set_min_to_zero``) is commented out and, as written, returns None on a numpy copy; this is
its intent: zero the 80% smallest relative changes, i.e. keep 20% (AlphaEdit's MEMIT_rect keeps 40%). Exactly
``round(keep_fraction · numel)`` entries are kept per matrix (ties broken by position); kept entries are not
rescaled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .fields import check_range
from .multilayer import TINY_OVERRIDES
from .registry import register
from .wrapping import WrappedConfig, WrappedEditor


def rect_mask(delta: torch.Tensor, W: torch.Tensor, keep_fraction: float, eps: float = 1e-8) -> torch.Tensor:
    """Boolean mask of the ``round(keep_fraction · numel)`` entries of largest ``|delta| / (|W| + eps)``."""
    if tuple(delta.shape) != tuple(W.shape):
        raise ValueError(f"delta {tuple(delta.shape)} and W {tuple(W.shape)} differ in shape")
    rel = (delta.double().abs() / (W.double().abs() + eps)).reshape(-1)
    n = max(0, min(rel.numel(), int(round(keep_fraction * rel.numel()))))
    mask = torch.zeros(rel.numel(), dtype=torch.bool, device=delta.device)
    if n:
        mask[torch.sort(rel, descending=True, stable=True).indices[:n]] = True  # ties to the lower index
    return mask.reshape(delta.shape)


def rect_delta(delta: torch.Tensor, W: torch.Tensor, keep_fraction: float, eps: float = 1e-8) -> torch.Tensor:
    """``delta`` with every entry outside :func:`rect_mask` set to zero."""
    return delta * rect_mask(delta, W, keep_fraction, eps).to(delta.dtype)


@dataclass
class RECTConfig(WrappedConfig):
    """Config of ``rect``: the base method (ROME by default, as the official code) and the kept fraction."""

    version: ClassVar[int] = 1

    keep_fraction: float = field(default=0.2, metadata={"help": (
        "Fraction of the entries of each ΔW kept, by largest relative change |ΔW| / (|W| + eps) (Gu et al. 2024, "
        "section 4: the top-k% of the relative change; official code: zero the 80% smallest, i.e. keep 0.2; "
        "AlphaEdit's MEMIT_rect: 0.4).")})
    eps: float = field(default=1e-8, metadata={"help": (
        "Added to |W| in the denominator of the relative change (AlphaEdit's RECT baseline: 1e-8), so zero "
        "weights do not divide by zero.")})

    def validate(self) -> None:
        super().validate()
        check_range("keep_fraction", self.keep_fraction, 0, 1, lo_open=True)
        check_range("eps", self.eps, 0)


# tiny: post-processes a tiny MEMIT (the default base, ROME, has a row of its own)
@register(family="constrained", collapse_study=True, order=80,
          tiny={"base": "memit", "base_overrides": dict(TINY_OVERRIDES)})
class RECTEditor(WrappedEditor):
    """RECT: the base method's ΔW, keeping only the top keep_fraction of entries by |ΔW / W|."""

    name: ClassVar[str] = "rect"
    config_cls: ClassVar[type] = RECTConfig
    summary: ClassVar[str] = ("RECT: ROME/MEMIT update keeping only the top 20% of entries by relative change "
                              "|ΔW|/(|W|+eps), the rest zeroed")

    def transform_param(self, name: str, delta: torch.Tensor, W: torch.Tensor
                        ) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.config
        masked = rect_delta(delta, W.to(delta.device), cfg.keep_fraction, cfg.eps)
        raw = float(delta.double().norm())
        return masked, {"density": float((masked != 0).double().mean()),
                        "norm_ratio": float(masked.double().norm()) / raw if raw > 0 else 0.0}


__all__ = ["RECTConfig", "RECTEditor", "rect_mask", "rect_delta"]
