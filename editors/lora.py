"""LoRA editing (Hu et al. 2021) through ``peft``, and the fine-tuning loop shared by ``flearning`` and ``geoedit``.

``lora``: a LoRA adapter (``peft.LoraConfig`` + ``peft.get_peft_model``) is put on the chosen weight matrices
(default: the MLP output projection of the configured layers, named through :class:`editors.spec.ModelSpec`), only
the adapter is trained with Adam on the edit prompts (the FT-M / FT-L losses of :mod:`editors.ft`), and the trained
update is merged into an ordinary additive delta per matrix:

    ΔW = B @ A · (alpha / rank)        (canonical ``[d_out, d_in]``; B ``[d_out, r]``, A ``[r, d_in]``)

returned in the parameter's own layout (transposed for GPT-2 ``Conv1D``), so every diagnostic sees a LoRA edit like
any other edit. The adapter is then removed with ``PeftModel.unload()`` (which puts the original modules back), so
the model is exactly as it was: same modules, same parameters bit for bit, same ``requires_grad`` flags and mode.

Defaults follow GeoEdit's LoRA baseline (geoedit.txt Appendix C: r = 8, alpha = 32, dropout 0.05); the paper
targets ``[q_proj, v_proj]``, here the MLP output projection as for the other editors of this workbench (set
``module`` to change).

:func:`finetune` is the loop: Adam on the live parameters (full fine-tuning) or on a LoRA adapter, optionally from
a start offset (F-Learning's θ' = θ0 − λ τ_old) and optionally recording GeoEdit's per-neuron importance (Eq. 12-13,
EMA-smoothed; per canonical row or per column, ``importance_axis``). It always restores the model.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Sequence

import numpy as np
import torch

from .base import EditError, EditorConfig, EditResult, finite_or_raise, relative_norm
from .ft import _Example, _FineTuneEditor, _FTCommon
from .registry import register
from .requests import EditRequest

log = logging.getLogger(__name__)

ADAPTER = "editbench"


@dataclass(frozen=True)
class LoraSettings:
    """What a LoRA adapter is made of (passed to ``peft.LoraConfig``)."""

    rank: int
    alpha: float
    dropout: float


@dataclass
class Trained:
    """Outcome of one :func:`finetune` call.

    Attributes:
        deltas: param name -> trained change (param layout), relative to the START weights (θ0 + start offset).
        importance: param name -> EMA-smoothed per-neuron importance, or None: ``[d_out]`` per canonical row
            (``importance_axis="out"``) or ``[d_in]`` per canonical column (``"in"``).
        stats: loss_initial, loss_final, epochs, opt_steps, stopped_early, loss_curve.
        lora: param name -> (A ``[r, d_in]``, B ``[d_out, r]``, scale) in LoRA mode, else empty.
    """

    deltas: dict[str, torch.Tensor]
    importance: dict[str, np.ndarray] | None
    stats: dict
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)


def _lora_config(names: Sequence[str], settings: LoraSettings, conv1d: bool):
    from peft import LoraConfig
    modules = [n[:-len(".weight")] if n.endswith(".weight") else n for n in names]
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=modules, bias="none", fan_in_fan_out=conv1d, init_lora_weights=True)


def finetune(editor: _FineTuneEditor, names: Sequence[str], examples: Sequence[_Example], *,
             lora: LoraSettings | None = None, start: Mapping[str, torch.Tensor] | None = None,
             importance_decay: float | None = None, importance_axis: str = "out", num_steps: int | None = None,
             lr: float | None = None) -> Trained:
    """Adam on ``names`` (full fine-tuning) or on a LoRA adapter over them; the model is restored bit for bit.

    Args:
        editor: supplies the model, the loss (:meth:`_FineTuneEditor._loss`) and the config's batch_size,
            weight_decay, early_stop_loss (and num_steps / lr unless given).
        names: weight parameters (``...weight``) to train or to wrap.
        examples: encoded requests.
        lora: LoRA settings, or None for full fine-tuning of ``names``.
        start: optional offsets (param layout) added to the weights before training (F-Learning's θ'); the
            returned deltas do NOT include them.
        importance_decay: when set, record GeoEdit's importance (Eq. 12-13): per neuron the mean of |w · ∂L/∂w|
            over the neuron's trainable parameters, smoothed over optimiser steps by an EMA with this decay:
            Ī ← d·Ī + (1−d)·I (Ī initialised by the first step).
        importance_axis: what a neuron is: "out" = a canonical ROW (output unit; its parameters are the row of W
            for full fine-tuning, the row of B ``[d_out, r]`` for LoRA), "in" = a canonical COLUMN (input unit; the
            column of W, or the column of A ``[r, d_in]`` for LoRA: the adapter parameters that act on that input
            alone).
    """
    if importance_axis not in ("out", "in"):
        raise ValueError(f"importance_axis must be 'out' or 'in', got {importance_axis!r}")
    cfg = editor.config
    model, spec = editor.model, editor.spec
    n_steps = int(num_steps if num_steps is not None else cfg.num_steps)
    rate = float(lr if lr is not None else cfg.lr)
    params = dict(model.named_parameters())
    targets = {n: params[n] for n in names}
    W0 = {n: p.detach().clone() for n, p in targets.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in targets.items()}
    was_training = model.training
    batches = [list(examples[i:i + cfg.batch_size]) for i in range(0, len(examples), cfg.batch_size)]
    curve: list[float] = []
    opt_steps, stopped_early = 0, False
    ema: dict[str, torch.Tensor] = {}
    peft_model = None
    lora_out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    try:
        for p in params.values():
            p.requires_grad_(False)
        with torch.no_grad():
            for n, off in (start or {}).items():
                targets[n].add_(off.to(targets[n].device, targets[n].dtype))
        W_start = {n: p.detach().clone() for n, p in targets.items()}
        model.eval()
        if lora is not None:
            from peft import get_peft_model
            peft_model = get_peft_model(model, _lora_config(names, lora, spec.conv1d), adapter_name=ADAPTER)
            layers = {n: model.get_submodule(n[:-len(".weight")]) for n in names}
            for lay in layers.values():
                lay.lora_dropout[ADAPTER].train(lora.dropout > 0)  # adapter dropout only; the model stays in eval
            trainable = {n: [lay.lora_A[ADAPTER].weight, lay.lora_B[ADAPTER].weight] for n, lay in layers.items()}
        else:
            trainable = {n: [p] for n, p in targets.items()}
        flat = [p for ps in trainable.values() for p in ps]
        for p in flat:
            p.requires_grad_(True)
            p.grad = None
        with torch.no_grad():
            initial = sum(editor._loss(b).item() * len(b) for b in batches) / len(examples)
        opt = torch.optim.Adam(flat, lr=rate, weight_decay=cfg.weight_decay)
        with torch.enable_grad():
            for _epoch in range(n_steps):
                total = 0.0
                for batch in batches:
                    opt.zero_grad(set_to_none=True)
                    loss = editor._loss(batch)
                    value = loss.item()
                    if not np.isfinite(value):
                        raise EditError(f"{editor.name}: the loss became NaN/Inf during fine-tuning")
                    total += value * len(batch)
                    if value < cfg.early_stop_loss:
                        continue
                    loss.backward()
                    if importance_decay is not None:
                        for n, ps in trainable.items():
                            # W itself; for LoRA B [d_out, r] (rows = output neurons) or A [r, d_in] (columns =
                            # input neurons)
                            w = ps[0] if lora is None else ps[1 if importance_axis == "out" else 0]
                            s = (w.detach() * w.grad).abs()
                            s = (spec.to_canonical(s) if lora is None else s).mean(dim=1 if importance_axis == "out"
                                                                                    else 0)
                            ema[n] = s if n not in ema else importance_decay * ema[n] + (1 - importance_decay) * s
                    opt.step()
                    opt_steps += 1
                curve.append(total / len(examples))
                log.debug("%s: epoch %d, mean loss %.4g", editor.name, len(curve), curve[-1])
                if curve[-1] < cfg.early_stop_loss:
                    stopped_early = True
                    break
        with torch.no_grad():
            final = sum(editor._loss(b).item() * len(b) for b in batches) / len(examples)
            if lora is None:
                trained = {n: p.detach() - W_start[n] for n, p in targets.items()}
            else:
                trained = {}
                for n, lay in layers.items():
                    A = lay.lora_A[ADAPTER].weight.detach().clone()
                    B = lay.lora_B[ADAPTER].weight.detach().clone()
                    scale = float(lay.scaling[ADAPTER])
                    lora_out[n] = (A, B, scale)
                    trained[n] = spec.to_param_layout((B @ A) * scale).contiguous()
    finally:
        if peft_model is not None:
            peft_model.unload()  # puts the original modules back (same objects), drops model.peft_config
        with torch.no_grad():
            for n, p in targets.items():
                p.copy_(W0[n])
                p.grad = grads[n]
        for n, p in dict(model.named_parameters()).items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    stats = {"loss_initial": initial, "loss_final": final, "epochs": len(curve), "opt_steps": opt_steps,
             "stopped_early": stopped_early, "loss_curve": curve}
    importance = None
    if importance_decay is not None:
        importance = {n: (ema[n].double().cpu().numpy() if n in ema else
                          np.zeros(spec.to_canonical(W0[n]).shape[0 if importance_axis == "out" else 1]))
                      for n in names}
    return Trained(trained, importance, stats, lora_out)


def encode_old(editor: _FineTuneEditor, req: EditRequest) -> _Example:
    """Encode a request with its OLD object (``target_true``) as the training target.

    Raises:
        EditError: the request has no ``target_true``.
    """
    if not req.target_true.strip():
        raise EditError(f"{editor.name}: request {req.case_id!r} has no target_true; this method fine-tunes on the "
                        "old facts too and needs the original object of every request")
    return editor._encode(dataclasses.replace(req, target_new=req.target_true))


def seeded(editor: _FineTuneEditor, fn, *args, **kwargs):
    """Run ``fn`` under a forked, seeded RNG (LoRA's A init, adapter dropout); the global RNG state is untouched."""
    dev = editor.lm.device
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(editor.seed)
        return fn(*args, **kwargs)


def delta_info(editor: _FineTuneEditor, deltas: Mapping[str, torch.Tensor]) -> dict:
    params = dict(editor.model.named_parameters())
    for n, d in deltas.items():
        finite_or_raise(editor.name, n, d)
    return {"delta_norm": {n: d.norm().item() for n, d in deltas.items()},
            "delta_rel_norm": {n: relative_norm(d, params[n].detach()) for n, d in deltas.items()},
            "delta_max_abs": {n: d.abs().max().item() for n, d in deltas.items()}}


# ---------------------------------------------------------------------------------------------------------------
# config and editor
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _LoRAFields(EditorConfig):
    """LoRA adapter fields shared by ``lora``, ``flearning`` (mode 'lora') and ``geoedit`` (mode 'lora')."""

    rank: int = field(default=8, metadata={"help": (
        "LoRA rank r (Hu et al. 2021): ΔW = B A · alpha/r with B [d_out, r], A [r, d_in]. 8 as GeoEdit's LoRA "
        "setting (geoedit.txt Appendix C: r = 8).")})
    alpha: float = field(default=32.0, metadata={"help": (
        "LoRA scaling numerator: the product is scaled by alpha / rank (peft 'lora_alpha'). 32 as GeoEdit Appendix "
        "C.")})
    dropout: float = field(default=0.05, metadata={"help": (
        "Dropout on the adapter's input during training (peft 'lora_dropout'; the model itself stays in eval "
        "mode). 0.05 as GeoEdit Appendix C. Seeded by the editor's seed.")})

    def _validate_lora(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(int(self.rank), float(self.alpha), float(self.dropout))


@dataclass
class LoRAConfig(_FTCommon, _LoRAFields):
    """Config of ``lora``: Adam on a peft LoRA adapter over the chosen weights, merged into additive deltas.

    GeoEdit Appendix C (r 8, alpha 32, dropout 0.05) for the adapter; the loop and loss of ``ft`` (FT-M by default,
    25 epochs, batch 1). The learning rate is higher than full fine-tuning's because B starts at zero and the
    adapter has few parameters (LoRA papers use 1e-4..1e-3 over many more steps; 25 steps need more).
    """

    version: ClassVar[int] = 1

    lr: float = field(default=5e-3, metadata={"help": (
        "Adam learning rate of the adapter. 5e-3: with B initialised to zero (Hu et al. 2021) and only 25 epochs, "
        "full fine-tuning's 5e-4 barely moves ΔW = B A · alpha/r; 10x keeps the step count of 'ft'.")})

    def validate(self) -> None:
        super().validate()
        self._validate_lora()


@register
class LoRAEditor(_FineTuneEditor):
    """LoRA (Hu et al. 2021) through peft; the merged product B A · alpha/r is the returned delta."""

    name: ClassVar[str] = "lora"
    config_cls: ClassVar[type[EditorConfig]] = LoRAConfig
    summary: ClassVar[str] = "LoRA fine-tuning via peft (r 8, alpha 32), merged into deltas B@A·alpha/r"

    def edit(self, requests: Sequence[EditRequest]) -> EditResult:
        started, names = self._begin_edit(requests)
        examples = [self._encode(r) for r in requests]
        out = seeded(self, finetune, self, names, examples, lora=self.config.lora_settings())
        info = {**out.stats, **delta_info(self, out.deltas), "n_requests": len(requests)}
        curve = info.pop("loss_curve")
        artifacts = {"loss_curve": curve,
                     "lora_A": {n: a.cpu().numpy() for n, (a, _, _) in out.lora.items()},
                     "lora_B": {n: b.cpu().numpy() for n, (_, b, _) in out.lora.items()},
                     "lora_scale": {n: s for n, (_, _, s) in out.lora.items()}}
        result = self._result(deltas=out.deltas, info=info, artifacts=artifacts, started=started)
        log.info("%s: %d request(s), loss %.4g -> %.4g in %.2fs", self.name, len(requests), info["loss_initial"],
                 info["loss_final"], result.seconds)
        return result
