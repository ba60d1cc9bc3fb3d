"""LoRA editing (Hu et al. 2021) through ``peft``.

``lora``: a LoRA adapter (``peft.LoraConfig`` + ``peft.get_peft_model``) is put on the chosen weight matrices
(default: the MLP output projection of the configured layers, named through :class:`editors.spec.ModelSpec`), only
the adapter is trained with Adam on the edit prompts (the FT-M / FT-L losses and the loop of
:mod:`editors.finetune`), and the trained
update is merged into an ordinary additive delta per matrix:

    ΔW = B @ A · (alpha / rank)        (canonical ``[d_out, d_in]``; B ``[d_out, r]``, A ``[r, d_in]``)

returned in the parameter's own layout (transposed for GPT-2 ``Conv1D``), so every diagnostic sees a LoRA edit like
any other edit. The adapter is then removed with ``PeftModel.unload()`` (which puts the original modules back), so
the model is exactly as it was: same modules, same parameters bit for bit, same ``requires_grad`` flags and mode.

Defaults follow GeoEdit's LoRA baseline (geoedit.txt Appendix C: r = 8, alpha = 32, dropout 0.05); the paper
targets ``[q_proj, v_proj]``, here the MLP output projection as for the other editors of this workbench (set
``module`` to change).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

from .base import EditorConfig, EditResult
from .finetune import AdapterConfig, FineTuneEditor
from .registry import register
from .requests import EditRequest

log = logging.getLogger(__name__)


@dataclass
class LoRAConfig(AdapterConfig):
    """Config of ``lora``: Adam on a peft LoRA adapter over the chosen weights, merged into additive deltas.

    GeoEdit Appendix C (r 8, alpha 32, dropout 0.05) for the adapter; the loop and loss of ``ft`` (FT-M by default,
    25 epochs, batch 1). The learning rate is higher than full fine-tuning's because B starts at zero and the
    adapter has few parameters (LoRA papers use 1e-4..1e-3 over many more steps; 25 steps need more).
    """

    version: ClassVar[int] = 1

    lr: float = field(default=5e-3, metadata={"help": (
        "Adam learning rate of the adapter. 5e-3: with B initialised to zero (Hu et al. 2021) and only 25 epochs, "
        "full fine-tuning's 5e-4 barely moves ΔW = B A · alpha/r; 10x keeps the step count of 'ft'.")})


@register(family="fine-tuning", order=120, tiny={"layers": (1,), "num_steps": 3})
class LoRAEditor(FineTuneEditor):
    """LoRA (Hu et al. 2021) through peft; the merged product B A · alpha/r is the returned delta."""

    name: ClassVar[str] = "lora"
    config_cls: ClassVar[type[EditorConfig]] = LoRAConfig
    summary: ClassVar[str] = "LoRA fine-tuning via peft (r 8, alpha 32), merged into deltas B@A·alpha/r"

    def edit(self, requests: Sequence[EditRequest]) -> EditResult:
        started, names = self.begin_edit(requests)
        out = self.fit(names, [self.encode(r) for r in requests], lora=self.config.lora_settings())
        info = {**out.stats, **self.delta_info(out.deltas), "n_requests": len(requests)}
        curve = info.pop("loss_curve")
        artifacts = {"loss_curve": curve,
                     "lora_A": {n: a.cpu().numpy() for n, (a, _, _) in out.lora.items()},
                     "lora_B": {n: b.cpu().numpy() for n, (_, b, _) in out.lora.items()},
                     "lora_scale": {n: s for n, (_, _, s) in out.lora.items()}}
        result = self._result(deltas=out.deltas, info=info, artifacts=artifacts, started=started)
        log.info("%s: %d request(s), loss %.4g -> %.4g in %.2fs", self.name, len(requests), info["loss_initial"],
                 info["loss_final"], result.seconds)
        return result
