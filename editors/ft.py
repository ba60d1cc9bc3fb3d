"""Fine-tuning baselines: ``ft`` (FT-L / FT-M) and ``ft-c`` (L∞-constrained fine-tuning, "FT+L").

Both optimise one kind of weight matrix at a few layers with Adam on the edit prompts, then return the change
``delta = W_trained - W0`` and put ``W0`` back bit for bit (the model is trained in place, never left changed).

* ``ft``: the EasyEdit naming. FT-L (``objective="prompt_last"``) is the loss of kmeng01/rome
  ``baselines/ft/ft_main.py``: the log-softmax at the LAST prompt token, gathered at every target id (so a multi-token
  target is predicted in full from a single position; a quirk kept for comparability). FT-M
  (``objective="target_new"``, EasyEdit ``objective_optimization: target_new``) is teacher-forced cross-entropy on
  ``prompt + " " + target_new``, masked to the target tokens. An optional L∞ box (``norm_constraint``) is offered as
  in rome's and EasyEdit's FT hparams.
* ``ft-c``: constrained fine-tuning of Zhu et al. 2020 ("Modifying Memories in Transformer Models"), the "FT+L"
  baseline of the ROME paper: after every Adam step each edited weight is clamped elementwise into
  ``[W0 - epsilon, W0 + epsilon]``, so ``max |delta| <= epsilon`` always holds.

Loop (both methods, rome ``execute_ft``): ``num_steps`` epochs over the requests in chunks of ``batch_size``; a chunk
whose loss is already below ``early_stop_loss`` takes no step; the epoch loop stops once an epoch's mean loss is
below it. The model stays in eval mode (no dropout), so a run is deterministic on CPU for a given input; the editor's
``seed`` seeds a forked RNG around the edit (global RNG state is untouched).

Target tokens are ``tok(" " + target)`` without special tokens and the prompt is ``tok(prompt)``, encoded separately
and concatenated, exactly as ``analysis.evaluation.encode_pair`` scores them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from .base import EditError, Editor, EditorConfig, EditResult, finite_or_raise, relative_norm
from .registry import register
from .requests import EditRequest

log = logging.getLogger(__name__)

OBJECTIVES = ("target_new", "prompt_last")
MODULES = ("mlp_out", "mlp_in", "attn_out")


# ---------------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _FTCommon(EditorConfig):
    """Fields shared by ``ft`` and ``ft-c`` (not registered itself)."""

    layers: tuple[int, ...] = field(default=(20,), metadata={"help": (
        "Decoder layers whose weights are fine-tuned (0-based). Default 20 of SmolLM2-135M's 30 layers: layer 21 "
        "of 32 in the Llama FT hparams (EasyEdit llama-7b, AlphaEdit Llama3-8B), i.e. ~2/3 depth (guides "
        "METHODS.md section 13); with the other defaults it made 4 of 4 test counterfactuals succeed on SmolLM2. "
        "Other models need their own value (e.g. via a preset).")})
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
        if any(int(x) < 0 for x in self.layers):
            raise ValueError(f"layers must be non-negative, got {self.layers}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers has duplicates: {self.layers}")
        if self.module not in MODULES:
            raise ValueError(f"module must be one of {', '.join(MODULES)}, got {self.module!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.early_stop_loss < 0:
            raise ValueError(f"early_stop_loss must be >= 0, got {self.early_stop_loss}")

    def box(self) -> float | None:
        """Half-width of the elementwise box around W0, or None when unconstrained."""
        return None


@dataclass
class FTConfig(_FTCommon):
    """Config of ``ft``: plain fine-tuning of the chosen weights (FT-L or FT-M by ``objective``).

    Defaults follow EasyEdit hparams/FT/llama3.2-3b.yaml (25 steps, lr 5e-4, batch 1, no norm constraint) with the
    layer mapped to SmolLM2-135M. The objective defaults to FT-M ('target_new'), which trains every target token at
    its own position, i.e. what teacher-forced reliability scores; set 'prompt_last' for rome's FT-L. (For a
    single-token target the two objectives are the same loss.)
    """

    version: ClassVar[int] = 1

    norm_constraint: float | None = field(default=None, metadata={"help": (
        "Optional L∞ box: after every step clamp each trained weight into [W0 - c, W0 + c] (rome ft_main "
        "'norm_constraint'). None or 0 = off (EasyEdit Llama FT hparams: false). For the constrained baseline as a "
        "method of its own, use 'ft-c'.")})

    def validate(self) -> None:
        super().validate()
        if self.norm_constraint is not None and self.norm_constraint < 0:
            raise ValueError(f"norm_constraint must be >= 0 or None, got {self.norm_constraint}")

    def box(self) -> float | None:
        return float(self.norm_constraint) if self.norm_constraint else None


@dataclass
class FTCConfig(_FTCommon):
    """Config of ``ft-c``: fine-tuning inside an L∞ box around the original weights (Zhu et al. 2020, ROME's FT+L).

    rome hparams/FT/gpt2-xl_constr.json: layer 0, 25 steps, lr 5e-4, epsilon 5e-4 (lr = epsilon). Kept here: layer 0,
    25 steps, lr = epsilon. Changed: epsilon 2e-3, because 5e-4 is too tight on SmolLM2-135M: measured on four
    counterfactual edits (Eiffel Tower -> Rome, Danielle Darrieux -> English, Michael Jordan -> baseball,
    Louvre -> Buenos Aires), epsilon 5e-4 edited 1 of 4 at layer 0 and 0 of 4 at layer 20, epsilon 1e-3 at layer 0
    2 of 4, epsilon 2e-3 at layer 0 all 4 (teacher-forced reliability 1.0, "The capital of France is" still
    continued with Paris); ||delta||_F ~ 1.8 against ~4-9 for unconstrained ``ft``.
    Zhu et al. fine-tune with the ordinary LM loss on the new fact, which is the 'target_new' objective (the default
    here); rome's FT+L used 'prompt_last'.
    """

    version: ClassVar[int] = 1

    layers: tuple[int, ...] = field(default=(0,), metadata={"help": (
        "Decoder layers whose weights are fine-tuned (0-based). Layer 0 as rome's FT+L (hparams/FT/"
        "gpt2-xl_constr.json). On SmolLM2-135M layer 0 needs a smaller box than layer 20 for the same edit "
        "(epsilon 2e-3 there succeeded on 4 of 4 test edits; layer 20 needed 5e-3), at ~1.5-2x the time per step "
        "(the backward pass runs through every layer).")})
    lr: float = field(default=2e-3, metadata={"help": (
        "Adam learning rate. Equal to epsilon as in rome's gpt2-xl_constr (both 5e-4): Adam moves each entry by "
        "about lr per step, so entries reach the faces of the box in a step or two and the budget is used.")})
    epsilon: float = field(default=2e-3, metadata={"help": (
        "Half-width of the elementwise (L∞) box: after every Adam step W is clamped into [W0 - epsilon, "
        "W0 + epsilon] (Zhu et al. 2020; rome gpt2-xl_constr 5e-4, gpt-j 5e-5). 2e-3 on SmolLM2-135M: it gives "
        "the same Frobenius budget as rome's GPT-2 XL setting (epsilon * sqrt(#entries): 2e-3 * sqrt(1536*576) = "
        "1.9 vs 5e-4 * sqrt(6400*1600) = 1.6), ~1.3% of a typical |W| entry (0.15); 5e-4 and 1e-3 left most "
        "test edits unmade.")})

    def validate(self) -> None:
        super().validate()
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0 (the constraint is what makes this ft-c), got {self.epsilon}")

    def box(self) -> float | None:
        return float(self.epsilon)


# ---------------------------------------------------------------------------------------------------------------
# the shared training loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Example:
    """One request encoded for the loss: run ``input_ids``; score ``labels`` at ``positions`` (same length)."""

    input_ids: tuple[int, ...]
    positions: tuple[int, ...]
    labels: tuple[int, ...]


class _FineTuneEditor(Editor):
    """Fine-tuning on the live parameters, restored exactly afterwards. Subclasses only set name and config."""

    config_cls: ClassVar[type[EditorConfig]] = _FTCommon

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

    def _begin_edit(self, requests: Sequence[EditRequest]) -> tuple[float, list[str]]:
        """The common start of ``edit``: its start time (``time.perf_counter()``) and :meth:`trained_params`.

        Raises:
            EditError: there are no requests, or a layer / weight of the config does not exist.
        """
        started = time.perf_counter()
        if not requests:
            raise EditError(f"{self.name}: no requests to edit")
        return started, self.trained_params()

    # ---- encoding and loss -------------------------------------------------------------------------------------
    def _encode(self, req: EditRequest) -> _Example:
        tok = self.tok
        prompt = list(tok(req.prompt, add_special_tokens=True)["input_ids"])
        target = list(tok(" " + req.target_new.strip(), add_special_tokens=False)["input_ids"])
        if not prompt or not target:
            raise EditError(f"{self.name}: request {req.case_id!r} has an empty prompt or target after tokenising")
        lp, lt = len(prompt), len(target)
        if self.config.objective == "target_new":
            # teacher forcing: the token at position lp-1+j predicts target[j]; the last target token is no input
            return _Example(tuple(prompt + target[:-1]), tuple(lp - 1 + j for j in range(lt)), tuple(target))
        # prompt_last: every target token is scored at the last prompt position
        return _Example(tuple(prompt), (lp - 1,) * lt, tuple(target))

    def _loss(self, batch: Sequence[_Example]) -> torch.Tensor:
        """Mean over the batch of each request's mean negative log-likelihood of its target tokens."""
        tok = self.tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows, cols, labels, seg = [], [], [], []
        for r, e in enumerate(batch):  # right padding: positions stay valid
            ids[r, :len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[r, :len(e.input_ids)] = 1
            rows.extend([r] * len(e.positions))
            cols.extend(e.positions)
            labels.extend(e.labels)
            seg.extend([r] * len(e.labels))
        dev = self.lm.device
        h = self.model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
        # unembed only where the loss looks (the unembedding is the largest matmul of a small model)
        logits = self.model.get_output_embeddings()(h[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)])
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(1, torch.tensor(labels, device=dev)[:, None]).squeeze(1)  # [n_tokens]
        seg_t = torch.tensor(seg, device=dev)
        per_req = torch.zeros(len(batch), device=dev, dtype=nll.dtype).index_add(0, seg_t, nll)
        counts = torch.bincount(seg_t, minlength=len(batch)).to(nll.dtype)
        return (per_req / counts).mean()

    # ---- the edit ----------------------------------------------------------------------------------------------
    def edit(self, requests: Sequence[EditRequest]) -> EditResult:
        started, names = self._begin_edit(requests)
        cfg = self.config
        examples = [self._encode(r) for r in requests]
        eps = cfg.box()
        dev = self.lm.device
        fork_devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(self.seed)
            trained, stats = self._train(names, examples, eps)
        params = dict(self.model.named_parameters())
        deltas: dict[str, torch.Tensor] = {}
        delta_norm, delta_rel, delta_max = {}, {}, {}
        for n in names:
            d = trained[n]
            if eps is not None:
                # the clamp already holds up to one rounding of W0 ± eps; make |delta| <= eps exact
                d = d.clamp(-eps, eps)
            finite_or_raise(self.name, n, d)
            deltas[n] = d
            delta_norm[n] = d.norm().item()
            delta_rel[n] = relative_norm(d, params[n].detach())
            delta_max[n] = d.abs().max().item()
        info = {**stats, "delta_norm": delta_norm, "delta_rel_norm": delta_rel, "delta_max_abs": delta_max,
                "n_requests": len(requests)}
        curve = info.pop("loss_curve")
        result = self._result(deltas=deltas, info=info, artifacts={"loss_curve": curve}, started=started)
        log.info("%s: %d request(s), %d epoch(s), loss %.4g -> %.4g, |dW| %s in %.2fs", self.name, len(requests),
                 stats["epochs"], stats["loss_initial"], stats["loss_final"],
                 ", ".join(f"{v:.3g}" for v in delta_norm.values()), result.seconds)
        return result

    def _train(self, names: list[str], examples: list[_Example], eps: float | None
               ) -> tuple[dict[str, torch.Tensor], dict]:
        """Adam on the live parameters ``names``; returns (W_trained - W0 per name, stats). Restores everything."""
        cfg = self.config
        model = self.model
        params = dict(model.named_parameters())
        targets = {n: params[n] for n in names}
        W0 = {n: p.detach().clone() for n, p in targets.items()}
        flags = {n: p.requires_grad for n, p in params.items()}
        grads = {n: p.grad for n, p in targets.items()}
        was_training = model.training
        batches = [examples[i:i + cfg.batch_size] for i in range(0, len(examples), cfg.batch_size)]
        curve: list[float] = []
        opt_steps = 0
        stopped_early = False
        try:
            for p in params.values():
                p.requires_grad_(False)
            for p in targets.values():
                p.requires_grad_(True)
                p.grad = None
            model.eval()
            with torch.no_grad():
                initial = sum(self._loss(b).item() * len(b) for b in batches) / len(examples)
            opt = torch.optim.Adam(list(targets.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
            with torch.enable_grad():
                for _epoch in range(cfg.num_steps):
                    total = 0.0
                    for batch in batches:
                        opt.zero_grad(set_to_none=True)
                        loss = self._loss(batch)
                        value = loss.item()
                        if value != value or value in (float("inf"), float("-inf")):
                            raise EditError(f"{self.name}: the loss became NaN/Inf during fine-tuning")
                        total += value * len(batch)
                        if value >= cfg.early_stop_loss:
                            loss.backward()
                            opt.step()
                            opt_steps += 1
                        if eps is not None:
                            with torch.no_grad():
                                for n, p in targets.items():
                                    p.copy_(torch.clamp(p, min=W0[n] - eps, max=W0[n] + eps))
                    curve.append(total / len(examples))
                    if curve[-1] < cfg.early_stop_loss:
                        stopped_early = True
                        break
            with torch.no_grad():
                final = sum(self._loss(b).item() * len(b) for b in batches) / len(examples)
                trained = {n: p.detach() - W0[n] for n, p in targets.items()}
        finally:
            with torch.no_grad():
                for n, p in targets.items():
                    p.copy_(W0[n])
                    p.grad = grads[n]
            for n, p in params.items():
                p.requires_grad_(flags[n])
            model.train(was_training)
        stats = {"loss_initial": initial, "loss_final": final, "epochs": len(curve), "opt_steps": opt_steps,
                 "stopped_early": stopped_early, "loss_curve": curve}
        return trained, stats


@register
class FTEditor(_FineTuneEditor):
    """Plain fine-tuning: FT-L (rome's last-prompt-token loss) or FT-M (teacher-forced target loss)."""

    name: ClassVar[str] = "ft"
    config_cls: ClassVar[type[EditorConfig]] = FTConfig
    summary: ClassVar[str] = "Fine-tuning of one weight per layer (FT-L / FT-M by 'objective'); Adam, 25 epochs"


@register
class FTCEditor(_FineTuneEditor):
    """Constrained fine-tuning (Zhu et al. 2020; ROME's FT+L): W stays in an L∞ box of half-width epsilon."""

    name: ClassVar[str] = "ft-c"
    config_cls: ClassVar[type[EditorConfig]] = FTCConfig
    summary: ClassVar[str] = "L∞-constrained fine-tuning (Zhu et al. 2020, FT+L): W clamped into W0 ± epsilon"
