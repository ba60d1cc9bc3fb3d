"""GeoEdit: geometric knowledge editing (Feng et al., arXiv 2502.19953; the spec is geoedit.txt section 4).

Steps (all on the chosen weight matrices; default the MLP output projection of the configured layers):

1. Task vectors (Eq. 4-6): τ_old = FT(θ0; D_old) − θ0 (prompt -> target_true) and τ_new = FT(θ0; D_new) − θ0
   (prompt -> target_new), two SEPARATE fine-tunings from θ0 (full fine-tuning or a peft LoRA adapter, ``mode``),
   with the loop and loss of the fine-tuning family (:func:`editors.finetune.finetune`).
2. Neurons (``neuron_axis``): the paper's θ_i ∈ R^{d_n} with d_n = 4096 on LLaMA-7B = d_model, i.e. one FFN
   (inner) neuron with its residual-stream-facing weights. Default 'auto': a COLUMN of an output projection
   (canonical ``[d_out, d_in]``; module 'mlp_out' / 'attn_out': the weights of one intermediate unit into the residual
   stream, d_n = d_out) and a ROW of an input projection ('mlp_in': that unit's weights from the residual stream,
   d_n = d_in); on SmolLM2-135M's down_proj ([576, 1536]) 1536 neurons with d_n = 576. Columns are our reading of
   the paper's θ_i ∈ R^{d_n} (d_n = d_model); rows of down_proj are the wrong unit: ∂L/∂W = Σ_t δ_t k_tᵀ, so every
   row of τ_old and τ_new is a combination of the SAME keys k_t (same prompts) and old and new rows come out nearly
   parallel or anti-parallel; columns combine the output-gradient directions δ_t, which differ between old and new
   targets (``scripts/geoedit_angles.py``).
3. Importance (Eq. 12-13): during each fine-tuning, per neuron the mean over its trainable parameters of
   |w · ∂L/∂w| (LoRA: a row neuron's row of B, a column neuron's column of A), smoothed over optimiser steps by an
   exponential moving average (started at the first informative step, see :func:`editors.finetune.finetune`); the
   scores of all neurons are normalised to [0, 1] per task (``importance_norm``: rank by default, the paper's
   literal min-max as an option) -> α (old facts), β (new facts).
4. Auto-encoder (Eq. 7-9, ``ae``): by default LINEAR and orientation-preserving, h = E τ and τ̂ = Eᵀ h with
   E ``[d_latent, d_n]`` of orthonormal rows (see ``GeoEditConfig.ae`` for why), initialised at the top principal
   directions of the task vectors and trained on the neuron vectors of τ_old and τ_new of every edited matrix with
   L_AE = MSE(τ, τ̂) + λ·KL(f_{θ0+τ}(x) ‖ f_{θ0+τ̂}(x)) (λ = 0.5), the KL on the task's own prompts at the answer
   positions, every ``ae_kl_every`` steps; E is re-orthonormalised after every Adam step (a QR retraction).
5. Angles (Eq. 10) between h_old = Enc(τ_old^i) and h_new = Enc(τ_new^i); classes (Eq. 11): aligned φ < φ1 (85°),
   orthogonal φ1 <= φ <= φ2 (95°, both ends inclusive as Eq. 11's closed interval), conflicting φ > φ2. Fusion
   (Eq. 11): aligned α h_old + β h_new (synergistic), orthogonal 0 (no update), conflicting −α h_old + β h_new
   (forget-then-learn). τ_edit = Dec(h_edit) and θ_e = θ0 + τ_edit; the delta is τ_edit in the parameter's layout.

Ablations (Table 2): ``synergistic`` / ``orthogonal`` / ``conflicting`` = False replaces that class's rule by plain
fine-tuning on the new facts, h_edit = h_new; ``fusion="fixed"`` is "+MW" (α = 0.3, β = 1 for every neuron).
:func:`variant_label` names what a config runs (the paper's full method or which deviation); it is in every
result's ``info["variant"]`` and on the Geometry page.

Info (every result): ``variant``, ``class_counts`` / ``class_shares``, ``tau_old_norm`` / ``tau_new_norm`` /
``tau_edit_norm`` (Frobenius over every edited neuron) and ``edit_to_new_norm`` = |τ_edit| / |τ_new|,
``tau_new_energy_shares`` (the share of |τ_new|² in each class: what the orthogonal mask removes),
``alpha_mean`` / ``alpha_median`` / ``beta_mean`` / ``beta_median``, ``angle_spearman`` (Spearman rank correlation of
latent and raw angles over the neurons), the AE's reconstruction error and losses.

Artifacts (numpy, one entry per neuron of every edited matrix, matrices in ``param_names`` order; ``neuron_axis``
says whether neuron k of a matrix is its canonical row k ('out') or column k ('in')): ``raw_angle``
(between τ_old^i and τ_new^i in parameter space), ``latent_angle``, ``neuron_class`` (0 aligned, 1 orthogonal,
2 conflicting, as accepted by ``analysis.angles.neuron_angle_frame``), ``tau_old_norm``, ``tau_new_norm``,
``tau_edit_norm``, ``importance_old`` / ``importance_new`` (the EMA scores before normalisation), ``alpha``,
``beta``, ``param_index`` and ``neuron``; plus the AE loss curve and both fine-tuning loss curves.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .base import EditError, EditorConfig, EditResult
from .fields import check_choice, check_range
from .finetune import Example, FineTuneEditor, TwoTaskConfig, pad_examples
from .registry import register
from .requests import EditRequest

log = logging.getLogger(__name__)

FUSIONS = ("importance", "fixed")
NEURON_AXES = ("auto", "in", "out")
AE_KINDS = ("linear", "mlp-relu")
IMPORTANCE_NORMS = ("rank", "minmax")
ALIGNED, ORTHOGONAL, CONFLICTING = 0, 1, 2
CLASS_NAMES = ("aligned", "orthogonal", "conflicting")
#: the registry's ``tiny`` overrides of both GeoEdit editors (one edit on the 4-layer test models in seconds)
TINY_OVERRIDES = MappingProxyType({"layers": (1,), "num_steps": 2, "ae_steps": 20, "ae_kl_every": 10})


@dataclass
class GeoEditConfig(TwoTaskConfig):
    """Config of ``geoedit``.

    Fine-tuning defaults as ``ft`` (FT-M of SmolLM2-135M's MLP output projection) but at layer 24, batches of 4 at
    lr 2e-3 for at most 20 epochs (see ``lr``); paper values for everything GeoEdit adds (λ 0.5, φ 85°/95°, EMA
    importance, the FFN neuron as the unit: ``neuron_axis``), the AE sizes scaled to d_n by the paper's ratios (see
    ``latent_dim``). Version 2: neurons are FFN neurons (columns of down_proj), not rows. Version 3: layer 24 and the
    '+MW' fixed-weight fusion by default. Version 4: an orientation-preserving linear auto-encoder (``ae``; the ReLU
    MLP of versions <= 3 made every latent angle <= 90° and emptied the conflicting class), rank-normalised
    importance (``importance_norm``), the importance EMA started at the first informative step (LoRA). Version 5:
    ``geoedit`` is the paper's full method (importance fusion) by default; the '+MW' fixed-weight variant, which
    edits SmolLM2-135M reliably where the full method does not, is its own method ``geoedit-mw``
    (:class:`GeoEditMWConfig`), so the name says which ran.

    The auto-encoder (``ae``), argued from the paper: Eq. 10-11 give latent angles a geometric meaning, "aligned" /
    "approximately orthogonal" / "opposite directions" (Sec. 1: "for opposite directions ... forget-then-learn"),
    and Sec. 4.1 says directions, not magnitudes, carry the knowledge. A latent map can keep that meaning only if
    (i) it is odd, Enc(−τ) = −Enc(τ), so a task vector and its reverse stay opposite (180°, conflicting); (ii) it is
    positively homogeneous, Enc(cτ) = c·Enc(τ), so an angle does not depend on how far a fine-tuning moved a neuron;
    (iii) it is an isometry on the subspace it keeps, so 90° stays 90° and the [φ1, φ2] band means what it says. An
    elementwise activation that is odd and positively homogeneous is linear, and a linear map with (iii) is a
    matrix E with orthonormal rows (decoder Eᵀ): h = E τ is τ's coordinates in the kept subspace, τ̂ = EᵀE τ its
    orthogonal projection there. The paper's "2-layer MLPs [4096 → 2048 → 512]" name no activation; with a linear
    one two layers compose to one such matrix, so one is used. What the AE still does, as the paper says (Sec. 4.2:
    "mitigates the angular bias", "removes irrelevant information"): it drops the components of τ outside the
    subspace that Eq. 9 keeps (MSE: the principal directions of the task vectors; KL: the directions that change
    the model's answers), whose high-dimensional noise pulls raw angles toward 90°. The ReLU MLP of versions <= 3
    ('mlp-relu') is kept as an option: Enc(−τ) = W2 relu(−W1 τ) is made of the hidden units τ does not activate, so
    opposite task vectors do not get opposite codes (measured on the default model: raw 0/90/120/180° -> latent
    0/77.7/93.4/107.7°, 0 conflicting neurons out of 1,536), i.e. it cannot express Eq. 11's third case.
    """

    version: ClassVar[int] = 5

    layers: tuple[int, ...] = field(default=(24,), metadata={"help": (
        "Decoder layers whose weights are fine-tuned (0-based). Default 24 of SmolLM2-135M's 30 (version 3): there "
        "the new-fact task vector leaves unrelated facts alone and the raw FFN-neuron angles concentrate near 90° "
        "as in the paper's Fig. 3 (docs/DEFAULTS.md).")})
    neuron_axis: str = field(default="auto", metadata={"help": (
        "What one neuron θ_i ∈ R^{d_n} of Eq. 10-12 is, in the canonical [d_out, d_in] matrix: 'in' = a COLUMN "
        "(one input unit with all its outgoing weights, d_n = d_out), 'out' = a ROW (one output unit with its "
        "incoming weights, d_n = d_in). 'auto' (default) = the FFN / inner neuron, our reading of the paper: 'in' "
        "for the output projections (module 'mlp_out', 'attn_out': the column of one MLP intermediate neuron or one "
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
        "of 4 takes one step per epoch where ft (batch 1) takes four; GeoEdit keeps only a weighted part of τ_new "
        "(β <= 1), so τ_new must have learnt the new facts with margin.")})
    batch_size: int = field(default=4, metadata={"help": (
        "Requests per Adam step (the paper: batch 4 with 4 accumulation steps, geoedit.txt Appendix C).")})
    importance_decay: float = field(default=0.85, metadata={"help": (
        "EMA decay of the per-neuron importance over training steps (Eq. 12-13 'exponential moving average'; "
        "0.85 as β1 in the same author's TaSL code and AdaLoRA, guides METHODS.md section 10).")})
    importance_norm: str = field(default="rank", metadata={"help": (
        "How Eq. 12's scores I_old, I_new are 'normalised independently to the range [0, 1]' (Sec. 4.3) into α, "
        "β. 'rank' (default): the empirical CDF, (rank − 1)/(N − 1) with ties averaged, a monotone map onto "
        "[0, 1] that one outlier cannot move (scaling one neuron's score x100 changes no other neuron's weight by "
        "more than 1/(N − 1)). 'minmax': (I − min)/(max − min), the paper's literal reading; on SmolLM2-135M the "
        "scores are heavy-tailed (one down_proj neuron 8x the 99th percentile), so the max pins the scale, the "
        "median weight is ~0.03 and the fused edit keeps ~5-10% of τ_new's norm: no edit is made.")})
    ae: str = field(default="linear", metadata={"help": (
        "Auto-encoder of Eq. 7-9. 'linear' (default): h = E τ, τ̂ = Eᵀ h with E [d_latent, d_n] of orthonormal "
        "rows: odd, scale-free and angle-preserving on its subspace, so x and −x are conflicting (180°) and "
        "perpendicular vectors of the subspace stay at 90° (the class docstring argues it from the paper). "
        "'mlp-relu': the 2-layer ReLU MLP of versions <= 3 (no biases); it is not odd, so opposite task vectors "
        "do not get opposite codes (on the default model no neuron came out conflicting; kept to show that "
        "artefact, not for editing).")})
    latent_dim: int | None = field(default=None, metadata={"help": (
        "Auto-encoder latent size d_latent (Eq. 7). None = d_n // 8, i.e. 72 for SmolLM2-135M (d_n = hidden size "
        "576 with the default neuron_axis). The paper uses 512 for d_n = 4096 (ratio 1/8) and finds 256 (1/16) and "
        "512 best, >= 1024 (1/4) collapsing back to near-orthogonal angles and 128 (1/32) too lossy (Table 3); the "
        "ratio, not the absolute size, is what carries over to a 7x smaller d_n. Must be <= d_n for 'linear'.")})
    ae_hidden: int | None = field(default=None, metadata={"help": (
        "Hidden width of the 2-layer encoder / decoder MLPs of ae='mlp-relu'. None = d_n // 2 (288 for d_n = 576), "
        "the paper's 4096 -> 2048 -> 512 ratio. Unused by 'linear'.")})
    ae_steps: int = field(default=300, metadata={"help": (
        "Adam steps of the auto-encoder (the paper trains it ~2.5 min on 7B task vectors, Sec. 5.4). The linear AE "
        "starts at the MSE optimum (the top d_latent principal directions of the task vectors, Eckart-Young), so "
        "the steps trade reconstruction for the KL term; 300 minibatch steps take a few seconds on SmolLM2.")})
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
        "φ2 (degrees): latent angles above it are 'conflicting' (forget-then-learn); [φ1, φ2], both ends included "
        "(Eq. 11), is 'orthogonal' (general knowledge, no update). 95 as the paper.")})
    synergistic: bool = field(default=True, metadata={"help": (
        "Apply Eq. 11's aligned rule α h_old + β h_new. False = the '- Synergistic' ablation (Table 2): plain "
        "fine-tuning on the new facts for those neurons, h_edit = h_new.")})
    orthogonal: bool = field(default=True, metadata={"help": (
        "Apply Eq. 11's orthogonal rule h_edit = 0 (no update). False = '- Orthogonal' (Table 2): h_edit = h_new.")})
    conflicting: bool = field(default=True, metadata={"help": (
        "Apply Eq. 11's conflicting rule −α h_old + β h_new. False = '- Conflict' (Table 2): h_edit = h_new.")})
    fusion: str = field(default="importance", metadata={"help": (
        "'importance': α, β from the normalised EMA importance (Eq. 11-13, the paper's full method; the default of "
        "'geoedit'). 'fixed': the paper's '+MW' variant (Table 2), the same fixed_alpha / fixed_beta for every "
        "neuron (the default of 'geoedit-mw', which edits SmolLM2-135M reliably where importance fusion does not: "
        "docs/DEFAULTS.md, docs/reproductions.md); the result's info['variant'] and the Geometry page say which "
        "ran.")})
    fixed_alpha: float = field(default=0.3, metadata={"help": (
        "α of fusion 'fixed' (+MW); 0.3 found by grid search in the paper (Sec. 5.2).")})
    fixed_beta: float = field(default=1.0, metadata={"help": "β of fusion 'fixed' (+MW); 1 as the paper."})

    def validate(self) -> None:
        super().validate()
        check_choice("neuron_axis", self.neuron_axis, NEURON_AXES)
        check_range("importance_decay", self.importance_decay, 0, 1, hi_open=True)
        check_choice("importance_norm", self.importance_norm, IMPORTANCE_NORMS)
        check_choice("ae", self.ae, AE_KINDS)
        for name in ("latent_dim", "ae_hidden"):
            check_range(name, getattr(self, name), 1, optional=True)
        for name in ("ae_batch_size", "ae_kl_every"):
            check_range(name, getattr(self, name), 1)
        for name in ("ae_steps", "ae_kl_weight"):
            check_range(name, getattr(self, name), 0)
        check_range("ae_lr", self.ae_lr, 0, lo_open=True)
        if not 0 <= self.phi1 <= self.phi2 <= 180:
            raise ValueError(f"need 0 <= phi1 <= phi2 <= 180, got {self.phi1}, {self.phi2}")
        check_choice("fusion", self.fusion, FUSIONS)
        for name in ("fixed_alpha", "fixed_beta"):
            check_range(name, getattr(self, name), 0, 1, note="Eq. 11")

    def resolved_axis(self) -> str:
        """'in' (neurons = canonical columns) or 'out' (rows); 'auto' follows ``module`` (see ``neuron_axis``)."""
        if self.neuron_axis != "auto":
            return self.neuron_axis
        return "out" if self.module == "mlp_in" else "in"


@dataclass
class GeoEditMWConfig(GeoEditConfig):
    """Config of ``geoedit-mw``: :class:`GeoEditConfig` with the paper's '+MW' fusion (Table 2: fixed α = 0.3,
    β = 1 for every neuron) instead of the importance fusion. A deviation from the paper's method, kept as a method
    of its own because it is the GeoEdit that edits SmolLM2-135M reliably (see ``fusion``)."""

    fusion: str = field(default="fixed", metadata={"help": (
        "'fixed' (default here): the paper's '+MW' variant (Table 2), fixed_alpha / fixed_beta for every neuron. "
        "'importance' turns this into 'geoedit' (the paper's method). Why this is a method of its own: "
        "docs/DEFAULTS.md (geoedit) and docs/reproductions.md (GeoEdit).")})


def variant_label(config: Mapping) -> str:
    """What a GeoEdit config (a :class:`GeoEditConfig` or its ``to_dict()``, e.g. a stored run's method config)
    runs, in words: the paper's full method, or each deviation from it.

    The paper's method (Sec. 4) is importance fusion with all three strategies on; the label then reads
    "GeoEdit_FT (paper: importance fusion, ...)" and names the normalisation of α/β. "+MW" (Table 2) and the
    "- Synergistic / - Orthogonal / - Conflict" ablations are named as the paper names them, and a non-linear
    auto-encoder is flagged.
    """
    c = config.to_dict() if isinstance(config, EditorConfig) else dict(config)
    mode = "LoRA" if c.get("mode") == "lora" else "FT"
    off = [name for key, name in (("synergistic", "Synergistic"), ("orthogonal", "Orthogonal"),
                                  ("conflicting", "Conflict")) if c.get(key, True) is False]
    if c.get("fusion", "importance") == "fixed":
        fusion = (f"+MW: fixed α={float(c.get('fixed_alpha', 0.3)):g}, β={float(c.get('fixed_beta', 1.0)):g} for "
                  "every neuron (Table 2 ablation, not the paper's importance fusion)")
    else:
        norm = c.get("importance_norm", "minmax")
        fusion = ("importance fusion, min-max α/β as the paper" if norm == "minmax"
                  else f"importance fusion, {norm}-normalised α/β")
        if not off:
            fusion = "paper method: " + fusion
    parts = [fusion] + [f"- {name} (h_new)" for name in off]
    if c.get("ae", "mlp-relu") != "linear":  # configs stored before version 4 have no 'ae': the ReLU MLP
        parts.append(f"{c['ae']} auto-encoder (not orientation-preserving: opposite vectors are not conflicting)")
    return f"GeoEdit_{mode} ({'; '.join(parts)})"


# ---------------------------------------------------------------------------------------------------------------
# the paper's steps as plain functions
# ---------------------------------------------------------------------------------------------------------------
class LinearAE(nn.Module):
    """Eq. 7-8 with an orientation-preserving linear map: h = SemEnc(τ) = E τ, τ̂ = Dec(h) = Eᵀ h, where
    E ``[latent, d_n]`` has orthonormal rows (E Eᵀ = I), kept so by :meth:`retract` after every optimiser step.

    So Enc(−τ) = −Enc(τ), Enc(cτ) = c·Enc(τ), Dec(0) = 0, Dec(Enc(τ)) is τ's orthogonal projection onto the row
    space of E, and the angle between two codes is the angle between the two vectors' projections (equal to the raw
    angle for vectors inside the subspace).
    """

    def __init__(self, d_n: int, latent: int):
        super().__init__()
        if not 1 <= latent <= d_n:
            raise ValueError(f"a linear auto-encoder needs 1 <= latent <= d_n, got latent {latent}, d_n {d_n}")
        E = torch.empty(latent, d_n)
        nn.init.orthogonal_(E)
        self.E = nn.Parameter(E)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.E.T

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.E

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def init_from(self, X: torch.Tensor) -> None:
        """Start at the MSE optimum for data ``X`` ``[n, d_n]``: the top-``latent`` right singular vectors
        (Eckart-Young), sign-fixed so each has a non-negative sum (deterministic)."""
        with torch.no_grad():
            _, _, Vh = torch.linalg.svd(X.to(self.E), full_matrices=False)
            V = Vh[:self.E.shape[0]]
            if V.shape[0] < self.E.shape[0]:  # fewer data rows than latent dims: keep the random rest, orthogonalised
                V = torch.cat([V, self.E[V.shape[0]:]])
            V = V * torch.where(V.sum(1, keepdim=True) < 0, -1.0, 1.0)
            self.E.copy_(V)
        self.retract()

    def retract(self) -> None:
        """Back onto the orthonormal rows (the Q of a QR, signs fixed to stay next to the current E)."""
        with torch.no_grad():
            Q, R = torch.linalg.qr(self.E.T)
            self.E.copy_((Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)).T)


class ReluMLPAE(nn.Module):
    """The auto-encoder of config versions <= 3 (``ae="mlp-relu"``): SemEnc d_n -> hidden -> latent and Dec
    latent -> hidden -> d_n, 2-layer MLPs with a ReLU between, no biases (positively homogeneous, Dec(0) = 0). It is
    not odd: Enc(−x) = W2 relu(−W1 x) uses the hidden units x leaves at zero, so the latent angle of two opposite
    vectors is far below 180° and depends on the vector."""

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

    def init_from(self, X: torch.Tensor) -> None:
        """Random init (as versions <= 3)."""

    def retract(self) -> None:
        """No constraint."""


def make_autoencoder(kind: str, d_n: int, *, latent: int | None = None, hidden: int | None = None
                     ) -> LinearAE | ReluMLPAE:
    """The auto-encoder ``kind`` (``AE_KINDS``) for neurons of size ``d_n``; sizes default to the paper's ratios
    (latent d_n // 8, hidden d_n // 2)."""
    latent = latent or max(1, d_n // 8)
    if kind == "linear":
        return LinearAE(d_n, latent)
    if kind == "mlp-relu":
        return ReluMLPAE(d_n, hidden or max(1, d_n // 2), latent)
    raise ValueError(f"unknown auto-encoder {kind!r}; valid: {', '.join(AE_KINDS)}")


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Eq. 9's KL(p ‖ q) = Σ_v p_v (log p_v − log q_v), averaged over the rows (answer tokens); ``logp`` /
    ``logq`` ``[n_tokens, vocab]`` log-probabilities, p the reference f_{θ+τ}(x), q the reconstruction's
    f_{θ+τ̂}(x)."""
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def train_autoencoder(ae: LinearAE | ReluMLPAE, X: torch.Tensor, *, steps: int, lr: float, batch_size: int,
                      kl_every: int, kl_weight: float,
                      kl_term: Callable[[LinearAE | ReluMLPAE, int], torch.Tensor] | None = None,
                      generator: torch.Generator | None = None) -> tuple[list[float], list[float]]:
    """Eq. 9: Adam on L_AE = MSE(τ, τ̂) + λ·KL over minibatches of the rows of ``X`` ``[n, d_n]``.

    Every ``kl_every``-th step adds ``kl_weight · kl_term(ae, task)`` with ``task`` alternating 0, 1, 0, ... (old,
    new task vectors); ``ae.retract()`` follows every step. ``ae`` is initialised by ``ae.init_from(X)`` first.
    Returns (MSE per step, KL values).
    """
    ae.init_from(X)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    mse_curve: list[float] = []
    kl_values: list[float] = []
    for step in range(steps):
        idx = torch.randint(0, X.shape[0], (min(batch_size, X.shape[0]),), generator=generator)
        xb = X[idx.to(X.device)]
        loss = nn.functional.mse_loss(ae(xb), xb)
        mse_curve.append(loss.item())
        if kl_term is not None and kl_weight > 0 and (step + 1) % kl_every == 0:
            kl = kl_term(ae, (step // kl_every) % 2)
            kl_values.append(kl.item())
            loss = loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ae.retract()
    return mse_curve, kl_values


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
    """Eq. 11's cases: 0 aligned (φ < φ1), 1 orthogonal (φ1 <= φ <= φ2, both ends included), 2 conflicting
    (φ > φ2). A NaN angle (no old-knowledge direction: h_old^i = 0) counts as aligned, so Eq. 11 gives
    α·0 + β h_new, fine-tuning on the new facts."""
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


def average_ranks(v: np.ndarray) -> np.ndarray:
    """0-based ranks of ``v`` with ties given their average rank (as scipy's ``rankdata(v) - 1``)."""
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.arange(v.size, dtype=np.float64)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.zeros(counts.size)
    np.add.at(sums, inverse, ranks)
    return sums[inverse] / counts[inverse]


def minmax(v: np.ndarray) -> np.ndarray:
    """(v − min)/(max − min): the paper's literal normalisation to [0, 1] (Sec. 4.3); all-equal scores give ones
    (nothing to tell apart)."""
    v = np.asarray(v, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    return np.ones_like(v) if hi <= lo else (v - lo) / (hi - lo)


def rank_scale(v: np.ndarray) -> np.ndarray:
    """The empirical CDF onto [0, 1]: (rank − 1)/(N − 1), ties averaged; all-equal scores (or one) give ones."""
    v = np.asarray(v, dtype=np.float64)
    if v.size < 2 or float(v.max()) <= float(v.min()):
        return np.ones_like(v)
    return average_ranks(v) / (v.size - 1)


def normalise_importance(v: np.ndarray, how: str) -> np.ndarray:
    """α or β from one task's importance scores (``IMPORTANCE_NORMS``: 'rank' or 'minmax')."""
    if how == "rank":
        return rank_scale(v)
    if how == "minmax":
        return minmax(v)
    raise ValueError(f"unknown importance normalisation {how!r}; valid: {', '.join(IMPORTANCE_NORMS)}")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation over the pairs where both are finite (NaN when fewer than 2 or constant)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return math.nan
    ra, rb = average_ranks(a[ok]), average_ranks(b[ok])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else math.nan


@dataclass
class Fusion:
    """What :func:`geometric_edit` computed, one row per neuron: the raw and latent angles (degrees), the class,
    the codes h_old / h_new / h_edit ``[N, d_latent]`` and τ_edit ``[N, d_n]`` (float64, unscaled)."""

    raw: torch.Tensor
    latent: torch.Tensor
    cls: torch.Tensor
    h_old: torch.Tensor
    h_new: torch.Tensor
    h_edit: torch.Tensor
    tau_edit: torch.Tensor


def geometric_edit(rows_old: torch.Tensor, rows_new: torch.Tensor, ae: LinearAE | ReluMLPAE, alpha, beta, *,
                   phi1: float, phi2: float, synergistic: bool = True, orthogonal: bool = True,
                   conflicting: bool = True, scale: float = 1.0) -> Fusion:
    """Sec. 4.3 on neuron task vectors ``rows_old`` / ``rows_new`` ``[N, d_n]``: encode (Eq. 7, after dividing
    by ``scale``), angles (Eq. 10) raw and latent, classes from the LATENT angles, fusion (Eq. 11) with per-neuron
    ``alpha`` / ``beta`` ``[N]``, decode (Eq. 8) and scale back. Neurons with h_edit = 0 get exactly 0 (both
    auto-encoders have no biases). Both are positively homogeneous, so ``scale`` > 0 changes the codes but not
    the classes or τ_edit; it only keeps the AE's inputs of order 1."""
    with torch.no_grad():
        dtype = next(ae.parameters()).dtype
        h_old = ae.encode((rows_old / scale).to(dtype))
        h_new = ae.encode((rows_new / scale).to(dtype))
        raw = row_angles(rows_old, rows_new)
        latent = row_angles(h_old, h_new)
        cls = classify(latent, phi1, phi2)
        h_edit = fuse(h_old, h_new, cls, torch.as_tensor(np.asarray(alpha)), torch.as_tensor(np.asarray(beta)),
                      synergistic=synergistic, orthogonal=orthogonal, conflicting=conflicting)
        tau_edit = ae.decode(h_edit).double() * scale  # Dec(0) = 0 exactly (no biases): masked neurons get 0
    return Fusion(raw, latent, cls, h_old, h_new, h_edit, tau_edit)


@dataclass
class GeoEditDetails:
    """Everything one GeoEdit edit computed on the way (:meth:`GeoEditEditor.edit_with_details`): the edited
    parameter names, the neuron task vectors ``rows[t]`` ``[N, d_n]`` (t = "old" / "new", float64, matrices stacked
    in ``names`` order), the global ``scale`` the AE saw them divided by, the trained AE, both fine-tunings
    (:class:`editors.lora.Trained`) and the :class:`Fusion`."""

    names: list[str]
    rows: dict[str, torch.Tensor]
    scale: float
    ae: LinearAE | ReluMLPAE
    runs: dict
    fusion: Fusion


# ---------------------------------------------------------------------------------------------------------------
# the editor
# ---------------------------------------------------------------------------------------------------------------
@register(family="fine-tuning", order=140, tiny=TINY_OVERRIDES)
class GeoEditEditor(FineTuneEditor):
    """GeoEdit (Feng et al. 2025): direction-aware fusion of old- and new-fact task vectors in an AE latent space."""

    name: ClassVar[str] = "geoedit"
    config_cls: ClassVar[type[EditorConfig]] = GeoEditConfig
    summary: ClassVar[str] = ("GeoEdit (the paper's method): per-neuron angle of τ_old vs τ_new in an "
                              "orientation-preserving AE latent space; aligned fuse, orthogonal skip, conflicting "
                              "forget-then-learn (Eq. 11), importance-weighted α, β (Eq. 12-13)")

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
                  ) -> tuple[LinearAE | ReluMLPAE, list[float], list[float]]:
        """Eq. 9 on the (scaled) neuron vectors of τ_old and τ_new of every matrix. Returns the AE (eval mode), the
        MSE curve and the KL values."""
        cfg, spec = self.config, self.spec
        axis = cfg.resolved_axis()
        canon = {t: {n: neurons[t][n].float() / scale for n in names} for t in neurons}
        X = torch.cat([canon[t][n] for t in ("old", "new") for n in names])  # [2N, d_n]
        d_n = X.shape[1]
        latent = cfg.latent_dim or max(1, d_n // 8)
        if cfg.ae == "linear" and latent > d_n:
            raise EditError(f"{self.name}: latent_dim {latent} exceeds the neuron size d_n = {d_n}; a linear "
                            "auto-encoder keeps at most d_n directions")
        ae = make_autoencoder(cfg.ae, d_n, latent=latent, hidden=cfg.ae_hidden).to(X.device)
        params = dict(self.model.named_parameters())
        W0 = {n: params[n].detach() for n in names}
        flags = {n: p.requires_grad for n, p in params.items()}
        tasks = ("old", "new")

        def kl_term(model_ae, task: int) -> torch.Tensor:
            t = tasks[task]
            weights = {n: W0[n] + spec.to_param_layout(from_neurons(model_ae(canon[t][n]) * scale, axis))
                       for n in names}
            return kl_divergence(refs[t], self._answer_logprobs(weights, examples[t]))

        gen = torch.Generator().manual_seed(self.seed)
        try:
            for p in params.values():
                p.requires_grad_(False)
            with torch.no_grad():
                refs = {t: self._answer_logprobs({n: W0[n] + tau[t][n] for n in names}, examples[t]) for t in tasks}
            with torch.enable_grad():
                mse_curve, kl_values = train_autoencoder(
                    ae, X, steps=cfg.ae_steps, lr=cfg.ae_lr, batch_size=cfg.ae_batch_size, kl_every=cfg.ae_kl_every,
                    kl_weight=cfg.ae_kl_weight, kl_term=kl_term, generator=gen)
        finally:
            for n, p in params.items():
                p.requires_grad_(flags[n])
        ae.eval()
        return ae, mse_curve, kl_values

    def edit(self, requests: Sequence[EditRequest]) -> EditResult:
        return self.edit_with_details(requests)[0]

    def edit_with_details(self, requests: Sequence[EditRequest], *, runs: Mapping | None = None
                          ) -> tuple[EditResult, GeoEditDetails]:
        """:meth:`edit`, also returning the intermediate objects (for scripts and reproductions: the AE, the task
        vectors, the fusion).

        ``runs``: the two fine-tunings (``details.runs`` of an earlier call on the SAME requests with the same
        fine-tuning settings), reused instead of fine-tuning again, so variants that differ only after step 1
        (fusion, ablations, auto-encoder) are compared on the same task vectors.

        Raises:
            EditError: ``runs`` does not cover the edited parameters or the neuron axis.
        """
        started, names = self.begin_edit(requests)
        cfg, spec = self.config, self.spec
        axis = cfg.resolved_axis()
        examples = {"old": [self.encode_old(r) for r in requests], "new": [self.encode(r) for r in requests]}
        lora, lr = cfg.adapter_and_lr()
        if runs is not None:
            runs = dict(runs)
            expected = {n: to_neurons(spec.to_canonical(dict(self.model.named_parameters())[n]), axis).shape[0]
                        for n in names}
            for t in ("old", "new"):
                run = runs.get(t)
                if run is None or set(run.deltas) != set(names) or run.importance is None or any(
                        np.shape(run.importance[n]) != (expected[n],) for n in names):
                    raise EditError(f"{self.name}: the given fine-tuning runs do not match this config (parameters "
                                    f"{names}, neuron_axis {axis!r})")
        else:
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
        # one global scale (RMS entry of both task vectors): the AE sees entries of order 1, so the MSE of Eq. 9 is
        # of the order of the KL term instead of ~1e-8 (which let the KL steps swamp the reconstruction)
        scale = float(torch.cat([rows["old"], rows["new"]]).pow(2).mean().sqrt())
        if not scale > 0:
            raise EditError(f"{self.name}: both fine-tunings left the weights unchanged (losses already below "
                            f"early_stop_loss={cfg.early_stop_loss}?)")
        # step 2: auto-encoder (Eq. 7-9), seeded
        ae, mse_curve, kl_values = self.seeded(self._train_ae, tau, neurons, examples, names, scale)
        importance = {t: np.concatenate([runs[t].importance[n] for n in names]) for t in runs}
        n_neurons = rows["old"].shape[0]
        if cfg.fusion == "importance":
            alpha = normalise_importance(importance["old"], cfg.importance_norm)
            beta = normalise_importance(importance["new"], cfg.importance_norm)
        else:
            alpha = np.full(n_neurons, cfg.fixed_alpha)
            beta = np.full(n_neurons, cfg.fixed_beta)
        # step 3: angles, classes and Eq. 11 in the latent space
        geo = geometric_edit(rows["old"], rows["new"], ae, alpha, beta, phi1=cfg.phi1, phi2=cfg.phi2,
                             synergistic=cfg.synergistic, orthogonal=cfg.orthogonal, conflicting=cfg.conflicting,
                             scale=scale)
        with torch.no_grad():
            recon = {t: float((ae.decode(ae.encode(rows[t].float() / scale)).double() * scale - rows[t]).norm()
                              / rows[t].norm().clamp_min(1e-30)) for t in rows}
        deltas, start = {}, 0
        index = np.concatenate([np.full(neurons["old"][n].shape[0], i) for i, n in enumerate(names)])
        for n in names:
            count = neurons["old"][n].shape[0]
            W = from_neurons(geo.tau_edit[start:start + count], axis).to(tau["old"][n].dtype)
            deltas[n] = spec.to_param_layout(W).contiguous()
            start += count
        counts = {c: int((geo.cls == i).sum()) for i, c in enumerate(CLASS_NAMES)}
        norms = {k: float(v.norm()) for k, v in (("tau_old_norm", rows["old"]), ("tau_new_norm", rows["new"]),
                                                  ("tau_edit_norm", geo.tau_edit))}
        info = {**self.delta_info(deltas), "n_requests": len(requests), "n_neurons": int(n_neurons),
                "variant": variant_label(cfg), "class_counts": counts,
                "class_shares": {c: v / max(1, n_neurons) for c, v in counts.items()}, **norms,
                "edit_to_new_norm": norms["tau_edit_norm"] / norms["tau_new_norm"] if norms["tau_new_norm"] > 0
                else math.nan,
                "tau_new_energy_shares": {c: float(rows["new"][geo.cls == i].pow(2).sum()) / max(
                    1e-300, norms["tau_new_norm"] ** 2) for i, c in enumerate(CLASS_NAMES)},
                "alpha_mean": float(np.mean(alpha)), "alpha_median": float(np.median(alpha)),
                "beta_mean": float(np.mean(beta)), "beta_median": float(np.median(beta)),
                "angle_spearman": spearman(geo.latent.cpu().numpy(), geo.raw.cpu().numpy()),
                "ae_recon_rel_error": recon,
                "ae_mse_initial": mse_curve[0] if mse_curve else math.nan,
                "ae_mse_final": mse_curve[-1] if mse_curve else math.nan,
                "ae_kl_final": kl_values[-1] if kl_values else math.nan,
                "latent_dim": int(geo.h_old.shape[1]), "d_n": int(rows["old"].shape[1]), "neuron_axis": axis,
                "old": {k: v for k, v in runs["old"].stats.items() if k != "loss_curve"},
                "new": {k: v for k, v in runs["new"].stats.items() if k != "loss_curve"},
                "tau_new_zero_rows": int((rows["new"].norm(dim=1) == 0).sum())}
        artifacts = {"param_names": list(names), "neuron_axis": axis, "param_index": index,
                     "neuron": np.concatenate([np.arange((index == i).sum()) for i in range(len(names))]),
                     "raw_angle": geo.raw.cpu().numpy(), "latent_angle": geo.latent.cpu().numpy(),
                     "neuron_class": geo.cls.cpu().numpy(), "tau_old_norm": rows["old"].norm(dim=1).cpu().numpy(),
                     "tau_new_norm": rows["new"].norm(dim=1).cpu().numpy(),
                     "tau_edit_norm": geo.tau_edit.norm(dim=1).cpu().numpy(),
                     "importance_old": importance["old"], "importance_new": importance["new"],
                     "alpha": np.asarray(alpha, dtype=np.float64), "beta": np.asarray(beta, dtype=np.float64),
                     "ae_mse_curve": np.asarray(mse_curve), "ae_kl": np.asarray(kl_values),
                     "loss_curve_old": runs["old"].stats["loss_curve"],
                     "loss_curve_new": runs["new"].stats["loss_curve"]}
        result = self._result(deltas=deltas, info=info, artifacts=artifacts, started=started)
        log.info("%s: %d request(s), %s, classes %s, |τ_edit|/|τ_new| %.3g, AE recon %.3g/%.3g, in %.2fs", self.name,
                 len(requests), info["variant"], counts, info["edit_to_new_norm"], recon["old"], recon["new"],
                 result.seconds)
        return result, GeoEditDetails(list(names), rows, scale, ae, runs, geo)


@register(family="fine-tuning", order=145, tiny=TINY_OVERRIDES)
class GeoEditMWEditor(GeoEditEditor):
    """GeoEdit with the paper's '+MW' fusion (Table 2 ablation): the reliable GeoEdit on SmolLM2-135M."""

    name: ClassVar[str] = "geoedit-mw"
    config_cls: ClassVar[type[EditorConfig]] = GeoEditMWConfig
    summary: ClassVar[str] = ("GeoEdit +MW (the paper's Table 2 ablation, not its method): GeoEdit's geometry with "
                              "fixed α 0.3, β 1 for every neuron; edits SmolLM2-135M reliably where importance "
                              "fusion does not")
