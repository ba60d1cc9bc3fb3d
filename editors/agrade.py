"""AGRADE (Gu et al., AAAI 2025, "Editing Large Language Models via Adaptive Gradient Guidance"), Eq. 1-7.

No public code exists (METHODS.md section 11/14); this follows the paper's Methods section on top of the MALMEN
hypernetwork (:mod:`editors.hypernet`). Per edited module m with keys ``H [T, D_h]`` and value gradients
``∇G [T, D_g]`` at the answer tokens, ``(H̃, ∇G̃) = HyperNetwork(H, ∇G)`` and

* Eq. 1  ``c_i = -η Σ_j H_ij H̃_ij``                      (``use_c=False``: ``c_i = -η``)
* Eq. 2  ``G = c ⊙ ∇G̃``
* Eq. 3  ``M = HᵀH + e^λ I``                              (``regularise=False``: ``M = HᵀH``, pseudo-inverse)
* Eq. 4  ``G ← G - (<G, G_prev>/<G_prev, G_prev>) G_prev`` against the adjacent (previous) edited module's G,
  Frobenius inner product                                (``gradient_projection=False``: skipped). Which G of the
  previous module the paper means is left open ("the previous gradient"): ``projection_reference="raw"`` (default)
  takes its Eq. 2 gradient before its own projection, ``"projected"`` the one after it (a chain: each module is
  orthogonal to the previous module's final G).
* Eq. 5  ``Δθ = M⁻¹ HᵀG``                                 ([D_h, D_g]; W += Δθᵀ in the canonical [d_out, d_in])

Training (Directional HyperNetwork Training): after the edit, ``g_θ = ∂(L_equiv + L_unrel)/∂W`` ([D_h, D_g] here),
* Eq. 6  ``P = H (HᵀH + e^λ I)⁻¹ g_θ``                    (``weight_projection=False``: ``P = H g_θ``)
* Eq. 7  ``L_AGRADE = Σ_ij P_ij G_ij`` with P held fixed, so its gradient in the hypernetwork is P pushed into G.
``L_hyper = L_AGRADE + L_equiv + L_unrel``; ``L_equiv`` and ``L_unrel`` reach the hypernetwork only through g_θ (i.e.
through P). λ gets ``<g_θ, Δθ(λ)>`` (MALMEN's gradient), since P is held fixed in Eq. 7.

What differs from MALMEN (:mod:`editors.malmen`), exactly: Eq. 1-2 are MALMEN's value shifts
(``d_t = -lr_m <k_t, k̃_t> g̃_t``), Eq. 3 / 5 its normal equation, and Eq. 6-7 give the same meta-gradient: with P held
fixed, ``∂L_AGRADE/∂G = P = H (HᵀH + e^λ I)⁻¹ g_θ`` is exactly MALMEN's ``∂<g_θ, Δθ(G)>/∂G`` (the push-through
identity), and λ receives MALMEN's ``∂<g_θ, Δθ(λ)>/∂λ``. tests/unit/test_agrade.py pins both against autograd and
checks that with ``gradient_projection=False`` every meta-gradient equals MALMEN's (max |diff| 0 on a tiny model).
So AGRADE here is MALMEN + Eq. 4: the measured ES gap (README: 0.91 vs 0.68 after 200 meta steps) comes from Eq. 4
alone; adjacent layers' G have cosine 0.91-0.93 on SmolLM2-135M, so Eq. 4 removes ~60% of G in layers 25-28
(docs/reproductions.md, ## AGRADE). The ablations 'w/o c', 'w/o regularisation' and 'w/o weight projection' do
change the method (they are not MALMEN either).

Artifacts of an edit (Fig. 3 of the paper), per edited layer: ``H`` [T, D_h], ``G_before`` / ``G_after`` [T, D_g]
(G before / after the Eq. 4 projection; HᵀG = H.T @ G exactly, and with ``artifact_matrices`` also ``HtG_before`` /
``HtG_after`` [D_h, D_g] themselves), ``M_eigvals`` (the T non-trivial eigenvalues of M: eig(HHᵀ) + e^λ, the rest equal
e^λ), ``M_diag`` ([D_h]) and ``cos_prev`` (cosine of G with G_prev before projection).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .fields import check_choice
from .hypernet import HyperNet, HypernetConfig, HypernetEditor, Prediction, regularised_solve_op, solve_shift
from .registry import register

#: what Eq. 4's G_prev is: the previous module's G before ("raw") or after ("projected") its own projection
PROJECTION_REFERENCES = ("raw", "projected")


@dataclass
class AGRADEConfig(HypernetConfig):
    """Config of ``agrade``: the shared hypernetwork fields plus the paper's ablations (section Ablation)."""

    version: ClassVar[int] = 1

    use_c: bool = field(default=True, metadata={"help": (
        "Scale the projected gradients by the adjustment coefficients c of Eq. 1-2. False = ablation 'w/o c': "
        "G = -η ∇G̃.")})
    regularise: bool = field(default=True, metadata={"help": (
        "Add e^λ I to M (Eq. 3) and in P (Eq. 6). False = ablation 'w/o regularisation': M = HᵀH, solved with "
        "the pseudo-inverse (minimum-norm least squares).")})
    weight_projection: bool = field(default=True, metadata={"help": (
        "Project the weight gradient with (HᵀH + e^λ I)⁻¹ in Eq. 6. False = ablation 'w/o weight projection': "
        "P = H g_θ.")})
    gradient_projection: bool = field(default=True, metadata={"help": (
        "Orthogonalise each module's G against the previous (adjacent) edited module's G (Eq. 4). False = "
        "ablation 'w/o gradient projection'.")})
    projection_reference: str = field(default="raw", metadata={"help": (
        "Which G of the previous module Eq. 4 projects against: 'raw' = its Eq. 2 gradient before its own "
        "projection (default; the paper writes G_prev without saying), 'projected' = its G after its own Eq. 4 "
        "(a chain). The two coincide for the second module and differ from the third on; docs/reproductions.md "
        "(## AGRADE) has both measured.")})
    artifact_matrices: bool = field(default=False, metadata={"help": (
        "Also store HᵀG before / after Eq. 4 as full [D_h, D_g] matrices in the result's artifacts (~21 MB per "
        "edit on SmolLM2's 6 modules, written to the run store at every step). Off: only the exact factors "
        "H, G_before, G_after ([T, D_h], [T, D_g]; HᵀG = H.T @ G), from which the matrices follow.")})


    def validate(self) -> None:
        super().validate()
        check_choice("projection_reference", self.projection_reference, PROJECTION_REFERENCES)


def adjustment_coefficients(H: torch.Tensor, H_tilde: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """Eq. 1: ``c [T, 1]`` with ``c_i = -η Σ_j H_ij H̃_ij``."""
    return -eta * (H * H_tilde).sum(-1, keepdim=True)


def orthogonalise(G: torch.Tensor, G_prev: torch.Tensor) -> torch.Tensor:
    """Eq. 4: ``G - (<G, G_prev>/<G_prev, G_prev>) G_prev`` (Frobenius inner product); G unchanged if G_prev = 0."""
    denom = (G_prev * G_prev).sum()
    if denom.item() == 0:
        return G
    return G - ((G * G_prev).sum() / denom) * G_prev


def scaled_gradient(H: torch.Tensor, H_tilde: torch.Tensor, g_tilde: torch.Tensor, eta: torch.Tensor, *,
                    use_c: bool = True) -> torch.Tensor:
    """Eq. 1-2: ``G = c ⊙ ∇G̃`` ``[T, D_g]`` with ``c_i = -η Σ_j H_ij H̃_ij`` (``use_c=False``: ``c_i = -η``)."""
    c = adjustment_coefficients(H, H_tilde, eta) if use_c else -eta.expand(H.shape[0], 1)
    return c * g_tilde


def project_gradients(raw: list[torch.Tensor], reference: str = "raw") -> tuple[list[torch.Tensor], list[float]]:
    """Eq. 4 over the edited modules in order: module m's G is ``orthogonalise(raw[m], G_prev)`` with G_prev the
    previous module's ``raw`` G (``reference="raw"``) or its projected G (``"projected"``); the first module is
    unchanged. Also returns, per module after the first, the cosine of ``raw[m]`` with the G_prev used."""
    if reference not in PROJECTION_REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(PROJECTION_REFERENCES)}, got {reference!r}")
    G: list[torch.Tensor] = []
    cos: list[float] = []
    for m, Gm in enumerate(raw):
        if m > 0:
            prev = raw[m - 1] if reference == "raw" else G[m - 1]
            cos.append(float(((Gm * prev).sum() / (Gm.norm() * prev.norm()).clamp_min(1e-30)).detach()))
            Gm = orthogonalise(Gm, prev)
        G.append(Gm)
    return G, cos


# tiny: edits with an UNTRAINED (seeded, freshly initialised) net (allow_untrained), rank 8, the last two layers
@register(family="hypernetwork", order=160, tiny={"allow_untrained": True, "rank": 8, "layers": (2, 3)})
class AGRADEEditor(HypernetEditor):
    name: ClassVar[str] = "agrade"
    config_cls: ClassVar[type] = AGRADEConfig
    summary: ClassVar[str] = ("AGRADE: MALMEN-style hypernetwork with adjustment coefficients, gradients "
                              "orthogonalised against the adjacent module and a projected-gradient training loss "
                              "(Eq. 1-7; needs `python -m app train`).")

    def _lam(self, net: HyperNet, m: int):
        return net.lamda[m] if self.config.regularise else None

    def predict(self, net, K, grads) -> Prediction:
        cfg = self.config
        raw: list[torch.Tensor] = []
        for m, (H, g) in enumerate(zip(K, grads)):
            H_tilde, g_tilde = net(H, g, m)
            raw.append(scaled_gradient(H, H_tilde, g_tilde, net.lr[m], use_c=cfg.use_c))  # Eq. 1-2
        if cfg.gradient_projection:
            G, cos = project_gradients(raw, cfg.projection_reference)  # Eq. 4
        else:
            G, cos = list(raw), []
        deltas = [solve_shift(H, Gm, self._lam(net, m)) for m, (H, Gm) in enumerate(zip(K, G))]  # Eq. 3, 5
        extras = self._extras(net, K, raw, G, cos) if not torch.is_grad_enabled() else {}
        return Prediction(K=list(K), D=G, deltas=deltas, extras=extras)

    def _extras(self, net: HyperNet, K, raw, G, cos) -> dict:
        """The artifacts of an edit (module docstring): H, G before / after Eq. 4, M's spectrum and diagonal."""
        cfg = self.config
        layers = self._layers
        extras = {
            "H": {str(layer): H.detach().cpu() for layer, H in zip(layers, K)},
            "G_before": {str(layer): r.detach().cpu() for layer, r in zip(layers, raw)},
            "G_after": {str(layer): g.detach().cpu() for layer, g in zip(layers, G)},
            "M_eigvals": {str(layer): (torch.linalg.eigvalsh((H @ H.T).double())
                                   + (torch.exp(net.lamda[m].double()) if cfg.regularise else 0.0)
                                   ).float().cpu() for m, (layer, H) in enumerate(zip(layers, K))},
            "M_diag": {str(layer): ((H * H).sum(0) + (torch.exp(net.lamda[m]) if cfg.regularise else 0.0)
                                ).detach().cpu() for m, (layer, H) in enumerate(zip(layers, K))},
            "cos_prev": cos,
        }
        if cfg.artifact_matrices:
            extras["HtG_before"] = {str(layer): (H.T @ r).detach().cpu() for layer, H, r in zip(layers, K, raw)}
            extras["HtG_after"] = {str(layer): (H.T @ g).detach().cpu() for layer, H, g in zip(layers, K, G)}
        return extras

    @property
    def _layers(self) -> list[int]:
        from .hypernet import edit_layers
        return edit_layers(self.config, self.lm)

    def projected_gradient(self, net: HyperNet, H: torch.Tensor, g_theta: torch.Tensor, m: int) -> torch.Tensor:
        """Eq. 6: ``P = H (HᵀH + e^λ I)⁻¹ g_θ`` ``[T, D_g]`` (or ``H g_θ`` without weight projection)."""
        if not self.config.weight_projection:
            return H @ g_theta
        return regularised_solve_op(H, g_theta, self._lam(net, m).detach() if self.config.regularise else None)

    def hyper_loss(self, net, pred, g_theta) -> torch.Tensor:
        loss = torch.zeros((), device=g_theta[0].device)
        for m, (H, G, g, d) in enumerate(zip(pred.K, pred.D, g_theta, pred.deltas)):
            P = self.projected_gradient(net, H, g.detach(), m).detach()
            loss = loss + (P * G).sum()  # Eq. 7
            if self.config.regularise:
                # λ's gradient: <g_θ, Δθ(λ)> with G held fixed (P does not depend on λ's graph)
                loss = loss + (g.detach() * solve_shift(H, G.detach(), net.lamda[m])).sum()
        return loss
