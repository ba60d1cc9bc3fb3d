"""The fine-tuning family (ft, ft-c, lora, flearning, geoedit): its configs, its training loop and its editor base.

Every method of the family trains one kind of weight matrix at a few layers with Adam on the edit prompts, then
returns the change ``delta = W_trained - W_start`` and puts the weights back bit for bit (the model is trained in
place, never left changed):

* :class:`FineTuneConfig` -- the loop's fields (layers, module, objective, num_steps, lr, batch_size, weight_decay,
  early_stop_loss); :class:`AdapterConfig` adds a LoRA adapter's (rank, alpha, dropout); :class:`TwoTaskConfig`
  adds those of the methods that fine-tune on the old and the new facts separately (mode, lora_lr,
  old_num_steps). One line of inheritance: ``FineTuneConfig -> AdapterConfig -> TwoTaskConfig``.
* :func:`finetune` -- the loop (rome ``execute_ft``): ``num_steps`` epochs over the examples in chunks of
  ``batch_size``; a chunk whose loss is already below ``early_stop_loss`` takes no step; the epoch loop stops once
  an epoch's mean loss is below it. Adam on the live parameters (full fine-tuning) or on a peft LoRA adapter,
  optionally inside an L∞ box around the start weights (ft-c), optionally from a start offset (F-Learning's
  θ' = θ0 − λ τ_old) and optionally recording GeoEdit's per-neuron importance (Eq. 12-13, EMA-smoothed; per
  canonical row or per column, ``importance_axis``). It always restores the model.
* :class:`FineTuneEditor` -- the editor base: which parameters a config trains, how a request is encoded
  (:class:`Example`) and scored (:meth:`FineTuneEditor.loss`), seeded runs, delta diagnostics.

The model stays in eval mode (no dropout), so a run is deterministic on CPU for a given input; the editor's ``seed``
seeds a forked RNG around each training run (global RNG state is untouched). Target tokens are
``tok(" " + target)`` without special tokens and the prompt is ``tok(prompt)``, encoded separately and
concatenated, exactly as ``analysis.evaluation.encode_pair`` scores them.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch

from .base import EditError, Editor, EditorConfig, EditResult, add_update_, finite_or_raise, math_dtype, relative_norm
from .fields import check_choice, check_indices, check_range
from .requests import EditRequest

log = logging.getLogger(__name__)

OBJECTIVES = ("target_new", "prompt_last")
MODULES = ("mlp_out", "mlp_in", "attn_out")
#: modes of the two-task methods (flearning, geoedit)
MODES = ("ft", "lora")
#: the peft adapter name
ADAPTER = "editbench"


# ---------------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class FineTuneConfig(EditorConfig):
    """Fields of the fine-tuning loop, shared by every method of the family (not registered itself)."""

    layers: tuple[int, ...] = field(default=(20,), metadata={"help": (
        "Decoder layers whose weights are fine-tuned (0-based). Default 20 of SmolLM2-135M's 30 layers: layer 21 "
        "of 32 in the Llama FT hparams (EasyEdit llama-7b, AlphaEdit Llama3-8B), i.e. ~2/3 depth (guides "
        "METHODS.md section 13). Other models need their own value (e.g. via a preset).")})
    module: str = field(default="mlp_out", metadata={"help": (
        "Which weights of each layer are trained: 'mlp_out' (the MLP output projection, down_proj / c_proj; rome "
        "and EasyEdit FT), 'mlp_in' (every MLP input projection: gate_proj and up_proj, or c_fc), 'attn_out' (the "
        "attention output projection). Weights only, never biases (as rome's ft_main).")})
    objective: str = field(default="target_new", metadata={"help": (
        "Loss. 'target_new' (FT-M): teacher-forced cross-entropy on prompt + ' ' + target_new, masked to the target "
        "tokens, mean over a request's target tokens then over the batch (EasyEdit ft_main). 'prompt_last' (FT-L): "
        "log-softmax at the last prompt token gathered at every target id (rome baselines/ft/ft_main.py quirk: a "
        "multi-token target is predicted in full from one position, so token-level reliability of multi-token "
        "targets stays low).")})
    num_steps: int = field(default=25, metadata={"help": (
        "Epochs over the requests (rome/EasyEdit 'num_steps'; each epoch takes one Adam step per batch). 25 as in "
        "rome hparams/FT/gpt2-xl_constr.json and EasyEdit hparams/FT/llama3.2-3b.yaml.")})
    lr: float = field(default=5e-4, metadata={"help": (
        "Adam learning rate (5e-4 in rome's and EasyEdit's FT hparams).")})
    batch_size: int = field(default=1, metadata={"help": (
        "Requests per Adam step, taken in the given order (EasyEdit FT hparams: batch_size 1). Larger batches take "
        "fewer steps per epoch.")})
    weight_decay: float = field(default=0.0, metadata={"help": (
        "Adam (L2, coupled) weight decay on the trained weights, toward zero as in rome's ft_main (0 in every "
        "public FT hparams file).")})
    early_stop_loss: float = field(default=1e-2, metadata={"help": (
        "A batch whose loss is below this takes no step, and the epoch loop stops once an epoch's mean loss is "
        "below it (rome ft_main: 1e-2).")})

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("layers must name at least one layer")
        check_indices("layers", self.layers)
        check_choice("module", self.module, MODULES)
        check_choice("objective", self.objective, OBJECTIVES)
        check_range("num_steps", self.num_steps, 1)
        check_range("lr", self.lr, 0, lo_open=True)
        check_range("batch_size", self.batch_size, 1)
        for name in ("weight_decay", "early_stop_loss"):
            check_range(name, getattr(self, name), 0)

    def box(self) -> float | None:
        """Half-width of the elementwise box around W0, or None when unconstrained."""
        return None


@dataclass
class AdapterConfig(FineTuneConfig):
    """The loop's fields plus a LoRA adapter's: ``lora``, and ``flearning`` / ``geoedit`` in mode 'lora'."""

    rank: int = field(default=8, metadata={"help": (
        "LoRA rank r (Hu et al. 2021): ΔW = B A · alpha/r with B [d_out, r], A [r, d_in]. 8 as GeoEdit's LoRA "
        "setting (geoedit.txt Appendix C: r = 8).")})
    alpha: float = field(default=32.0, metadata={"help": (
        "LoRA scaling numerator: the product is scaled by alpha / rank (peft 'lora_alpha'). 32 as GeoEdit Appendix "
        "C.")})
    dropout: float = field(default=0.05, metadata={"help": (
        "Dropout on the adapter's input during training (peft 'lora_dropout'; the model itself stays in eval "
        "mode). 0.05 as GeoEdit Appendix C. Seeded by the editor's seed.")})

    def validate(self) -> None:
        super().validate()
        check_range("rank", self.rank, 1)
        check_range("alpha", self.alpha, 0, lo_open=True)
        check_range("dropout", self.dropout, 0, 1, hi_open=True)

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(int(self.rank), float(self.alpha), float(self.dropout))


@dataclass
class TwoTaskConfig(AdapterConfig):
    """Fields of the methods that fine-tune on old and new facts separately (flearning, geoedit)."""

    mode: str = field(default="ft", metadata={"help": (
        "'ft': full fine-tuning of the chosen weight matrices (the paper's _FT rows, geoedit.txt Table 1); "
        "'lora': a peft LoRA adapter over them, merged into B A · alpha/r (the _LoRA rows; the adapter's rank, "
        "alpha and dropout fields, lr = lora_lr).")})
    lora_lr: float = field(default=5e-3, metadata={"help": (
        "Adam learning rate in mode 'lora' (as the 'lora' editor: B starts at zero and 25 epochs are few).")})
    old_num_steps: int | None = field(default=None, metadata={"help": (
        "Epochs of the fine-tuning on the OLD facts (target_true); None = num_steps. The paper trains both for 3 "
        "epochs of a large dataset (geoedit.txt Appendix C); here the old facts are usually already known, so "
        "that fine-tuning stops early at early_stop_loss anyway.")})

    def validate(self) -> None:
        super().validate()
        check_choice("mode", self.mode, MODES)
        check_range("lora_lr", self.lora_lr, 0, lo_open=True)
        check_range("old_num_steps", self.old_num_steps, 1, optional=True)

    def adapter_and_lr(self) -> tuple[LoraSettings | None, float]:
        """The adapter (None in mode 'ft') and the learning rate both fine-tunings use."""
        if self.mode == "lora":
            return self.lora_settings(), self.lora_lr
        return None, self.lr


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


@dataclass(frozen=True)
class Example:
    """One request encoded for the loss: run ``input_ids``; score ``labels`` at ``positions`` (same length)."""

    input_ids: tuple[int, ...]
    positions: tuple[int, ...]
    labels: tuple[int, ...]


def pad_examples(tok, examples: Sequence[Example], device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` ``[B, width]`` of ``examples`` and the (row, column) of
    every scored position, ``[n_tokens]`` each, in example order (right padding keeps positions valid)."""
    ids, mask = right_pad(tok, [e.input_ids for e in examples], device)
    rows, cols = [], []
    for r, e in enumerate(examples):
        rows.extend([r] * len(e.positions))
        cols.extend(e.positions)
    return ids, mask, torch.tensor(rows, device=device), torch.tensor(cols, device=device)


def right_pad(tok, seqs: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` (right-padded with the tokenizer's pad id, else 0) and ``attention_mask`` ``[B, width]`` of token
    id sequences, on ``device``."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def _lora_config(names: Sequence[str], settings: LoraSettings, conv1d: bool):
    from peft import LoraConfig
    modules = [n[:-len(".weight")] if n.endswith(".weight") else n for n in names]
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=modules, bias="none", fan_in_fan_out=conv1d, init_lora_weights=True)


def finetune(editor: FineTuneEditor, names: Sequence[str], examples: Sequence[Example], *,
             lora: LoraSettings | None = None, start: Mapping[str, torch.Tensor] | None = None,
             box: float | None = None, importance_decay: float | None = None, importance_axis: str = "out",
             num_steps: int | None = None, lr: float | None = None) -> Trained:
    """Adam on ``names`` (full fine-tuning) or on a LoRA adapter over them; the model is restored bit for bit.

    Args:
        editor: supplies the model, the loss (:meth:`FineTuneEditor.loss`) and the config's batch_size,
            weight_decay, early_stop_loss (and num_steps / lr unless given).
        names: weight parameters (``...weight``) to train or to wrap.
        examples: encoded requests.
        lora: LoRA settings, or None for full fine-tuning of ``names``.
        box: full fine-tuning only: after every Adam step clamp each trained weight into
            ``[W_start - box, W_start + box]`` (Zhu et al. 2020; rome ft_main ``norm_constraint``); None = no box.
        start: optional offsets (param layout) added to the weights before training (F-Learning's θ'); the
            returned deltas do NOT include them.
        importance_decay: when set, record GeoEdit's importance (Eq. 12-13): per neuron the mean of |w · ∂L/∂w|
            over the neuron's trainable parameters, smoothed over optimiser steps by an EMA with this decay:
            Ī ← d·Ī + (1−d)·I, Ī initialised by the first step whose scores are not all zero for that matrix. (A
            LoRA adapter starts with B = 0, so on step 1 |w · ∂L/∂w| is exactly 0 for B (w = 0) and for A
            (∂L/∂A = scale·Bᵀ ∂L/∂W = 0): a score that says nothing about any neuron. Starting the EMA there would
            under-weight the first informative step by (1−d) against the later ones, an artefact of the init.)
        importance_axis: what a neuron is: "out" = a canonical ROW (output unit; its parameters are the row of W
            for full fine-tuning, the row of B ``[d_out, r]`` for LoRA), "in" = a canonical COLUMN (input unit; the
            column of W, or the column of A ``[r, d_in]`` for LoRA: the adapter parameters that act on that input
            alone).
    """
    if importance_axis not in ("out", "in"):
        raise ValueError(f"importance_axis must be 'out' or 'in', got {importance_axis!r}")
    if box is not None and lora is not None:
        raise ValueError("an L∞ box applies to full fine-tuning only, not to a LoRA adapter")
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
        # fp32 master copies of half-precision weights (full fine-tuning): Adam, the box and the returned delta
        # work on them; the bf16 / fp16 weight the forward uses is the master rounded once after every step
        masters = ({n: p.detach().to(math_dtype(p.dtype)).clone() for n, p in targets.items()}
                   if lora is None and any(p.dtype != math_dtype(p.dtype) for p in targets.values()) else None)
        with torch.no_grad():
            for n, off in (start or {}).items():
                if masters is not None:
                    masters[n] += off.to(masters[n].device, masters[n].dtype)
                    targets[n].copy_(masters[n].to(targets[n].dtype))
                else:
                    add_update_(targets[n], off)
        W_start = ({n: m.clone() for n, m in masters.items()} if masters is not None
                   else {n: p.detach().clone() for n, p in targets.items()})
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
            initial = sum(editor.loss(b).item() * len(b) for b in batches) / len(examples)
        opt = torch.optim.Adam(flat if masters is None else list(masters.values()), lr=rate,
                               weight_decay=cfg.weight_decay)
        with torch.enable_grad():
            for _epoch in range(n_steps):
                total = 0.0
                for batch in batches:
                    opt.zero_grad(set_to_none=True)
                    loss = editor.loss(batch)
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
                            s = (w.detach().float() * w.grad.float()).abs()
                            s = (spec.to_canonical(s) if lora is None else s).mean(dim=1 if importance_axis == "out"
                                                                                    else 0)
                            if n in ema:
                                ema[n] = importance_decay * ema[n] + (1 - importance_decay) * s
                            elif bool(s.any()):  # start at the first informative step (LoRA: B = 0 on step 1)
                                ema[n] = s
                    if masters is not None:
                        for n, p in targets.items():
                            masters[n].grad, p.grad = p.grad.to(masters[n].dtype), None
                    opt.step()
                    opt_steps += 1
                    with torch.no_grad():
                        for n, w in (targets if masters is None else masters).items():
                            if box is not None:
                                w.copy_(torch.clamp(w, min=W_start[n] - box, max=W_start[n] + box))
                            if masters is not None:
                                targets[n].copy_(w.to(targets[n].dtype))
                curve.append(total / len(examples))
                log.debug("%s: epoch %d, mean loss %.4g", editor.name, len(curve), curve[-1])
                if curve[-1] < cfg.early_stop_loss:
                    stopped_early = True
                    break
        with torch.no_grad():
            final = sum(editor.loss(b).item() * len(b) for b in batches) / len(examples)
            if lora is None:
                trained = {n: w.detach() - W_start[n] for n, w in (targets if masters is None else masters).items()}
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


class FineTuneEditor(Editor):
    """Fine-tuning on the live parameters, restored exactly afterwards.

    The default :meth:`edit` is plain fine-tuning on the new targets (``ft``, ``ft-c``: inside the config's box);
    ``lora``, ``flearning`` and ``geoedit`` implement their own from :meth:`fit`, :meth:`encode` and
    :meth:`encode_old`.
    """

    config_cls: ClassVar[type[EditorConfig]] = FineTuneConfig

    # ---- what is trained -----------------------------------------------------------------------------------
    def trained_params(self) -> list[str]:
        """Parameter names this config trains on this model.

        Raises:
            EditError: a layer index is out of range or a weight does not exist.
        """
        cfg = self.config
        spec = self.spec
        bad = [x for x in cfg.layers if not 0 <= int(x) < spec.n_layers]
        if bad:
            raise EditError(f"{self.name}: layers {bad} out of range; {self.lm.display_name} has layers "
                            f"0..{spec.n_layers - 1}")
        names: list[str] = []
        for layer in cfg.layers:
            if cfg.module == "mlp_out":
                names.append(spec.mlp_out_weight(layer))
            elif cfg.module == "mlp_in":
                names.extend(f"{spec.layer(layer)}.{m}.weight" for m in spec.mlp_in)
            else:
                names.append(f"{spec.attn_out_module(layer)}.weight")
        params = dict(self.model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise EditError(f"{self.name}: parameter {missing[0]!r} not found in {self.lm.display_name}")
        return names

    def prepare(self) -> None:
        self.trained_params()  # fail early on a layer the model does not have

    def begin_edit(self, requests: Sequence[EditRequest]) -> tuple[float, list[str]]:
        """The common start of ``edit``: its start time (``time.perf_counter()``) and :meth:`trained_params`.

        Raises:
            EditError: there are no requests, or a layer / weight of the config does not exist.
        """
        started = time.perf_counter()
        if not requests:
            raise EditError(f"{self.name}: no requests to edit")
        return started, self.trained_params()

    # ---- encoding and loss -------------------------------------------------------------------------------------
    def encode(self, req: EditRequest) -> Example:
        """A request with its NEW object (``target_new``) as the training target, for the config's objective."""
        tok = self.tok
        prompt = list(tok(req.prompt, add_special_tokens=True)["input_ids"])
        target = list(tok(" " + req.target_new.strip(), add_special_tokens=False)["input_ids"])
        if not prompt or not target:
            raise EditError(f"{self.name}: request {req.case_id!r} has an empty prompt or target after tokenising")
        lp, lt = len(prompt), len(target)
        if self.config.objective == "target_new":
            # teacher forcing: the token at position lp-1+j predicts target[j]; the last target token is no input
            return Example(tuple(prompt + target[:-1]), tuple(lp - 1 + j for j in range(lt)), tuple(target))
        # prompt_last: every target token is scored at the last prompt position
        return Example(tuple(prompt), (lp - 1,) * lt, tuple(target))

    def encode_old(self, req: EditRequest) -> Example:
        """A request with its OLD object (``target_true``) as the training target.

        Raises:
            EditError: the request has no ``target_true``.
        """
        if not req.target_true.strip():
            raise EditError(f"{self.name}: request {req.case_id!r} has no target_true; this method fine-tunes on "
                            "the old facts too and needs the original object of every request")
        return self.encode(dataclasses.replace(req, target_new=req.target_true))

    def loss(self, batch: Sequence[Example]) -> torch.Tensor:
        """Mean over the batch of each request's mean negative log-likelihood of its target tokens."""
        dev = self.lm.device
        ids, mask, rows, cols = pad_examples(self.tok, batch, dev)
        labels = [t for e in batch for t in e.labels]
        seg = [r for r, e in enumerate(batch) for _ in e.labels]
        h = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        # unembed only where the loss looks (the unembedding is the largest matmul of a small model)
        logits = self.model.get_output_embeddings()(h[rows, cols])
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(1, torch.tensor(labels, device=dev)[:, None]).squeeze(1)  # [n_tokens]
        seg_t = torch.tensor(seg, device=dev)
        per_req = torch.zeros(len(batch), device=dev, dtype=nll.dtype).index_add(0, seg_t, nll)
        counts = torch.bincount(seg_t, minlength=len(batch)).to(nll.dtype)
        return (per_req / counts).mean()

    # ---- training ------------------------------------------------------------------------------------------
    def seeded(self, fn: Callable[..., Any], *args, **kwargs):
        """Run ``fn`` under a forked RNG seeded with the editor's seed (LoRA's A init, adapter dropout, GeoEdit's
        auto-encoder); the global RNG state is untouched."""
        dev = self.lm.device
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(self.seed)
            return fn(*args, **kwargs)

    def fit(self, names: Sequence[str], examples: Sequence[Example], **options) -> Trained:
        """:func:`finetune` of ``names`` on ``examples`` under :meth:`seeded` (``options``: lora, start, box,
        importance_decay, importance_axis, num_steps, lr)."""
        return self.seeded(finetune, self, names, examples, **options)

    def delta_info(self, deltas: Mapping[str, torch.Tensor]) -> dict:
        """Per parameter: ``delta_norm``, ``delta_rel_norm`` (to the weight) and ``delta_max_abs``.

        Raises:
            EditError: a delta is not finite.
        """
        params = dict(self.model.named_parameters())
        for n, d in deltas.items():
            finite_or_raise(self.name, n, d)
        return {"delta_norm": {n: d.norm().item() for n, d in deltas.items()},
                "delta_rel_norm": {n: relative_norm(d, params[n].detach()) for n, d in deltas.items()},
                "delta_max_abs": {n: d.abs().max().item() for n, d in deltas.items()}}

    # ---- the edit ----------------------------------------------------------------------------------------------
    def edit(self, requests: Sequence[EditRequest]) -> EditResult:
        """Fine-tune on the new targets (inside ``config.box()`` when it is set) and return the change."""
        started, names = self.begin_edit(requests)
        eps = self.config.box()
        out = self.fit(names, [self.encode(r) for r in requests], box=eps)
        # the clamp already holds up to one rounding of W0 ± eps; make |delta| <= eps exact
        deltas = {n: (out.deltas[n].clamp(-eps, eps) if eps is not None else out.deltas[n]) for n in names}
        info = {**out.stats, **self.delta_info(deltas), "n_requests": len(requests)}
        curve = info.pop("loss_curve")
        result = self._result(deltas=deltas, info=info, artifacts={"loss_curve": curve}, started=started)
        log.info("%s: %d request(s), %d epoch(s), loss %.4g -> %.4g, |dW| %s in %.2fs", self.name, len(requests),
                 info["epochs"], info["loss_initial"], info["loss_final"],
                 ", ".join(f"{v:.3g}" for v in info["delta_norm"].values()), result.seconds)
        return result


__all__ = ["OBJECTIVES", "MODULES", "MODES", "FineTuneConfig", "AdapterConfig", "TwoTaskConfig", "LoraSettings",
           "Trained", "Example", "pad_examples", "right_pad", "finetune", "FineTuneEditor"]
