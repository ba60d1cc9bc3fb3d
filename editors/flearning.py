"""F-Learning, "Forgetting before Learning" (Ni et al., ACL 2024; the F-Learning baseline of GeoEdit, geoedit.txt
Fig. 1a and Table 1).

    τ_old = FT(θ0; D_old) − θ0            fine-tune on the OLD facts (prompt -> target_true)
    θ'    = θ0 − λ · τ_old                forget them by task arithmetic
    θ*    = FT(θ'; D_new)                 learn the NEW facts (prompt -> target_new) from θ'
    delta = θ* − θ0 = −λ · τ_old + (θ* − θ')

No public code exists (guides METHODS.md section 12); both variants of the paper are offered by ``mode``: full
fine-tuning of the chosen weight matrices ('ft', F-Learning_FT) or a peft LoRA adapter over them ('lora',
F-Learning_LoRA; τ_old is the merged product B A · alpha/r). Both fine-tunings use the loop and loss of the
fine-tuning family (:func:`editors.finetune.finetune`); the model is restored exactly after each. Every request
needs a ``target_true`` (the old fact); a request without one raises :class:`EditError`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

from .base import EditorConfig, EditResult
from .fields import check_range
from .finetune import FineTuneEditor, TwoTaskConfig
from .registry import register
from .requests import EditRequest

log = logging.getLogger(__name__)


@dataclass
class FLearningConfig(TwoTaskConfig):
    """Config of ``flearning``: the loop of ``ft`` twice (old facts, then new facts from θ0 − λ τ_old).

    Defaults: those of ``ft`` (layer 20 of SmolLM2-135M's MLP output projection, FT-M, 25 epochs, lr 5e-4, batch 1)
    for mode 'ft'; GeoEdit Appendix C's LoRA (r 8, alpha 32, dropout 0.05) for mode 'lora'; λ = 1.
    """

    version: ClassVar[int] = 1

    forget_lambda: float = field(default=1.0, metadata={"help": (
        "λ of the forgetting step θ' = θ0 − λ τ_old (Ni et al. 2024). The value used by Ni et al. was not verified "
        "here (guides METHODS.md section 12: 'λ not verified here -> hparam'); 1 subtracts the whole old-fact task "
        "vector, the plain reading of 'forgetting before learning'. 0 reduces F-Learning to fine-tuning on the new "
        "facts.")})

    def validate(self) -> None:
        super().validate()
        check_range("forget_lambda", self.forget_lambda, 0)


@register(family="fine-tuning", order=130, tiny={"layers": (1,), "num_steps": 2, "batch_size": 2})
class FLearningEditor(FineTuneEditor):
    """F-Learning (Ni et al. 2024): forget the old facts by subtracting λ τ_old, then fine-tune on the new ones."""

    name: ClassVar[str] = "flearning"
    config_cls: ClassVar[type[EditorConfig]] = FLearningConfig
    summary: ClassVar[str] = "F-Learning: θ0 − λ·τ_old (FT on target_true), then FT on target_new (full or LoRA)"

    def edit(self, requests: Sequence[EditRequest]) -> EditResult:
        started, names = self.begin_edit(requests)
        cfg = self.config
        old = [self.encode_old(r) for r in requests]
        new = [self.encode(r) for r in requests]
        lora, lr = cfg.adapter_and_lr()
        t_old = self.fit(names, old, lora=lora, lr=lr, num_steps=cfg.old_num_steps)
        forget = {n: -cfg.forget_lambda * t_old.deltas[n] for n in names}
        t_new = self.fit(names, new, lora=lora, lr=lr, start=forget)
        deltas = {n: (forget[n] + t_new.deltas[n]).contiguous() for n in names}
        info = {**self.delta_info(deltas), "n_requests": len(requests),
                "old": {k: v for k, v in t_old.stats.items() if k != "loss_curve"},
                "new": {k: v for k, v in t_new.stats.items() if k != "loss_curve"},
                "tau_old_norm": {n: t_old.deltas[n].norm().item() for n in names}}
        artifacts = {"loss_curve_old": t_old.stats["loss_curve"], "loss_curve_new": t_new.stats["loss_curve"],
                     "tau_old": {n: t_old.deltas[n].cpu().numpy() for n in names}}
        result = self._result(deltas=deltas, info=info, artifacts=artifacts, started=started)
        log.info("%s: %d request(s), old loss %.4g -> %.4g, new loss %.4g -> %.4g in %.2fs", self.name,
                 len(requests), t_old.stats["loss_initial"], t_old.stats["loss_final"], t_new.stats["loss_initial"],
                 t_new.stats["loss_final"], result.seconds)
        return result
