"""GeoEdit: geometric knowledge editing (Feng et al., arXiv 2502.19953; the spec is geoedit.txt section 4).

Steps (all on the chosen weight matrices; default the MLP output projection of the configured layers):

1. Task vectors (Eq. 4-6): τ_old = FT(θ0; D_old) − θ0 (prompt -> target_true) and τ_new = FT(θ0; D_new) − θ0
   (prompt -> target_new), two SEPARATE fine-tunings from θ0 (full fine-tuning or a peft LoRA adapter, ``mode``),
   with the loop and loss of the fine-tuning family (:func:`editors.finetune.finetune`).
2. Neurons (``neuron_axis``): the paper's θ_i ∈ R^{d_n} with d_n = 4096 on LLaMA-7B = d_model, i.e. one FFN
   (inner) neuron with its residual-stream-facing weights. Default 'auto': a COLUMN of an output projection
   (canonical ``[d_out, d_in]``; module 'mlp_out' / 'attn_out': the weights of one intermediate unit into the residual
   stream, d_n = d_out) and a ROW of an input projection ('mlp_in': that unit's weights from the residual stream,
   d_n = d_in); on SmolLM2-135M's down_proj ([576, 1536]) 1536 neurons with d_n = 576. Rows of down_proj (the
   workbench's earlier choice) are the wrong unit: ∂L/∂W = Σ_t δ_t k_tᵀ, so every row of τ_old and τ_new is a
   combination of the SAME keys k_t (same prompts) and old and new rows come out nearly parallel or anti-parallel
   (measured raw angles: mean 85°, std 19°, only 19% in 85-95°); columns combine the output-gradient directions δ_t,
   which differ between old and new targets (std 4.6°, 46% in 85-95°, see ``scripts/geoedit_angles.py``).
3. Importance (Eq. 12-13): during each fine-tuning, per neuron the mean over its trainable parameters of
   |w · ∂L/∂w| (LoRA: a row neuron's row of B, a column neuron's column of A), smoothed over steps by an
   exponential moving average; the scores of all neurons are min-max normalised to [0, 1] per task -> α (old),
   β (new).
4. Auto-encoder (Eq. 7-9): encoder d_n -> hidden -> latent and a mirrored decoder, 2-layer MLPs (ReLU between, no
   biases, see ``GeoEditConfig.latent_dim``), trained on the neuron vectors of τ_old and τ_new of every edited
   matrix with L_AE = MSE(τ, τ̂) + λ·KL(f_{θ0+τ}(x) ‖ f_{θ0+τ̂}(x)) (λ = 0.5), the KL on the task's own prompts at
   the answer positions, every ``ae_kl_every`` steps.
5. Angles (Eq. 10) between h_old = Enc(τ_old^i) and h_new = Enc(τ_new^i); classes (Eq. 11): aligned φ < φ1 (85°),
   orthogonal φ1 <= φ <= φ2 (95°), conflicting φ > φ2. Fusion (Eq. 11): aligned α h_old + β h_new (synergistic),
   orthogonal 0 (no update), conflicting −α h_old + β h_new (forget-then-learn). τ_edit = Dec(h_edit) and
   θ_e = θ0 + τ_edit; the delta is τ_edit in the parameter's layout.

Ablations (Table 2): ``synergistic`` / ``orthogonal`` / ``conflicting`` = False replaces that class's rule by plain
fine-tuning on the new facts, h_edit = h_new; ``fusion="fixed"`` is "+MW" (α = 0.3, β = 1 for every neuron).

Artifacts (numpy, one entry per neuron of every edited matrix, matrices in ``param_names`` order; ``neuron_axis``
says whether neuron k of a matrix is its canonical row k ('out') or column k ('in')): ``raw_angle``
(between τ_old^i and τ_new^i in parameter space), ``latent_angle``, ``neuron_class`` (0 aligned, 1 orthogonal,
2 conflicting, as accepted by ``analysis.angles.neuron_angle_frame``), ``tau_old_norm``, ``tau_new_norm``,
``alpha``, ``beta``, ``param_index`` and ``neuron``; plus the AE loss curve.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .base import EditError, EditorConfig, EditResult
from .finetune import Example, FineTuneEditor, TwoTaskConfig, pad_examples
from .registry import register
from .requests import EditRequest

log = logging.getLogger(__name__)

FUSIONS = ("importance", "fixed")
NEURON_AXES = ("auto", "in", "out")
ALIGNED, ORTHOGONAL, CONFLICTING = 0, 1, 2


@dataclass
class GeoEditConfig(TwoTaskConfig):
    """Config of ``geoedit``.

    Fine-tuning defaults as ``ft`` (FT-M of SmolLM2-135M's MLP output projection) but at layer 24, batches of 4 at
    lr 2e-3 for at most 20 epochs (see ``lr``); paper values for everything GeoEdit adds (λ 0.5, φ 85°/95°, EMA
    importance, MLP auto-encoder, the FFN neuron as the unit: ``neuron_axis``), the AE sizes scaled to d_n by the
    paper's ratios (see ``latent_dim``). Version 2: neurons are FFN neurons (columns of down_proj), not rows.
    Version 3: layer 24 and the '+MW' fixed-weight fusion by default (see ``layers`` and ``fusion``; the importance
    fusion is an option).
    """

    version: ClassVar[int] = 3

    layers: tuple[int, ...] = field(default=(24,), metadata={"help": (
        "Decoder layers whose weights are fine-tuned (0-based). Default 24 of SmolLM2-135M's 30 (version 3): there "
        "the new-fact task vector leaves unrelated facts alone and the raw FFN-neuron angles concentrate near 90° "
        "as in the paper's Fig. 3 (docs/DEFAULTS.md).")})
    neuron_axis: str = field(default="auto", metadata={"help": (
        "What one neuron θ_i ∈ R^{d_n} of Eq. 10-12 is, in the canonical [d_out, d_in] matrix: 'in' = a COLUMN "
        "(one input unit with all its outgoing weights, d_n = d_out), 'out' = a ROW (one output unit with its "
        "incoming weights, d_n = d_in). 'auto' (default) = the FFN / inner neuron, as the paper: 'in' for the "
        "output projections (module 'mlp_out', 'attn_out': the column of one MLP intermediate neuron or one "
        "attention value channel, its weights into the residual stream) and 'out' for 'mlp_in' (the rows of "
        "gate/up_proj: that neuron's weights from the residual stream), so d_n = hidden size always, as the paper's "
        "d_n = 4096 = d_model of LLaMA-7B. Rows of an output projection are the wrong unit: their task vectors "
        "are combinations of the same few input keys k_t for old and new facts (∂L/∂W = Σ_t δ_t k_tᵀ), so "
        "old and new rows are nearly (anti-)parallel; columns combine the output-gradient directions δ_t, "
        "which differ between old and new targets.")})
    num_steps: int = field(default=20, metadata={"help": (
        "Epochs (cap) of each fine-tuning, old and new facts (the paper: 3 epochs over thousands of facts, "
        "geoedit.txt Appendix C). A cap: with batch 4 and lr 2e-3 a few facts reach early_stop_loss in about "
        "half of it.")})
    lr: float = field(default=2e-3, metadata={"help": (
        "Adam learning rate of both fine-tunings (full mode; 'lora_lr' in LoRA mode). 4x ft's 5e-4 because a batch "
        "of 4 takes one step per epoch where ft (batch 1) takes four; GeoEdit keeps only an importance-weighted part "
        "of τ_new (β <= 1), so τ_new must have learnt the new facts with margin.")})
    batch_size: int = field(default=4, metadata={"help": (
        "Requests per Adam step (the paper: batch 4 with 4 accumulation steps, geoedit.txt Appendix C).")})
    importance_decay: float = field(default=0.85, metadata={"help": (
        "EMA decay of the per-neuron importance over training steps (Eq. 12-13 'exponential moving average'; "
        "0.85 as β1 in the same author's TaSL code and AdaLoRA, guides METHODS.md section 10).")})
    latent_dim: int | None = field(default=None, metadata={"help": (
        "Auto-encoder latent size d_latent (Eq. 7). None = d_n // 8, i.e. 72 for SmolLM2-135M (d_n = hidden size "
        "576 with the default neuron_axis). The paper uses 512 for d_n = 4096 (ratio 1/8) and finds 256 (1/16) and "
        "512 best, >= 1024 (1/4) collapsing back to near-orthogonal angles and 128 (1/32) too lossy (Table 3); the "
        "ratio, not the absolute size, is what carries over to a 7x smaller d_n (512 would be almost d_n itself, "
        "the paper's collapsing regime).")})
    ae_hidden: int | None = field(default=None, metadata={"help": (
        "Hidden width of the 2-layer encoder / decoder MLPs. None = d_n // 2 (288 for d_n = 576), the paper's "
        "4096 -> 2048 -> 512 ratio; with d_n = 576 the AE has ~0.4M parameters, cheap on a shared CPU.")})
    ae_steps: int = field(default=300, metadata={"help": (
        "Adam steps of the auto-encoder (the paper trains it ~2.5 min on 7B task vectors, Sec. 5.4). More steps "
        "barely lower the reconstruction error: Adam's sign-like updates make τ close to full rank, so a 72-d code "
        "cannot reconstruct it exactly (docs/DEFAULTS.md).")})
    ae_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the auto-encoder."})
    ae_batch_size: int = field(default=128, metadata={"help": "Rows per auto-encoder step (MSE part)."})
    ae_kl_weight: float = field(default=0.5, metadata={"help": (
        "λ of Eq. 9, the weight of the semantic-consistency term KL(f_{θ+τ}(x) ‖ f_{θ+τ̂}(x)); 0.5 as the paper "
        "(Sec. 5, Table 5). 0 trains on MSE alone.")})
    ae_kl_every: int = field(default=25, metadata={"help": (
        "Add the KL term every this many AE steps (alternating old / new task vectors; each needs a forward and "
        "backward pass of the language model with every edited matrix replaced by θ0 + Dec(Enc(τ))), which keeps "
        "the AE cheap; the paper does not say how often.")})
    phi1: float = field(default=85.0, metadata={"help": (
        "φ1 (degrees): latent angles below it are 'aligned' (synergistic editing). 85 as the paper (Sec. 5, "
        "Table 6).")})
    phi2: float = field(default=95.0, metadata={"help": (
        "φ2 (degrees): latent angles above it are 'conflicting' (forget-then-learn); [φ1, φ2] is 'orthogonal' "
        "(general knowledge, no update). 95 as the paper.")})
    synergistic: bool = field(default=True, metadata={"help": (
        "Apply Eq. 11's aligned rule α h_old + β h_new. False = the '- Synergistic' ablation (Table 2): plain "
        "fine-tuning on the new facts for those neurons, h_edit = h_new.")})
    orthogonal: bool = field(default=True, metadata={"help": (
        "Apply Eq. 11's orthogonal rule h_edit = 0 (no update). False = '- Orthogonal' (Table 2): h_edit = h_new.")})
    conflicting: bool = field(default=True, metadata={"help": (
        "Apply Eq. 11's conflicting rule −α h_old + β h_new. False = '- Conflict' (Table 2): h_edit = h_new.")})
    fusion: str = field(default="fixed", metadata={"help": (
        "'importance': α, β from the min-max-normalised EMA importance (Eq. 11-13, the paper's full method). "
        "'fixed': the paper's '+MW' variant (Table 2), the same fixed_alpha / fixed_beta for every neuron. Default "
        "'fixed' on SmolLM2-135M: the min-max importance β is heavy-tailed while Adam spreads τ_new evenly over "
        "the neurons, so β-weighting keeps only a small part of the edit (docs/DEFAULTS.md).")})
    fixed_alpha: float = field(default=0.3, metadata={"help": (
        "α of fusion 'fixed' (+MW); 0.3 found by grid search in the paper (Sec. 5.2).")})
    fixed_beta: float = field(default=1.0, metadata={"help": "β of fusion 'fixed' (+MW); 1 as the paper."})

    def validate(self) -> None:
        super().validate()
        if self.neuron_axis not in NEURON_AXES:
            raise ValueError(f"neuron_axis must be one of {', '.join(NEURON_AXES)}, got {self.neuron_axis!r}")
        if not 0 <= self.importance_decay < 1:
            raise ValueError(f"importance_decay must be in [0, 1), got {self.importance_decay}")
        for name in ("latent_dim", "ae_hidden"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")
        if self.ae_steps < 0 or self.ae_batch_size < 1 or self.ae_kl_every < 1:
            raise ValueError("ae_steps must be >= 0, ae_batch_size and ae_kl_every >= 1")
        if not self.ae_lr > 0 or self.ae_kl_weight < 0:
            raise ValueError("ae_lr must be > 0 and ae_kl_weight >= 0")
        if not 0 <= self.phi1 <= self.phi2 <= 180:
            raise ValueError(f"need 0 <= phi1 <= phi2 <= 180, got {self.phi1}, {self.phi2}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if not (0 <= self.fixed_alpha <= 1 and 0 <= self.fixed_beta <= 1):
            raise ValueError("fixed_alpha and fixed_beta must be in [0, 1] (Eq. 11)")

    def resolved_axis(self) -> str:
        """'in' (neurons = canonical columns) or 'out' (rows); 'auto' follows ``module`` (see ``neuron_axis``)."""
        if self.neuron_axis != "auto":
            return self.neuron_axis
        return "out" if self.module == "mlp_in" else "in"


# ---------------------------------------------------------------------------------------------------------------
# the paper's steps as plain functions
# ---------------------------------------------------------------------------------------------------------------
class TaskVectorAE(nn.Module):
    """Eq. 7-8: SemEnc d_n -> hidden -> latent and Dec latent -> hidden -> d_n, 2-layer MLPs with a ReLU between.

    No biases, so both maps are positively homogeneous (f(c x) = c f(x) for c >= 0): Enc(0) = 0 and Dec(0) = 0
    (an untouched neuron has no latent direction, and an 'orthogonal' neuron with h_edit = 0 gets exactly no
    update), and latent angles do not depend on the size of a task vector, only on its direction, like the raw
    angles they replace.
    """

    def __init__(self, d_n: int, hidden: int, latent: int):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(d_n, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, latent, bias=False))
        self.dec = nn.Sequential(nn.Linear(latent, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, d_n, bias=False))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        return self.dec(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


def to_neurons(W: torch.Tensor, axis: str) -> torch.Tensor:
    """A canonical ``[d_out, d_in]`` matrix as ``[N, d_n]`` neuron vectors: its rows (axis 'out') or columns
    ('in'). :func:`from_neurons` is the inverse."""
    return W if axis == "out" else W.T


def from_neurons(V: torch.Tensor, axis: str) -> torch.Tensor:
    """``[N, d_n]`` neuron vectors back to the canonical ``[d_out, d_in]`` matrix."""
    return V if axis == "out" else V.T


def row_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Eq. 10 per row: arccos(a·b / |a||b|) in degrees (float64); NaN where a row is zero."""
    a, b = A.double(), B.double()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(1) / (na * nb)
    ang = torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))
    ang[(na == 0) | (nb == 0)] = math.nan
    return ang


def classify(angles: torch.Tensor, phi1: float, phi2: float) -> torch.Tensor:
    """0 aligned (φ < φ1), 1 orthogonal (φ1 <= φ <= φ2), 2 conflicting (φ > φ2). A NaN angle (no old-knowledge
    direction: τ_old^i = 0) counts as aligned, so Eq. 11 gives α·0 + β h_new, fine-tuning on the new facts."""
    cls = torch.full(angles.shape, ALIGNED, dtype=torch.long)
    cls[(angles >= phi1) & (angles <= phi2)] = ORTHOGONAL
    cls[angles > phi2] = CONFLICTING
    return cls


def fuse(h_old: torch.Tensor, h_new: torch.Tensor, cls: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, *,
         synergistic: bool = True, orthogonal: bool = True, conflicting: bool = True) -> torch.Tensor:
    """Eq. 11 per neuron (rows): aligned α h_old + β h_new, orthogonal 0, conflicting −α h_old + β h_new; a
    switched-off rule gives h_new (plain fine-tuning on the new facts, the Table 2 ablations)."""
    a, b = alpha.to(h_old)[:, None], beta.to(h_old)[:, None]
    out = h_new.clone()
    rules = {ALIGNED: (synergistic, a * h_old + b * h_new), ORTHOGONAL: (orthogonal, torch.zeros_like(h_new)),
             CONFLICTING: (conflicting, -a * h_old + b * h_new)}
    for c, (on, value) in rules.items():
        if on:
            m = cls == c
            out[m] = value[m]
    return out


def minmax(v: np.ndarray) -> np.ndarray:
    """Normalise importance scores to [0, 1] (Sec. 4.3); all-equal scores give ones (nothing to tell apart)."""
    v = np.asarray(v, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    return np.ones_like(v) if hi <= lo else (v - lo) / (hi - lo)


# ---------------------------------------------------------------------------------------------------------------
# the editor
# ---------------------------------------------------------------------------------------------------------------
@register(family="fine-tuning", order=140,
          tiny={"layers": (1,), "num_steps": 2, "ae_steps": 20, "ae_kl_every": 10})
class GeoEditEditor(FineTuneEditor):
    """GeoEdit (Feng et al. 2025): direction-aware fusion of old- and new-fact task vectors in an AE latent space."""

    name: ClassVar[str] = "geoedit"
    config_cls: ClassVar[type[EditorConfig]] = GeoEditConfig
    summary: ClassVar[str] = ("GeoEdit: per-neuron angle of τ_old vs τ_new in an AE latent space; aligned fuse, "
                              "orthogonal skip, conflicting forget-then-learn (Eq. 11), importance-weighted")

    # ---- KL consistency (Eq. 9) --------------------------------------------------------------------------------
    def _answer_logprobs(self, weights: Mapping[str, torch.Tensor], examples: Sequence[Example]) -> torch.Tensor:
        """log-softmax of the model with ``weights`` (param name -> full weight, param layout) substituted, at
        every answer position of ``examples``: ``[n_tokens, vocab]``."""
        ids, mask, rows, cols = pad_examples(self.tok, examples, self.lm.device)
        params = dict(self.model.named_parameters())
        # fp32 weights (θ0 + τ) meet a half-precision model in its own dtype (the cast keeps the AE's gradient)
        weights = {n: w.to(params[n].dtype) for n, w in weights.items()}
        logits = torch.func.functional_call(self.model, weights,
                                            kwargs={"input_ids": ids, "attention_mask": mask}).logits
        return torch.log_softmax(logits[rows, cols].float(), dim=-1)

    def _train_ae(self, tau: dict[str, dict[str, torch.Tensor]], neurons: dict[str, dict[str, torch.Tensor]],
                  examples: dict[str, list[Example]], names: list[str], scale: float
                  ) -> tuple[TaskVectorAE, list[float], list[float]]:
        """Eq. 9 on the (scaled) neuron vectors of τ_old and τ_new of every matrix. Returns the AE (eval mode), the
        MSE curve and the KL values."""
        cfg, spec = self.config, self.spec
        axis = cfg.resolved_axis()
        canon = {t: {n: neurons[t][n].float() / scale for n in names} for t in neurons}
        X = torch.cat([canon[t][n] for t in ("old", "new") for n in names])  # [2N, d_n]
        d_n = X.shape[1]
        ae = TaskVectorAE(d_n, cfg.ae_hidden or max(1, d_n // 2), cfg.latent_dim or max(1, d_n // 8)).to(X.device)
        opt = torch.optim.Adam(ae.parameters(), lr=cfg.ae_lr)
        params = dict(self.model.named_parameters())
        W0 = {n: params[n].detach() for n in names}
        refs = {}
        mse_curve, kl_values = [], []
        flags = {n: p.requires_grad for n, p in params.items()}
        gen = torch.Generator().manual_seed(self.seed)
        try:
            for p in params.values():
                p.requires_grad_(False)
            with torch.no_grad():
                for t in ("old", "new"):
                    refs[t] = self._answer_logprobs({n: W0[n] + tau[t][n] for n in names}, examples[t])
            with torch.enable_grad():
                for step in range(cfg.ae_steps):
                    idx = torch.randint(0, X.shape[0], (min(cfg.ae_batch_size, X.shape[0]),), generator=gen)
                    xb = X[idx.to(X.device)]
                    loss = nn.functional.mse_loss(ae(xb), xb)
                    mse_curve.append(loss.item())
                    if step % 50 == 0:
                        log.debug("%s: AE step %d, MSE %.4g", self.name, step, mse_curve[-1])
                    if cfg.ae_kl_weight > 0 and (step + 1) % cfg.ae_kl_every == 0:
                        t = ("old", "new")[(step // cfg.ae_kl_every) % 2]
                        weights = {n: W0[n] + spec.to_param_layout(from_neurons(ae(canon[t][n]) * scale, axis))
                                   for n in names}
                        logq = self._answer_logprobs(weights, examples[t])
                        # KL(p ‖ q) with p = f_{θ+τ}(x) (reference) and q = f_{θ+τ̂}(x), mean over answer tokens
                        kl = (refs[t].exp() * (refs[t] - logq)).sum(-1).mean()
                        kl_values.append(kl.item())
                        loss = loss + cfg.ae_kl_weight * kl
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        finally:
            for n, p in params.items():
                p.requires_grad_(flags[n])
        ae.eval()
        return ae, mse_curve, kl_values

    def edit(self, requests: Sequence[EditRequest]) -> EditResult:
        started, names = self.begin_edit(requests)
        cfg, spec = self.config, self.spec
        axis = cfg.resolved_axis()
        examples = {"old": [self.encode_old(r) for r in requests], "new": [self.encode(r) for r in requests]}
        lora, lr = cfg.adapter_and_lr()
        # step 1 + importance: two separate fine-tunings from θ0 (Eq. 5-6, 12-13)
        runs = {t: self.fit(names, examples[t], lora=lora, lr=lr, importance_decay=cfg.importance_decay,
                            importance_axis=axis, num_steps=cfg.old_num_steps if t == "old" else None)
                for t in ("old", "new")}
        tau = {t: runs[t].deltas for t in runs}
        neurons = {t: {n: to_neurons(spec.to_canonical(tau[t][n]).double(), axis) for n in names} for t in tau}
        shapes = {neurons["old"][n].shape[1] for n in names}
        if len(shapes) != 1:
            raise EditError(f"{self.name}: the chosen matrices have neurons of different sizes {sorted(shapes)} "
                            f"(neuron_axis {axis!r}); one auto-encoder needs one neuron size d_n")
        rows = {t: torch.cat([neurons[t][n] for n in names]) for t in tau}  # [N, d_n], one neuron per row
        nonzero = rows["new"].norm(dim=1)
        # one global scale (RMS entry of both task vectors): the AE sees entries of order 1, so the MSE of Eq. 9 is
        # of the order of the KL term instead of ~1e-8 (which let the KL steps swamp the reconstruction)
        scale = float(torch.cat([rows["old"], rows["new"]]).pow(2).mean().sqrt())
        if not scale > 0:
            raise EditError(f"{self.name}: both fine-tunings left the weights unchanged (losses already below "
                            f"early_stop_loss={cfg.early_stop_loss}?)")
        # step 2: auto-encoder (Eq. 7-9), seeded
        ae, mse_curve, kl_values = self.seeded(self._train_ae, tau, neurons, examples, names, scale)
        with torch.no_grad():
            h = {t: ae.encode(rows[t].float() / scale) for t in rows}
            recon = {t: float((ae.decode(h[t]).double() * scale - rows[t]).norm() / rows[t].norm().clamp_min(1e-30))
                     for t in rows}
            raw = row_angles(rows["old"], rows["new"])
            latent = row_angles(h["old"], h["new"])
            cls = classify(latent, cfg.phi1, cfg.phi2)
            if cfg.fusion == "importance":
                alpha = minmax(np.concatenate([runs["old"].importance[n] for n in names]))
                beta = minmax(np.concatenate([runs["new"].importance[n] for n in names]))
            else:
                alpha = np.full(raw.shape[0], cfg.fixed_alpha)
                beta = np.full(raw.shape[0], cfg.fixed_beta)
            h_edit = fuse(h["old"], h["new"], cls, torch.as_tensor(alpha), torch.as_tensor(beta),
                          synergistic=cfg.synergistic, orthogonal=cfg.orthogonal, conflicting=cfg.conflicting)
            tau_edit = ae.decode(h_edit).double() * scale
            tau_edit[h_edit.abs().sum(1) == 0] = 0.0  # exact zeros (Dec(0) = 0 already; guards rounding)
        deltas, start = {}, 0
        index = np.concatenate([np.full(neurons["old"][n].shape[0], i) for i, n in enumerate(names)])
        for n in names:
            count = neurons["old"][n].shape[0]
            W = from_neurons(tau_edit[start:start + count], axis).to(tau["old"][n].dtype)
            deltas[n] = spec.to_param_layout(W).contiguous()
            start += count
        counts = {c: int((cls == i).sum()) for i, c in enumerate(("aligned", "orthogonal", "conflicting"))}
        info = {**self.delta_info(deltas), "n_requests": len(requests), "n_neurons": int(raw.shape[0]),
                "class_counts": counts, "ae_recon_rel_error": recon,
                "ae_mse_initial": mse_curve[0] if mse_curve else math.nan,
                "ae_mse_final": mse_curve[-1] if mse_curve else math.nan,
                "ae_kl_final": kl_values[-1] if kl_values else math.nan,
                "latent_dim": int(h["old"].shape[1]), "d_n": int(rows["old"].shape[1]), "neuron_axis": axis,
                "old": {k: v for k, v in runs["old"].stats.items() if k != "loss_curve"},
                "new": {k: v for k, v in runs["new"].stats.items() if k != "loss_curve"},
                "tau_new_zero_rows": int((nonzero == 0).sum())}
        artifacts = {"param_names": list(names), "neuron_axis": axis, "param_index": index,
                     "neuron": np.concatenate([np.arange((index == i).sum()) for i in range(len(names))]),
                     "raw_angle": raw.cpu().numpy(), "latent_angle": latent.cpu().numpy(),
                     "neuron_class": cls.cpu().numpy(), "tau_old_norm": rows["old"].norm(dim=1).cpu().numpy(),
                     "tau_new_norm": rows["new"].norm(dim=1).cpu().numpy(),
                     "alpha": np.asarray(alpha, dtype=np.float64), "beta": np.asarray(beta, dtype=np.float64),
                     "ae_mse_curve": np.asarray(mse_curve), "ae_kl": np.asarray(kl_values),
                     "loss_curve_old": runs["old"].stats["loss_curve"],
                     "loss_curve_new": runs["new"].stats["loss_curve"]}
        result = self._result(deltas=deltas, info=info, artifacts=artifacts, started=started)
        log.info("%s: %d request(s), classes %s, AE recon %.3g/%.3g, in %.2fs", self.name, len(requests), counts,
                 recon["old"], recon["new"], result.seconds)
        return result
