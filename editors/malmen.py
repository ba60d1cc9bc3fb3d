"""MALMEN (Tan, Zhang & Fu, ICLR 2024, "Massive Editing for Large Language Models via Meta Learning").

ChenmienTan/malmen ``editor/malmen.py`` / ``nets.py`` (METHODS.md section 11). Per edited module m (the MLP output
projections of the last six layers by default) and answer token t:

* the hypernetwork (:class:`editors.hypernet.HyperNet`) maps the normalised pair ``[k_t; ∇v_t]`` to ``(k̃_t, g̃_t)``;
* value shift ``d_t = -lr_m · <k_t, k̃_t> · g̃_t`` (lr_m learned, initialised at 1e-6);
* aggregation by the normal equation ``Δ_m = (KᵀK + e^{λ_m} I)⁻¹ Kᵀ D`` (``[d_in, d_out]``; W += Δᵀ), λ_m learned.

Training (``python -m app train --method malmen ...``, see :mod:`app.train`) back-propagates the post-edit loss
(rephrase CE + loc_coef · unrelated-prompt KL) through the solve: with ``G = ∂L/∂W`` ``[d_in, d_out]`` the surrogate
``<G, Δ(D, λ)>`` has gradient ``∂L/∂D = K (KᵀK + e^λ I)⁻¹ G`` and ``∂L/∂λ = -e^λ <M, Δ>`` (MALMEN's decoupled
backward), computed here by autograd through the differentiable solve.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .hypernet import HyperNet, HypernetConfig, HypernetEditor, Prediction, solve_shift
from .registry import register


@dataclass
class MALMENConfig(HypernetConfig):
    """Config of ``malmen``: the shared hypernetwork fields (MALMEN config/editor/malmen.yaml, CPU-sized rank)."""

    version: ClassVar[int] = 1


def value_shifts(net: HyperNet, K: torch.Tensor, grad: torch.Tensor, m: int) -> torch.Tensor:
    """``D [T, d_out]``: ``d_t = -lr_m <k_t, k̃_t> g̃_t`` (MALMEN ``editor/malmen.py`` ``predict_param_shifts``)."""
    k_tilde, g_tilde = net(K, grad, m)
    coeff = -net.lr[m] * (K * k_tilde).sum(-1, keepdim=True)
    return coeff * g_tilde


# tiny: edits with an UNTRAINED (seeded, freshly initialised) net (allow_untrained), rank 8, the last two layers
@register(family="hypernetwork", order=150, tiny={"allow_untrained": True, "rank": 8, "layers": (2, 3)})
class MALMENEditor(HypernetEditor):
    name: ClassVar[str] = "malmen"
    config_cls: ClassVar[type] = MALMENConfig
    summary: ClassVar[str] = ("MALMEN: a trained hypernetwork turns [key; value-gradient] pairs into value shifts, "
                              "aggregated by a least-squares normal equation (needs `python -m app train`).")

    def predict(self, net, K, grads) -> Prediction:
        D = [value_shifts(net, k, g, m) for m, (k, g) in enumerate(zip(K, grads))]
        deltas = [solve_shift(k, d, net.lamda[m]) for m, (k, d) in enumerate(zip(K, D))]
        return Prediction(K=list(K), D=D, deltas=deltas, extras={})

    def hyper_loss(self, net, pred, g_theta) -> torch.Tensor:
        # <G, Δ(D, λ)>: autograd gives ∂/∂D = K M and ∂/∂λ = -e^λ <M, Δ>, M = (KᵀK + e^λ I)⁻¹ G
        return sum((g.detach() * d).sum() for g, d in zip(g_theta, pred.deltas))
