"""AlphaEdit: null-space constrained knowledge editing (Fang et al., ICLR 2025; jianghoucheng/AlphaEdit
AlphaEdit/AlphaEdit_main.py, experiments/evaluate.py ``get_project``).

The update is projected onto the (approximate) null space of the preserved keys, so that ``ΔW k0 ≈ 0`` for the keys
the covariance was computed on (guides METHODS.md section 5):

* once per editor, from the UNEDITED model (:meth:`AlphaEditEditor.prepare`): ``C = U diag(s) Uᵀ`` (eigh of the
  covariance); the null space is spanned by the eigenvectors with ``s < threshold`` and ``P = U_null U_nullᵀ``;
* per batch, per layer (targets and spread exactly as MEMIT)::

      Δᵀ = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K Rᵀ        (float32 as the reference; no λC term)

  ``Δᵀ`` lies in the range of P (``αΔᵀ = P(K Rᵀ - (KKᵀ + K_pK_pᵀ)Δᵀ)``), so every row of ΔW is orthogonal to the
  preserved span;
* after a result is applied (:meth:`AlphaEditEditor.after_apply`) ``K_p K_pᵀ += K Kᵀ`` with K recomputed on the
  edited model (the reference's ``cache_c``), kept on the editor instance.

The threshold: the reference uses an ABSOLUTE 2e-2 on the eigenvalues of ``E[k kᵀ]``, which depends on the model's
activation scale (if no eigenvalue is below it, P = 0 and every edit vanishes). Two scale-free rules are offered:
``"relative"`` compares with ``threshold · s_max``, ``"energy"`` (the default) takes the smallest eigen-directions
that together hold at most ``threshold`` of ``trace(C)``. The null-space dimension per layer is logged, kept in
``self.null_dims``, reported in every result's ``info`` / ``artifacts``, and an empty null space at any layer is
refused with :class:`~editors.base.EditError`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch

from .base import EditError, EditResult
from .fields import check_choice, check_range
from .multilayer import (
    TINY_OVERRIDES,
    KeyMomentsState,
    LayerState,
    MultiLayerConfig,
    MultiLayerEditor,
    MultiLayerOutput,
    key_second_moments,
)
from .registry import register
from .requests import EditRequest

log = logging.getLogger(__name__)

NULLSPACE_RULES = ("absolute", "relative", "energy")


@dataclass
class NullSpace:
    """The null space of one layer's preserved keys.

    Attributes:
        P: projector ``U_null U_nullᵀ`` ``[d_ff, d_ff]``.
        U_null: orthonormal basis of the null space ``[d_ff, null_dim]`` (eigenvectors with small eigenvalues).
        eigenvalues: all eigenvalues of C, ascending ``[d_ff]``.
        threshold: the absolute eigenvalue threshold that was applied.
    """

    P: torch.Tensor
    U_null: torch.Tensor
    eigenvalues: torch.Tensor
    threshold: float

    @property
    def dim(self) -> int:
        return int(self.U_null.shape[1])


def null_space(C: torch.Tensor, threshold: float, rule: str = "absolute", dtype: torch.dtype = torch.float32
               ) -> NullSpace:
    """Null space of the covariance ``C`` ``[d_ff, d_ff]``: the eigenvectors whose eigenvalue is

    * "absolute": below ``threshold`` (AlphaEdit ``get_project``);
    * "relative": below ``threshold · s_max``;
    * "energy": among the smallest ones that together hold at most ``threshold`` of ``trace(C)`` (the share of the
      preserved keys' mean squared norm the null space may carry).

    The eigendecomposition runs in float64; ``P``, ``U_null`` and the eigenvalues are returned in ``dtype``.
    (The reference uses the SVD of C, identical for a symmetric positive semi-definite C.)"""
    if rule not in NULLSPACE_RULES:
        raise ValueError(f"unknown null-space rule {rule!r}; valid: {', '.join(NULLSPACE_RULES)}")
    C64 = C.double()
    C64 = (C64 + C64.T) / 2
    s, U = torch.linalg.eigh(C64)  # ascending
    if rule == "absolute":
        thr = float(threshold)
    elif rule == "relative":
        thr = float(threshold) * float(s.max().clamp_min(0))
    else:
        share = torch.cumsum(s.clamp_min(0), 0) / s.clamp_min(0).sum().clamp_min(1e-300)
        m = int((share <= threshold).sum())
        thr = float(s[m]) if m < s.numel() else math.inf  # the first eigenvalue left out
    idx = s < thr
    U_null = U[:, idx]
    P = U_null @ U_null.T
    return NullSpace(P=P.to(dtype), U_null=U_null.to(dtype), eigenvalues=s.to(dtype), threshold=thr)


def alphaedit_solve(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, *, alpha: float,
                    KpKp: torch.Tensor | None = None) -> torch.Tensor:
    """AlphaEdit's update ``ΔW = [(P (KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K Rᵀ]ᵀ`` ``[d, d_ff]`` (AlphaEdit_main.py; the
    reference computes ``Δᵀ`` ``[d_ff, d]`` and transposes it for nn.Linear).

    Args:
        K: keys ``[d_ff, n]``; R: residuals ``[d, n]``; P: null-space projector ``[d_ff, d_ff]``.
        alpha: the ridge α (AlphaEdit hparams ``L2``).
        KpKp: accumulated keys of the batches edited earlier in the run, or None.
    """
    M = K @ K.T
    if KpKp is not None:
        M = M + KpKp
    A = P @ M + alpha * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    B = P @ (K @ R.T)  # [d_ff, d]
    return torch.linalg.solve(A, B).T


@dataclass
class AlphaEditConfig(MultiLayerConfig):
    """Config of ``alphaedit``. Defaults: AlphaEdit hparams/AlphaEdit/Llama3-8B.json (layers [4..8], 25 steps,
    wd 0.5, clamp 0.75, kl 0.0625, L2 α 10) mapped to SmolLM2-135M (METHODS.md 13), with v_lr 0.5 (see
    MultiLayerConfig) and a scale-free null-space rule (see ``nullspace_rule``)."""

    version: ClassVar[int] = 1

    nullspace_threshold: float = field(default=0.1, metadata={"help": (
        "Threshold of the null-space rule (see nullspace_rule). The reference (absolute rule) uses 2e-2 for "
        "Llama3-8B, GPT-J and GPT-2 XL. Default 0.1 with the energy rule: the null space may carry at most 10% of "
        "the preserved keys' energy trace(C) (its size on SmolLM2-135M, and what the absolute 2e-2 would keep: "
        "docs/DEFAULTS.md).")})
    nullspace_rule: str = field(default="energy", metadata={"help": (
        "'absolute': eigenvalue s < threshold (AlphaEdit get_project); 'relative': s < threshold · s_max; "
        "'energy': the smallest eigen-directions that together hold at most threshold · trace(C). An absolute "
        "threshold depends on the activation scale of the model and layer (METHODS.md 5: with nothing below it, "
        "P = 0 and edits vanish); the two scale-free rules do not. Use 'absolute' with 2e-2 for the reference "
        "(the preset variant 'reference'): on SmolLM2 the preset's energy 0.1 keeps 739-875 null directions of "
        "layers 4-8 against the reference's 1100-1291, and its ΔW for CounterFact record 0 has cos 0.82 and "
        "||ΔW_ref||/||ΔW|| 0.85 to EasyEdit's, with the same p(target) after the edit, 0.985 "
        "(docs/reference_agreement.md).")})
    alpha: float = field(default=10.0, metadata={"help": (
        "α, the ridge in (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ (AlphaEdit hparams 'L2': 10; EasyEdit uses 1).")})
    store_null_basis: bool = field(default=True, metadata={"help": (
        "Put each layer's null-space basis U_null [d_ff, null_dim] into the artifacts of the FIRST result of a run "
        "(the preserved span is its orthogonal complement), for the analysis layer's key angles. Later results "
        "carry only the dims, eigenvalues and the update's share in the preserved span.")})

    def validate(self) -> None:
        super().validate()
        check_choice("nullspace_rule", self.nullspace_rule, NULLSPACE_RULES)
        check_range("nullspace_threshold", self.nullspace_threshold, 0, lo_open=True)
        if self.nullspace_rule != "absolute" and not self.nullspace_threshold < 1:
            raise ValueError(f"a {self.nullspace_rule} nullspace_threshold must be in (0, 1), got "
                             f"{self.nullspace_threshold}")
        check_range("alpha", self.alpha, 0, lo_open=True)


# tiny: the null space of the directions holding at most 5% of the tiny model's key energy (rule 'energy')
@register(family="constrained", collapse_study=True, order=70,
          tiny={**TINY_OVERRIDES, "nullspace_threshold": 0.05})
class AlphaEditEditor(KeyMomentsState, MultiLayerEditor):
    """AlphaEdit (Fang et al. 2025): MEMIT's targets with the update projected onto the preserved keys' null space."""

    name: ClassVar[str] = "alphaedit"
    config_cls: ClassVar[type] = AlphaEditConfig
    summary: ClassVar[str] = ("AlphaEdit: null-space projected batch edit, Δᵀ = (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K Rᵀ, "
                              "keys of earlier batches accumulated")
    site: ClassVar[str] = "residual"
    spread: ClassVar[str] = "linear"
    solve_dtype: ClassVar[torch.dtype] = torch.float32

    def __init__(self, lm, config=None, *, cache_dir=None, seed=0):
        super().__init__(lm, config, cache_dir=cache_dir, seed=seed)
        #: layer -> the null space of the unedited model's keys (set by prepare)
        self.null_spaces: dict[int, NullSpace] = {}
        #: layer -> null-space dimension
        self.null_dims: dict[int, int] = {}
        #: layer -> accumulated K_p K_pᵀ (float32) of the batches applied so far in this run
        self.KpKp: dict[int, torch.Tensor] = {}
        self.n_accumulated = 0
        self._n_results = 0

    def prepare_method(self) -> None:
        cfg = self.config
        for layer in cfg.layers:
            ns = null_space(self.C[layer], cfg.nullspace_threshold, cfg.nullspace_rule, dtype=self.solve_dtype)
            self.null_spaces[layer] = ns
            self.null_dims[layer] = ns.dim
            log.info("alphaedit layer %d: null space of %d / %d dims (eigenvalue < %.3g; max %.3g)", layer, ns.dim,
                     ns.eigenvalues.numel(), ns.threshold, float(ns.eigenvalues.max()))
        empty = [layer for layer, d in self.null_dims.items() if d == 0]
        if empty:
            detail = ", ".join(
                f"layer {layer}: smallest eigenvalue {float(self.null_spaces[layer].eigenvalues.min()):.3g} >= "
                f"threshold {self.null_spaces[layer].threshold:.3g}" for layer in empty)
            raise EditError(
                f"alphaedit: the null space of the preserved keys is empty ({detail}); every update would be "
                f"projected to zero. Raise nullspace_threshold (now {cfg.nullspace_threshold}, rule "
                f"{cfg.nullspace_rule!r}) or use a scale-free nullspace_rule ('energy' or 'relative').")

    def layer_extra(self, layer: int) -> dict:
        out = {"P": self.null_spaces[layer].P}
        if layer in self.KpKp:
            out["KpKp"] = self.KpKp[layer]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "n_results": torch.tensor(self._n_results)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._n_results = int(torch.as_tensor(state.get("n_results", 0)))

    def solve(self, K: torch.Tensor, R: torch.Tensor, state: LayerState) -> torch.Tensor:
        state.info["null_dim"] = self.null_dims[state.layer]
        return alphaedit_solve(K, R, state.extra["P"], alpha=self.config.alpha, KpKp=state.extra.get("KpKp"))

    def finish(self, out: MultiLayerOutput, info: dict, artifacts: dict) -> None:
        layers = list(self.config.layers)
        shares = []
        for layer in layers:
            D = out.canonical[layer].double()
            U = self.null_spaces[layer].U_null.to(D.device, torch.float64)
            total = float((D ** 2).sum())
            in_null = float(((D @ U) ** 2).sum())
            share = max(0.0, 1.0 - in_null / total) if total > 0 else math.nan
            shares.append(share)
            info["layers"][str(layer)]["preserved_share"] = share
        info["null_dims"] = {str(layer): self.null_dims[layer] for layer in layers}
        info["n_previous_keys"] = self.n_accumulated
        artifacts["layers"] = layers
        artifacts["null_dims"] = [self.null_dims[layer] for layer in layers]
        artifacts["nullspace_threshold_abs"] = [self.null_spaces[layer].threshold for layer in layers]
        # share of ||ΔW||² in the preserved span (the complement of the null space): ~0 by construction
        artifacts["preserved_share"] = shares
        if self._n_results == 0:
            artifacts["eigenvalues"] = {str(layer): self.null_spaces[layer].eigenvalues.cpu() for layer in layers}
            if self.config.store_null_basis:
                artifacts["null_basis"] = {str(layer): self.null_spaces[layer].U_null.cpu() for layer in layers}
        self._n_results += 1

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        moments = key_second_moments(self.lm, self.config.layers, requests, self.templates, dtype=self.solve_dtype)
        for layer, M in moments.items():
            self.KpKp[layer] = self.KpKp[layer] + M if layer in self.KpKp else M
        self.n_accumulated += len(requests)
