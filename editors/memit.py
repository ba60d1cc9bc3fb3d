"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., ICLR 2023; kmeng01/memit memit/memit_main.py).

Batched edit of the MLP output projections of several layers (:func:`editors.multilayer.multilayer_update`):
residual-stream targets z at the last edit layer, the residual spread linearly over the layers still to edit, and
per layer the least-squares update that keeps the covariance-weighted outputs of other keys (guides METHODS.md
section 2)::

    delta_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹        (float64; λ = mom2_update_weight)

``sequential=True`` is MEMIT_seq (AlphaEdit repo memit/memit_seq_main.py): the keys of every earlier batch of THIS
editor's run are kept as ``K_p K_pᵀ`` and added to the solve, ``(λ C + K_p K_pᵀ + K Kᵀ)``; after a result is
applied, :meth:`MEMITEditor.after_apply` recomputes that batch's keys on the edited model and adds ``K Kᵀ``. The
statistic lives on the editor instance only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from .base import EditResult
from .fields import check_range
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


def memit_solve(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, *, mom2_update_weight: float,
                KpKp: torch.Tensor | None = None) -> torch.Tensor:
    """MEMIT's closed form ``delta = R Kᵀ (λ C + K_p K_pᵀ + K Kᵀ)⁻¹`` ``[d, d_ff]`` (memit_main.py: ``adj_k =
    solve(λC + KKᵀ, K); upd = R adj_kᵀ``).

    Args:
        K: keys ``[d_ff, n]``; R: residuals ``[d, n]``; C: ``E[k kᵀ]`` ``[d_ff, d_ff]`` (all in the solve dtype).
        KpKp: accumulated ``K_p K_pᵀ`` of earlier batches (MEMIT_seq) or None.
    """
    A = mom2_update_weight * C + K @ K.T
    if KpKp is not None:
        A = A + KpKp
    adj = torch.linalg.solve(A, K)  # [d_ff, n] = A⁻¹ K (A is symmetric)
    return R @ adj.T


@dataclass
class MEMITConfig(MultiLayerConfig):
    """Config of ``memit``. Defaults: MEMIT's Llama3-8B hparams (jianghoucheng/AlphaEdit hparams/MEMIT/Llama3-8B.json:
    layers [4..8], 25 steps, wd 0.5, clamp 0.75, kl 0.0625, λ 15000) mapped to SmolLM2-135M (METHODS.md 13), with
    v_lr 0.5 instead of 0.1 (see MultiLayerConfig.v_lr). Checked by tests/integration/test_memit_family_default.py."""

    version: ClassVar[int] = 1

    mom2_update_weight: float = field(default=15000.0, metadata={"help": (
        "λ: weight of the preserved-key covariance C in (λC + KKᵀ)⁻¹ (MEMIT Eq. 14; memit hparams "
        "mom2_update_weight: GPT-J and Llama3-8B 15000, GPT-2 XL 20000). C is normalised by its token count, so λ "
        "plays the role of the number of preserved keys: larger = smaller, more conservative updates. For one "
        "request a layer writes s/(λ+s) of its share, s = kᵀC⁻¹k (values of s and of the share on SmolLM2-135M: "
        "docs/DEFAULTS.md).")})
    sequential: bool = field(default=False, metadata={"help": (
        "MEMIT_seq (AlphaEdit repo memit/memit_seq_main.py): add the accumulated K_p K_pᵀ of every earlier batch "
        "of this run to the solve, updated after each applied batch with keys recomputed on the edited model.")})

    def validate(self) -> None:
        super().validate()
        check_range("mom2_update_weight", self.mom2_update_weight, 0, lo_open=True)


@register(family="locate-then-edit", collapse_study=True, order=40, tiny=TINY_OVERRIDES)
class MEMITEditor(KeyMomentsState, MultiLayerEditor):
    """MEMIT (Meng et al. 2023): batched multi-layer least-squares edit of the MLP output projections."""

    name: ClassVar[str] = "memit"
    config_cls: ClassVar[type] = MEMITConfig
    summary: ClassVar[str] = ("MEMIT: batched multi-layer edit, ΔW = R Kᵀ(λC + KKᵀ)⁻¹ on residual targets spread "
                              "over layers; option sequential = MEMIT_seq")
    site: ClassVar[str] = "residual"
    spread: ClassVar[str] = "linear"
    solve_dtype: ClassVar[torch.dtype] = torch.float64

    def __init__(self, lm, config=None, *, cache_dir=None, seed=0):
        super().__init__(lm, config, cache_dir=cache_dir, seed=seed)
        #: MEMIT_seq: layer -> accumulated K_p K_pᵀ (float64) of the batches applied so far in this run
        self.KpKp: dict[int, torch.Tensor] = {}
        self.n_accumulated = 0

    def layer_extra(self, layer: int) -> dict:
        if self.config.sequential and layer in self.KpKp:
            return {"KpKp": self.KpKp[layer]}
        return {}

    def solve(self, K: torch.Tensor, R: torch.Tensor, state: LayerState) -> torch.Tensor:
        return memit_solve(K, R, state.C, mom2_update_weight=self.config.mom2_update_weight,
                           KpKp=state.extra.get("KpKp"))

    def finish(self, out: MultiLayerOutput, info: dict, artifacts: dict) -> None:
        if self.config.sequential:
            info["n_previous_keys"] = self.n_accumulated

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        if not self.config.sequential:
            return
        moments = key_second_moments(self.lm, self.config.layers, requests, self.templates)
        for layer, M in moments.items():
            self.KpKp[layer] = self.KpKp[layer] + M if layer in self.KpKp else M
        self.n_accumulated += len(requests)
