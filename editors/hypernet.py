"""The MALMEN hypernetwork and what MALMEN and AGRADE share (METHODS.md section 11; Tan et al. 2024; Gu et al. 2025).

Pieces, named after the papers:

* :func:`cache_keys_and_value_grads` -- per edited module, the keys ``H`` / ``K`` (input of the MLP output
  projection, ``[T, d_in]``) and value gradients ``∇G`` (gradient of the summed target cross-entropy with respect to
  the module's output, ``[T, d_out]``) at the answer tokens (MALMEN ``token="ans"``: the positions whose logits
  predict a target token). The model's weights are never touched; gradients flow through a zero leaf added to each
  module's output, so parameters that do not require grad are fine.
* :class:`RunningMeanStd` -- running mean / variance of the ``[k; ∇v]`` pairs (Chan's parallel update), the
  normalisation of MALMEN's ``nets.py``.
* :class:`HyperNet` -- ``n_blocks`` low-rank residual MLP blocks ``x <- x + scale_m ⊙ relu(x A B + b) + shift_m``
  (A ``[size, rank]`` random, B ``[rank, size]`` zeros, so an untrained net is the identity on the normalised input),
  per-module scale/shift embeddings, and the learned per-module learning rate ``lr_m`` and ``λ_m``.
  One net is shared by all edited modules (they have one weight shape).
* checkpoints: ``cache_root()/hypernets/<model_hash>/<method>-<config hash>/`` holding ``hypernet.safetensors``,
  ``config.json`` (config, steps done, data source, validation history) and ``optimizer.pt`` (resumption).
* :class:`HypernetConfig` -- the fields both methods share.

Default rank: MALMEN uses 1920 for d_in + d_out = 2112 (GPT-J/Llama sizes are larger); on a CPU a 2112 x 1920 x 2
net is 16M parameters and dominates a meta step, so the default here is 256 (2 x 2 x 2112 x 256 = 2.2M parameters).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import EditError, Editor, EditorConfig, add_update_, math_dtype
from .cache import cache_root
from .fields import check_indices, check_range
from .finetune import right_pad
from .hooks import output_grad_leaves
from .models import LoadedModel
from .requests import EditRequest

log = logging.getLogger(__name__)

#: the training-data source the EditError suggests
DEFAULT_TRAIN_DATA = "counterfact:../shared/data/counterfact/counterfact-train.json"
#: config fields that only change how an edit is reported, not what is trained (left out of the checkpoint key)
NOT_HASHED = frozenset({"allow_untrained", "artifact_matrices"})
#: fields added after checkpoints existed: part of the key only when set to a non-default value, so the checkpoints
#: trained before they existed (which behave as the default) are still found
HASHED_WHEN_SET = frozenset({"projection_reference"})
_FORMAT_VERSION = 1


# =================================================================================================================
# config
# =================================================================================================================
@dataclass
class HypernetConfig(EditorConfig):
    """Fields shared by ``malmen`` and ``agrade`` (not registered itself)."""

    layers: tuple[int, ...] = field(default=(), metadata={"help": (
        "Decoder layers whose MLP output projection is edited (0-based). Empty = the last 6 layers (MALMEN "
        "config/model/*.yaml and AGRADE appendix C: 'the second FFN matrix of the last six Transformer layers'; "
        "SmolLM2-135M: 24-29).")})
    rank: int = field(default=256, metadata={"help": (
        "Rank of each low-rank block (MALMEN: 1920 for d_in + d_out = 2112). 256 keeps a CPU meta step cheap "
        "(2.2M hypernetwork parameters instead of 16M).")})
    n_blocks: int = field(default=2, metadata={"help": (
        "Residual low-rank MLP blocks (MALMEN n_blocks 2; AGRADE appendix C: 2 MLP blocks).")})
    lr_init: float = field(default=1e-6, metadata={"help": (
        "Initial value of the learned per-module learning rate η / lr_m in c = -η <k, k̃> (MALMEN editor lr 1e-6; "
        "AGRADE Eq. 1).")})
    lambda_init: float = field(default=0.0, metadata={"help": (
        "Initial value of the learned per-module log-regulariser λ in (KᵀK + e^λ I) (MALMEN: 0; AGRADE Eq. 3).")})
    meta_lr: float = field(default=1e-5, metadata={"help": (
        "Adam learning rate of the hypernetwork (MALMEN meta_lr 1e-5; AGRADE appendix C: 1e-6..2e-5). "
        "Short CPU runs may need a larger value.")})
    loc_coef: float = field(default=1.0, metadata={"help": (
        "Weight of the unrelated-prompt KL term L_unrel (MALMEN loc_coef 1; AGRADE L_hyper sums the terms).")})
    max_grad_norm: float = field(default=1.0, metadata={"help": (
        "Gradient-norm clip of each meta step (MALMEN max_grad_norm 1).")})
    n_edits: int = field(default=8, metadata={"help": (
        "Training records per meta step (MALMEN: 512 on zsRE; small here for a CPU).")})
    allow_untrained: bool = field(default=False, metadata={"help": (
        "Edit with a freshly initialised hypernetwork when no trained checkpoint exists instead of raising. For "
        "the contract tests and the untrained baseline only; not part of the checkpoint key.")})

    def validate(self) -> None:
        check_indices("layers", self.layers)
        for name in ("rank", "n_edits"):
            check_range(name, getattr(self, name), 1)
        for name in ("n_blocks", "loc_coef"):
            check_range(name, getattr(self, name), 0)
        for name in ("lr_init", "meta_lr", "max_grad_norm"):
            check_range(name, getattr(self, name), 0, lo_open=True)


def edit_layers(cfg: HypernetConfig, lm: LoadedModel) -> list[int]:
    """The configured layers, or the last ``min(6, n_layers)``; raises EditError when one does not exist."""
    n = lm.spec.n_layers
    layers = [int(x) for x in cfg.layers] if cfg.layers else list(range(max(0, n - 6), n))
    bad = [x for x in layers if x >= n]
    if bad:
        raise EditError(f"layers {bad} do not exist in a {n}-layer model")
    return layers


def config_key(method: str, cfg: HypernetConfig) -> str:
    """``<method>-<12 hex>``: the checkpoint folder name (every field except :data:`NOT_HASHED`)."""
    defaults = type(cfg)().to_dict()
    d = {k: v for k, v in cfg.to_dict().items()
         if k not in NOT_HASHED and not (k in HASHED_WHEN_SET and v == defaults.get(k))}
    src = json.dumps({"v": _FORMAT_VERSION, "version": type(cfg).version, "config": d}, sort_keys=True, default=list)
    return f"{method}-{hashlib.sha256(src.encode()).hexdigest()[:12]}"


def checkpoint_dir(lm: LoadedModel, method: str, cfg: HypernetConfig, root: str | None = None) -> str:
    return os.path.join(cache_root(root), "hypernets", lm.model_hash or "unhashed", config_key(method, cfg))


def train_command(method: str, cfg: HypernetConfig, lm: LoadedModel) -> str:
    """The exact CLI command that trains the hypernetwork this config needs."""
    defaults = type(cfg)().to_dict()
    sets = []
    for k, v in cfg.to_dict().items():
        if k in NOT_HASHED or v == defaults[k]:
            continue
        v = ",".join(str(x) for x in v) if isinstance(v, (tuple, list)) else v
        sets.append(f" --set {k}={v}")
    return (f"python -m app train --method {method} --data {DEFAULT_TRAIN_DATA} --model {lm.name}"
            + "".join(sets))


# =================================================================================================================
# the network
# =================================================================================================================
class RunningMeanStd(nn.Module):
    """Running mean / variance over rows (Chan et al. parallel update). Before any update: mean 0, std 1."""

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.ones(size))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        b_mean, b_var = x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta.pow(2) * self.count * n / total
        self.mean.add_(delta * n / total)
        self.var.copy_(m2 / total)
        self.count.fill_(float(total))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.var.sqrt() + 1e-8)


class HyperBlock(nn.Module):
    """``x + scale_m ⊙ relu(x A B + b) + shift_m`` with A ``[size, rank]``, B ``[rank, size]`` (zeros at init)."""

    def __init__(self, size: int, rank: int, n_modules: int, gen: torch.Generator):
        super().__init__()
        self.A = nn.Parameter(torch.randn(size, rank, generator=gen) / size ** 0.5)
        self.B = nn.Parameter(torch.zeros(rank, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Parameter(torch.ones(n_modules, size))
        self.shift = nn.Parameter(torch.zeros(n_modules, size))

    def forward(self, x: torch.Tensor, m: int) -> torch.Tensor:
        return x + self.scale[m] * F.relu(x @ self.A @ self.B + self.bias) + self.shift[m]


class HyperNet(nn.Module):
    """Maps ``(K [T, d_in], ∇V [T, d_out])`` of module ``m`` to ``(K̃, ∇Ṽ)`` (AGRADE: ``H̃, ∇G̃``).

    Also holds the learned per-module ``lr`` (η, Eq. 1) and ``lamda`` (λ, Eq. 3).
    """

    def __init__(self, d_in: int, d_out: int, n_modules: int, cfg: HypernetConfig, seed: int = 0):
        super().__init__()
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        self.d_in, self.d_out = d_in, d_out
        self.norm = RunningMeanStd(d_in + d_out)
        self.blocks = nn.ModuleList(HyperBlock(d_in + d_out, cfg.rank, n_modules, gen) for _ in range(cfg.n_blocks))
        self.lr = nn.Parameter(torch.full((n_modules,), float(cfg.lr_init)))
        self.lamda = nn.Parameter(torch.full((n_modules,), float(cfg.lambda_init)))

    def forward(self, K: torch.Tensor, grad: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(torch.cat([K, grad], dim=-1))
        for block in self.blocks:
            x = block(x, m)
        return x[:, :self.d_in], x[:, self.d_in:]


# =================================================================================================================
# keys and value gradients at the answer tokens
# =================================================================================================================
@dataclass
class Encoded:
    """Right-padded ``prompt + " " + target`` batch; ``pos[i]`` / ``labels[i]``: answer positions and their ids."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor  # [T] batch row of each answer token
    cols: torch.Tensor  # [T] position whose logits predict it
    labels: torch.Tensor  # [T] the predicted id


def encode(tok, prompts: Sequence[str], targets: Sequence[str], device) -> Encoded:
    """Prompt and ``" " + target`` encoded separately and concatenated (as ``analysis.evaluation.encode_pair``)."""
    seqs, rows, cols, labels = [], [], [], []
    for i, (p, t) in enumerate(zip(prompts, targets)):
        p_ids = tok(p, add_special_tokens=True)["input_ids"]
        t_ids = tok(" " + t.strip(), add_special_tokens=False)["input_ids"]
        seqs.append(p_ids + t_ids)
        for j, tid in enumerate(t_ids):
            rows.append(i)
            cols.append(len(p_ids) - 1 + j)
            labels.append(tid)
    ids, mask = right_pad(tok, seqs, device)
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return Encoded(ids, mask, t(rows), t(cols), t(labels))


def answer_logits(model: nn.Module, enc: Encoded) -> torch.Tensor:
    """``[T, vocab]`` logits at the answer positions."""
    out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False)
    return out.logits[enc.rows, enc.cols].float()


def cache_keys_and_value_grads(lm: LoadedModel, modules: Sequence[str], requests: Sequence[EditRequest]
                               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """Keys ``K[name] [T, d_in]`` and value grads ``∇V[name] [T, d_out]`` at the answer tokens, and the CE.

    The loss is the SUM of the target tokens' cross-entropies (each token's gradient does not depend on the batch).
    Gradients are taken with respect to zero leaves added to the modules' outputs, so no weight is touched.
    """
    enc = encode(lm.tokenizer, [r.prompt for r in requests], [r.target_new for r in requests], lm.device)
    with output_grad_leaves(lm.model, modules) as (tr, leaves):
        logits = answer_logits(lm.model, enc)
        loss = F.cross_entropy(logits, enc.labels, reduction="sum")
        grads = torch.autograd.grad(loss, [leaves[n] for n in modules])
    K = {n: tr.inputs[n][enc.rows, enc.cols].float() for n in modules}
    G = {n: g[enc.rows, enc.cols].float() for n, g in zip(modules, grads)}
    return K, G, float(loss.detach())


# =================================================================================================================
# checkpoints
# =================================================================================================================
def save_checkpoint(path: str, net: HyperNet, meta: dict[str, Any], optimizer: torch.optim.Optimizer | None = None
                    ) -> None:
    """Write weights (safetensors), optimizer state and ``config.json`` atomically (config last: it marks done)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f"hypernet.safetensors.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, tmp)
    os.replace(tmp, os.path.join(path, "hypernet.safetensors"))
    if optimizer is not None:
        tmp = os.path.join(path, f"optimizer.pt.{os.getpid()}.tmp")
        torch.save(optimizer.state_dict(), tmp)
        os.replace(tmp, os.path.join(path, "optimizer.pt"))
    tmp = os.path.join(path, f"config.json.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1, default=list)
    os.replace(tmp, os.path.join(path, "config.json"))


def load_checkpoint(path: str, net: HyperNet, optimizer: torch.optim.Optimizer | None = None) -> dict | None:
    """Load into ``net`` (and ``optimizer``) and return the JSON metadata, or None when there is no checkpoint."""
    from safetensors.torch import load_file
    meta_path, w_path = os.path.join(path, "config.json"), os.path.join(path, "hypernet.safetensors")
    if not (os.path.exists(meta_path) and os.path.exists(w_path)):
        return None
    with open(meta_path, encoding="utf-8") as fh:
        meta = json.load(fh)
    state = load_file(w_path)
    net.load_state_dict({k: v.to(next(net.parameters()).device) for k, v in state.items()})
    opt_path = os.path.join(path, "optimizer.pt")
    if optimizer is not None and os.path.exists(opt_path):
        optimizer.load_state_dict(torch.load(opt_path, map_location="cpu", weights_only=True))
    return meta


def build_hypernet(lm: LoadedModel, method: str, cfg: HypernetConfig, *, seed: int = 0,
                   cache_dir: str | None = None, require_trained: bool = True
                   ) -> tuple[HyperNet, list[int], list[str], dict | None]:
    """``(net, layers, module names, checkpoint metadata or None)``; loads a trained checkpoint when one exists.

    Raises:
        EditError: no checkpoint and ``require_trained`` without ``cfg.allow_untrained`` (names the train command).
    """
    layers = edit_layers(cfg, lm)
    modules = [lm.spec.mlp_out_module(i) for i in layers]
    W = lm.spec.to_canonical(dict(lm.model.named_parameters())[lm.spec.mlp_out_weight(layers[0])])
    d_out, d_in = W.shape
    net = HyperNet(d_in, d_out, len(layers), cfg, seed=seed).to(lm.device)
    path = checkpoint_dir(lm, method, cfg, cache_dir)
    meta = load_checkpoint(path, net)
    if meta is None and require_trained and not cfg.allow_untrained:
        raise EditError(
            f"{method}: no trained hypernetwork for model {lm.name} (hash {lm.model_hash}) and this config "
            f"(looked in {path}). Train one first: {train_command(method, cfg, lm)}   "
            f"(or set allow_untrained=true to edit with an untrained one)")
    return net, layers, modules, meta


def edited_weights(lm: LoadedModel, layers: Sequence[int]) -> list[str]:
    return [lm.spec.mlp_out_weight(i) for i in layers]


__all__ = ["HypernetConfig", "HyperNet", "RunningMeanStd", "HyperBlock", "cache_keys_and_value_grads", "encode",
           "answer_logits", "build_hypernet", "checkpoint_dir", "config_key", "train_command", "save_checkpoint",
           "load_checkpoint", "edit_layers", "edited_weights", "DEFAULT_TRAIN_DATA",
           "HypernetEditor", "solve_shift", "regularised_solve_op"]


# =================================================================================================================
# solves
# =================================================================================================================
def solve_shift(K: torch.Tensor, D: torch.Tensor, lam: torch.Tensor | float | None) -> torch.Tensor:
    """``Δ = (KᵀK + e^λ I)⁻¹ Kᵀ D`` ``[d_in, d_out]`` (MALMEN normal equation; AGRADE Eq. 5 with ``M`` of Eq. 3).

    Computed in float64 through the push-through identity ``(KᵀK + aI)⁻¹Kᵀ = Kᵀ(KKᵀ + aI)⁻¹`` (a ``[T, T]`` solve,
    T = answer tokens ≪ d_in); differentiable in ``D`` and ``λ``. ``lam=None``: no regulariser, the minimum-norm
    least-squares solution ``K⁺ D`` (AGRADE ablation "without regularisation").
    """
    Kd, Dd = K.double(), D.double()
    if lam is None:
        return (torch.linalg.pinv(Kd) @ Dd).to(D.dtype)
    a = torch.exp(torch.as_tensor(lam, dtype=torch.float64, device=K.device))
    T = Kd.shape[0]
    A = Kd @ Kd.T + a * torch.eye(T, dtype=torch.float64, device=K.device)
    return (Kd.T @ torch.linalg.solve(A, Dd)).to(D.dtype)


def regularised_solve_op(K: torch.Tensor, X: torch.Tensor, lam: torch.Tensor | float | None) -> torch.Tensor:
    """``K (KᵀK + e^λ I)⁻¹ X`` ``[T, d_out]`` for ``X [d_in, d_out]`` (AGRADE Eq. 6 with X = g_θᵀ ... in our
    ``[d_in, d_out]`` layout; equals MALMEN's ∂L/∂D = K M). ``lam=None``: ``K (KᵀK)⁺ X``."""
    Kd, Xd = K.double(), X.double()
    if lam is None:
        return (Kd @ torch.linalg.pinv(Kd.T @ Kd) @ Xd).to(X.dtype)
    a = torch.exp(torch.as_tensor(lam, dtype=torch.float64, device=K.device))
    T = Kd.shape[0]
    A = Kd @ Kd.T + a * torch.eye(T, dtype=torch.float64, device=K.device)
    return torch.linalg.solve(A, Kd @ Xd).to(X.dtype)


# =================================================================================================================
# the shared editor and meta-training step
# =================================================================================================================
@dataclass
class Prediction:
    """One batch's forward pass: per module keys ``K``, value shifts / scaled gradients ``D`` and the deltas."""

    K: list[torch.Tensor]
    D: list[torch.Tensor]
    deltas: list[torch.Tensor]  # [d_in, d_out]
    extras: dict[str, Any]


class HypernetEditor(Editor):
    """The editor base of MALMEN and AGRADE; subclasses implement :meth:`predict` and :meth:`hyper_loss`."""

    def _net(self, require_trained: bool = True):
        return build_hypernet(self.lm, self.name, self.config, seed=self.seed, cache_dir=self.cache_dir,
                              require_trained=require_trained)

    def checkpoint_meta(self) -> dict | None:
        """The metadata of the trained checkpoint this editor edits with, or None when its net is untrained."""
        return self._net(require_trained=False)[3]

    # ---- to implement --------------------------------------------------------------------------------------
    def predict(self, net: HyperNet, K: list[torch.Tensor], grads: list[torch.Tensor]) -> Prediction:
        raise NotImplementedError

    def hyper_loss(self, net: HyperNet, pred: Prediction, g_theta: list[torch.Tensor]) -> torch.Tensor:
        """A scalar whose gradient in the hypernetwork is the meta-gradient, given ``∂L/∂W`` ``[d_in, d_out]``."""
        raise NotImplementedError

    # ---- editing ------------------------------------------------------------------------------------------
    def edit(self, requests: Sequence[EditRequest]):
        started = time.perf_counter()
        net, layers, modules, meta = self._net()
        net.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            Kd, Gd, loss = cache_keys_and_value_grads(self.lm, modules, requests)
            with torch.no_grad():
                pred = self.predict(net, [Kd[m] for m in modules], [Gd[m] for m in modules])
        deltas = {}
        info: dict[str, Any] = {"n_requests": len(requests), "n_tokens": int(pred.K[0].shape[0]),
                                "loss_initial": loss, "trained": meta is not None,
                                "trained_steps": int(meta["step"]) if meta else 0, "layers": list(layers)}
        params = dict(self.model.named_parameters())
        for layer, name, d in zip(layers, edited_weights(self.lm, layers), pred.deltas):
            if not torch.isfinite(d).all():
                raise EditError(f"{self.name}: the update of {name} is not finite")
            W = params[name]
            deltas[name] = (self.spec.to_param_layout(d.T.contiguous()).to(math_dtype(W.dtype)).detach().cpu()
                            .clone())  # fp32; rounded to a half-precision weight once, when applied
            info[f"delta_norm_{layer}"] = float(d.norm())
        return self._result(deltas=deltas, info=info, artifacts=pred.extras, started=started)

    # ---- training -----------------------------------------------------------------------------------------
    def train_step(self, net: HyperNet, requests: Sequence[EditRequest], layers: Sequence[int],
                   modules: Sequence[str], update_norm: bool = True) -> tuple[torch.Tensor, dict]:
        """Forward one meta step: returns ``(hyper_loss, stats)``; the caller backprops and steps the optimiser.

        1. cache keys / value grads of the edit tuples (CE on ``prompt + target_new``); update the normaliser;
        2. predict ``Δ`` through the hypernetwork (graph kept);
        3. apply ``Δ`` (detached) to the weights, compute ``L_equiv`` (CE of ``target_new`` after the rephrases, or
           the prompt when a request has none) + ``loc_coef · L_unrel`` (KL(ref ‖ edited) at the unrelated prompts'
           answer tokens) and its gradient ``g_θ`` in every edited weight; restore the weights bit for bit;
        4. the method's :meth:`hyper_loss` turns ``g_θ`` into a loss over the hypernetwork's outputs.
        """
        lm = self.lm
        Kd, Gd, edit_ce = cache_keys_and_value_grads(lm, modules, requests)
        if update_norm:
            for m in modules:
                net.norm.update(torch.cat([Kd[m], Gd[m]], dim=-1))
        pred = self.predict(net, [Kd[m] for m in modules], [Gd[m] for m in modules])

        eq_p, eq_t, loc_p, loc_t = [], [], [], []
        for r in requests:
            for p in (r.rephrase_prompts or (r.prompt,)):
                eq_p.append(p)
                eq_t.append(r.target_new)
            for p, a in zip(r.locality_prompts, r.locality_answers):
                loc_p.append(p)
                loc_t.append(a)
        eq_enc = encode(lm.tokenizer, eq_p, eq_t, lm.device)
        loc_enc = encode(lm.tokenizer, loc_p, loc_t, lm.device) if loc_p else None
        model = lm.model
        was_training = model.training
        model.eval()
        params = dict(model.named_parameters())
        names = edited_weights(lm, layers)
        saved = {n: params[n].detach().clone() for n in names}
        flags = {n: params[n].requires_grad for n in names}
        try:
            ref = None
            if loc_enc is not None:
                with torch.no_grad():
                    ref = torch.log_softmax(answer_logits(model, loc_enc), -1)
            with torch.no_grad():
                for n, d in zip(names, pred.deltas):
                    add_update_(params[n], self.spec.to_param_layout(d.detach().T.contiguous()))
            for n in names:
                params[n].requires_grad_(True)
            with torch.enable_grad():
                logits = answer_logits(model, eq_enc)
                l_equiv = F.cross_entropy(logits, eq_enc.labels)
                l_unrel = torch.zeros((), device=lm.device)
                if loc_enc is not None:
                    logp = torch.log_softmax(answer_logits(model, loc_enc), -1)
                    l_unrel = F.kl_div(logp, ref, log_target=True, reduction="batchmean")
                total = l_equiv + self.config.loc_coef * l_unrel
                grads = torch.autograd.grad(total, [params[n] for n in names])
        finally:
            with torch.no_grad():
                for n in names:
                    params[n].copy_(saved[n])
                    params[n].requires_grad_(flags[n])
            model.train(was_training)
        g_theta = [self.spec.to_canonical(g).T.contiguous().float() for g in grads]  # [d_in, d_out]
        loss = self.hyper_loss(net, pred, g_theta)
        stats = {"loss": float(total.detach()), "l_equiv": float(l_equiv.detach()),
                 "l_unrel": float(l_unrel.detach()), "edit_ce": edit_ce / max(1, int(pred.K[0].shape[0]))}
        return loss, stats
