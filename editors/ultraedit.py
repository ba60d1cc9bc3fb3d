"""UltraEdit: training-, subject- and memory-free lifelong editing (Gu et al., arXiv 2505.14679, TMLR; authors' code
XiaojieGu/UltraEdit ``editor/ultraedit.py``, ``nets.py``), with StableEdit's options (arXiv 2605.11836; authors'
code MINE-USTC/StableEdit: warm-up and full whitening of the value part).

What one call to :meth:`UltraEditEditor.edit` (a *turn* of n requests) computes, per edited MLP output projection
``down_proj`` of layer l (canonical ``W [d, d_ff]``, SmolLM2: d = 576, d_ff = 1536):

1. **Features** at the answer-predicting positions ``{P-1, ..., P+T-2}`` of every request (prompt of P tokens,
   ``" " + target`` of T tokens): ``h`` = the module's input ``[d_ff]`` and ``g = ∂L/∂y`` = the gradient of the
   loss with respect to the module's output ``[d]``. L is the MEAN cross-entropy over the answer tokens of a chunk of
   ``chunk_size`` requests (the turn is sorted by token length, longest first, then chunked: the authors'
   ``collate_fn``); one backward pass gives g at every edited layer; all chunks see the model as it was before the
   turn. ``z = [h ‖ g]`` ``[d_ff + d]``.
2. **Lifelong normalisation**: running count n, mean μ and sum of squared deviations M2 of every z seen so far,
   merged chunk by chunk with Chan et al.'s exact formula (:meth:`RunningStats.merged`); the turn's features are
   normalised with the statistics AFTER its own chunks were merged: ``ẑ = (z − μ) / (σ + ε)``, ``σ = sqrt(M2/(n−1))``.
   The authors key the normaliser by weight shape, so all down_proj layers share one (``share_stats``) and each
   chunk is merged once per layer.
3. **Pseudo-values** ``v_i = −η ‖k̂_i‖² ĝ_i`` (``ẑ_i = [k̂_i ‖ ĝ_i]``): the output change a gradient step
   ``−η ĝ k̂ᵀ`` would make at k̂ (MALMEN's value difference). The normalised key enters only this scalar.
4. **Ridge solve** on the RAW keys: ``ΔW = Vᵀ H (HᵀH + λI)⁻¹ = Vᵀ (HHᵀ + λI)⁻¹ H`` ``[d, d_ff]``
   (H ``[N, d_ff]``, V ``[N, d]``: the turn's N answer positions), the minimiser of ``‖H ΔWᵀ − V‖² + λ‖ΔW‖²``; every
   layer's ΔW comes from the same pre-turn features and all are returned together.

``normalization="off"`` skips step 2 (``ẑ = z``: the LN ablation of StableEdit Fig. 1a). ``normalization="stable"``
(StableEdit Algorithm 1, its ``nets.py`` ``label="stable"``) also keeps the co-moment C of the value part and
whitens it fully once more than d + 1 samples were pooled: ``ṽ = Σ̂^{-1/2}(g − μ_g)``,
``Σ̂ = (Ψ₀ + C)/(n − d − 1)`` (eigenvalues floored), keys stay diagonal. ``warmup_edits`` > 0 (StableEdit's warm-up)
first edits a disjoint stream (``warmup_data``) in turns of ``warmup_turn``, with diagonal normalisation as the code
does; the warm-up updates the statistics and, with ``warmup_apply``, the weights: its summed ΔW is part of the
FIRST result's deltas (``info["warmup_edits"]``).

Where this differs from the authors' code (each labelled in the config): the exact variance merge (their
``m·x.var(0)`` is the unbiased variance, which inflates the within-chunk term and is NaN for a 1-token chunk;
``chunk_var="ultraedit"`` reproduces it); σ = sqrt(M2/(n−1)) exactly (their ``sqrt(M2/(n−1+eps))`` differs by a
relative 1e-7/n); fp32 throughout (they run the model in bf16); a turn of any size (their ``values_grad`` loader
crashes when the turn is not a multiple of the chunk).

Sequential state lives on the editor instance (two runs never share it): :meth:`edit` computes the merged
statistics without keeping them, :meth:`after_apply` commits them, :meth:`state_dict` / :meth:`load_state_dict`
save and restore them (the run engine stores them with every checkpoint).
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import EditError, Editor, EditorConfig, EditResult, apply_result
from .fields import check_choice, check_indices, check_range, help_meta
from .finetune import right_pad
from .hooks import output_grad_leaves
from .models import LoadedModel
from .registry import register
from .requests import EditRequest

log = logging.getLogger(__name__)

NORMALIZATIONS = ("diag", "off", "stable")
CHUNK_VARS = ("exact", "ultraedit")
#: ε of ẑ = (z − μ)/(σ + ε): float32's machine epsilon (UltraEdit nets.py RunningMeanStd)
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
DEFAULT_WARMUP_DATA = "counterfact:../shared/data/counterfact/counterfact-train.json"
_STATE_FORMAT = 1


# =================================================================================================================
# config
# =================================================================================================================
@dataclass
class UltraEditConfig(EditorConfig):
    """Config of ``ultraedit``. Defaults: the authors' (config/editor/ultraedit.yaml, data/*.yaml); the preset for
    SmolLM2-135M-Instruct (editors/presets/ultraedit.yaml) sets the learning-rate scale measured there."""

    version: ClassVar[int] = 1

    layers: tuple[int, ...] = field(default=(), metadata=help_meta(
        "Decoder layers whose MLP output projection (down_proj) is edited. Empty = the five layers before the last "
        "(SmolLM2-135M: 24-28; the authors edit the last layers but one, e.g. Mistral-7B [29, 30] of 32, GPT-J "
        "[18..26] of 28). Chosen for SmolLM2 among four layer sets: docs/DEFAULTS.md."))
    lr: float = field(default=1e-6, metadata=help_meta(
        "η, the learning-rate scale of the pseudo-values v = −η‖k̂‖²ĝ (authors: 1e-6 for every model; StableEdit "
        "2e-6 for GPT-J / Qwen). On SmolLM2-135M 1e-6 moves nothing; the preset uses the measured value."))
    ridge: float = field(default=1.0, metadata=help_meta(
        "λ of the ridge solve ΔW = Vᵀ H (HᵀH + λI)⁻¹ (authors: 1, hard-coded; StableEdit's run.sh: alpha 10)."))
    normalization: str = field(default="diag", metadata=help_meta(
        "'diag': lifelong normalisation of z = [h ‖ ∇y] by its running mean and standard deviation (UltraEdit); "
        "'off': none, ẑ = z (the ablation of StableEdit Fig. 1a, which collapses); 'stable': StableEdit's full "
        "whitening of the value part ṽ = Σ̂^{-1/2}(g − μ_g) once more than d + 1 samples were pooled (diagonal "
        "before), keys diagonal."))
    share_stats: bool = field(default=True, metadata=help_meta(
        "One normaliser for all edited layers (the authors key it by weight shape, so all down_proj layers share "
        "it and every chunk is merged once per layer). False: one per layer (an ablation)."))
    chunk_size: int = field(default=10, metadata=help_meta(
        "Requests per forward/backward pass; the loss is the mean cross-entropy over a chunk's answer tokens, so "
        "this also sets the gradients' scale (authors: dataset.batch_size 10)."))
    chunk_var: str = field(default="exact", metadata=help_meta(
        "How a chunk's spread enters M2: 'exact' = Σ(x − x̄)² (Chan et al.; StableEdit's code), so the statistics "
        "are those of every feature so far; 'ultraedit' = m·var_unbiased(x) as in the authors' nets.py (inflates "
        "the within-chunk term by m/(m−1); a 1-token chunk adds 0 here, NaN there), for comparison."))
    whiten_floor: float = field(default=1e-6, metadata=help_meta(
        "normalization='stable': floor of the eigenvalues of Σ̂ before Σ̂^{-1/2} (StableEdit code: 1e-6)."))
    whiten_prior: float = field(default=0.0, metadata=help_meta(
        "normalization='stable': Ψ₀ = whiten_prior · I of the Normal-Inverse-Wishart estimate Σ̂ = (Ψ₀ + C)/(n−d−1) "
        "(StableEdit code: 0; the paper's ε₀)."))
    warmup_edits: int = field(default=0, metadata=help_meta(
        "StableEdit's warm-up: before the first turn, edit this many requests of warmup_data (disjoint from the "
        "edited stream), with diagonal normalisation; they update the statistics and, with warmup_apply, the "
        "weights. 0 = off (UltraEdit). StableEdit's configs: 20 turns x 100 (2000)."))
    warmup_data: str = field(default=DEFAULT_WARMUP_DATA, metadata=help_meta(
        "Request source of the warm-up stream (editors.data.load_requests); default the CounterFact train split, "
        "disjoint from counterfact-edit.json."))
    warmup_turn: int = field(default=100, metadata=help_meta(
        "Requests per warm-up turn (StableEdit: n_edits 100)."))
    warmup_apply: bool = field(default=True, metadata=help_meta(
        "Apply the warm-up turns' ΔW to the weights (StableEdit base.py and Algorithm 1: W_t ← W_{t−1} + Δ in both "
        "phases). False: statistics only (our variant)."))

    def validate(self) -> None:
        check_indices("layers", self.layers)
        for name in ("lr", "ridge", "whiten_floor"):
            check_range(name, getattr(self, name), 0, lo_open=True)
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_choice("chunk_var", self.chunk_var, CHUNK_VARS)
        for name in ("chunk_size", "warmup_turn"):
            check_range(name, getattr(self, name), 1)
        for name in ("warmup_edits", "whiten_prior"):
            check_range(name, getattr(self, name), 0)


def edit_layers(cfg: UltraEditConfig, n_layers: int) -> list[int]:
    """The configured layers, or the five before the last; raises EditError when one does not exist."""
    layers = [int(x) for x in cfg.layers] if cfg.layers else list(range(max(0, n_layers - 6), max(1, n_layers - 1)))
    bad = [x for x in layers if x >= n_layers]
    if bad:
        raise EditError(f"ultraedit: layers {bad} do not exist in a {n_layers}-layer model")
    return layers


# =================================================================================================================
# lifelong normalisation: running statistics
# =================================================================================================================
@dataclass(frozen=True)
class RunningStats:
    """Running statistics of the rows z = [h ‖ g] seen so far (float64). Immutable: :meth:`merged` returns a new one.

    Attributes:
        n: rows merged so far.
        mean: μ ``[D]``.
        M2: Σ (z − μ)² per coordinate ``[D]`` (exact under ``chunk_var="exact"``).
        d_key: the size of the key part h (the first ``d_key`` coordinates); the rest is the value part g.
        C: co-moment Σ (g − μ_g)(g − μ_g)ᵀ of the value part ``[D − d_key, D − d_key]``, or None when not kept.
    """

    n: int
    mean: torch.Tensor
    M2: torch.Tensor
    d_key: int
    C: torch.Tensor | None = None

    @classmethod
    def empty(cls, d_key: int, d_value: int, *, comoment: bool = False) -> "RunningStats":
        D = d_key + d_value
        z = torch.zeros(D, dtype=torch.float64)
        return cls(0, z, z.clone(), d_key, torch.zeros(d_value, d_value, dtype=torch.float64) if comoment else None)

    def merged(self, X: torch.Tensor, chunk_var: str = "exact") -> "RunningStats":
        """The statistics after merging the rows of ``X`` ``[m, D]`` (Chan et al.'s parallel update):
        δ = x̄ − μ, n' = n + m, μ' = μ + δ·m/n', M2' = M2 + S + δ²·n·m/n', with S = Σ(x − x̄)² (``"exact"``) or
        m·var_unbiased(x) (``"ultraedit"``, the authors' nets.py; 0 for m = 1). The co-moment merges likewise:
        C' = C + Σ(g − ḡ)(g − ḡ)ᵀ + (n·m/n')·δ_g δ_gᵀ (StableEdit nets.py)."""
        X = X.to(torch.float64)
        m = int(X.shape[0])
        if m == 0:
            return self
        xbar = X.mean(0)
        dev = X - xbar
        if chunk_var == "exact":
            S = (dev * dev).sum(0)
        elif chunk_var == "ultraedit":
            S = m * X.var(0, correction=1) if m > 1 else torch.zeros_like(xbar)
        else:
            raise ValueError(f"unknown chunk_var {chunk_var!r}; valid: {', '.join(CHUNK_VARS)}")
        n_new = self.n + m
        delta = xbar - self.mean
        mean = self.mean + delta * (m / n_new)
        M2 = self.M2 + S + delta * delta * (self.n * m / n_new)
        C = None
        if self.C is not None:
            dg, delta_g = dev[:, self.d_key:], delta[self.d_key:]
            C = self.C + dg.T @ dg + (self.n * m / n_new) * torch.outer(delta_g, delta_g)
        return RunningStats(n_new, mean, M2, self.d_key, C)

    def std(self) -> torch.Tensor:
        """σ = sqrt(M2 / (n − 1)) (0 while n ≤ 1)."""
        if self.n <= 1:
            return torch.zeros_like(self.M2)
        return (self.M2 / (self.n - 1)).clamp_min(0).sqrt()

    def normalize(self, Z: torch.Tensor, eps: float = FLOAT32_EPS) -> torch.Tensor:
        """ẑ = (z − μ) / (σ + ε) for the rows of ``Z`` ``[N, D]`` (float64)."""
        return (Z.to(torch.float64) - self.mean) / (self.std() + eps)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}|n": np.asarray(self.n, dtype=np.int64), f"{prefix}|mean": self.mean.numpy(),
               f"{prefix}|M2": self.M2.numpy(), f"{prefix}|d_key": np.asarray(self.d_key, dtype=np.int64)}
        if self.C is not None:
            out[f"{prefix}|C"] = self.C.numpy()
        return out

    @classmethod
    def from_arrays(cls, d: dict[str, Any], prefix: str) -> "RunningStats":
        C = d.get(f"{prefix}|C")
        return cls(int(np.asarray(d[f"{prefix}|n"])), torch.as_tensor(np.asarray(d[f"{prefix}|mean"]),
                                                                       dtype=torch.float64),
                   torch.as_tensor(np.asarray(d[f"{prefix}|M2"]), dtype=torch.float64),
                   int(np.asarray(d[f"{prefix}|d_key"])),
                   None if C is None else torch.as_tensor(np.asarray(C), dtype=torch.float64))


def whiten_values(G: torch.Tensor, stats: RunningStats, *, floor: float = 1e-6, prior: float = 0.0) -> torch.Tensor:
    """StableEdit's full whitening of the value part: ``Σ̂^{-1/2}(g − μ_g)`` for the rows of ``G`` ``[N, d]``, with
    ``Σ̂ = (prior·I + C)/(n − d − 1)`` and its eigenvalues floored at ``floor``.

    Raises:
        ValueError: the statistics keep no co-moment, or n ≤ d + 1 (the estimate does not exist yet).
    """
    if stats.C is None:
        raise ValueError("whitening needs the co-moment C (normalization='stable')")
    d = stats.C.shape[0]
    if stats.n <= d + 1:
        raise ValueError(f"whitening needs more than d + 1 = {d + 1} samples, have {stats.n}")
    Sigma = (prior * torch.eye(d, dtype=torch.float64) + stats.C) / (stats.n - d - 1)
    evals, Q = torch.linalg.eigh((Sigma + Sigma.T) / 2)
    inv_sqrt = (Q * evals.clamp_min(floor).rsqrt()) @ Q.T
    return (G.to(torch.float64) - stats.mean[stats.d_key:]) @ inv_sqrt


# =================================================================================================================
# pseudo-values and the ridge solve
# =================================================================================================================
def pseudo_values(K_hat: torch.Tensor, G_hat: torch.Tensor, lr: float) -> torch.Tensor:
    """``V = −η ‖k̂_i‖² ĝ_i`` row by row: ``[N, d]`` from normalised keys ``[N, d_ff]`` and values ``[N, d]``."""
    return -lr * (K_hat * K_hat).sum(1, keepdim=True) * G_hat


def ridge_delta(H: torch.Tensor, V: torch.Tensor, lam: float, *, form: str = "auto") -> torch.Tensor:
    """``ΔW = Vᵀ H (HᵀH + λI)⁻¹`` ``[d, d_ff]`` in float64, the minimiser of ``‖H ΔWᵀ − V‖²_F + λ‖ΔW‖²_F``.

    Args:
        H: raw keys ``[N, d_ff]``; V: pseudo-values ``[N, d]``.
        form: "primal" (a ``d_ff × d_ff`` solve), "dual" (``Vᵀ (HHᵀ + λI_N)⁻¹ H``, an ``N × N`` solve; equal by the
            push-through identity) or "auto" (dual when N < d_ff).
    """
    Hd, Vd = H.to(torch.float64), V.to(torch.float64)
    N, d_ff = Hd.shape
    if form == "auto":
        form = "dual" if N < d_ff else "primal"
    if form == "dual":
        A = Hd @ Hd.T + lam * torch.eye(N, dtype=torch.float64, device=Hd.device)
        return torch.linalg.solve(A, Vd).T @ Hd
    if form == "primal":
        A = Hd.T @ Hd + lam * torch.eye(d_ff, dtype=torch.float64, device=Hd.device)
        return torch.linalg.solve(A, Hd.T @ Vd).T  # A symmetric: (Vᵀ H A⁻¹)ᵀ = A⁻¹ Hᵀ V
    raise ValueError(f"unknown form {form!r}; valid: auto, primal, dual")


# =================================================================================================================
# features: keys and output gradients at the answer tokens
# =================================================================================================================
@dataclass
class ChunkFeatures:
    """One chunk's features per edited module: ``H[name] [T, d_ff]``, ``G[name] [T, d]`` (float32) and its mean CE."""

    H: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    loss: float
    n_tokens: int


def _encode(tok, requests: Sequence[EditRequest], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + " " + target[:-1]`` of each request (prompt and target tokenised separately, as
    :func:`analysis.evaluation.encode_pair`); rows / cols of the answer-predicting positions and their labels."""
    seqs, rows, cols, labels = [], [], [], []
    for i, r in enumerate(requests):
        p = tok(r.prompt, add_special_tokens=True)["input_ids"]
        t = tok(" " + r.target_new.strip(), add_special_tokens=False)["input_ids"]
        if not t:
            raise EditError(f"ultraedit: request {r.case_id!r} has an empty target")
        seqs.append(list(p) + list(t[:-1]))
        rows += [i] * len(t)
        cols += [len(p) - 1 + j for j in range(len(t))]
        labels += list(t)
    ids, mask = right_pad(tok, seqs, device)
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return ids, mask, as_t(rows), as_t(cols), as_t(labels)


def chunk_features(lm: LoadedModel, modules: Sequence[str], requests: Sequence[EditRequest]) -> ChunkFeatures:
    """Keys h (module inputs) and g = ∂L/∂y (gradients of the module outputs) at the answer positions of
    ``requests``, L = mean cross-entropy over their answer tokens (UltraEdit util.py ``cross_entropy``). One
    backward pass; gradients flow through every path; logits only at the answer positions. No weight is touched:
    the gradients are those of zero leaves added to the modules' outputs."""
    ids, mask, rows, cols, labels = _encode(lm.tokenizer, requests, lm.device)
    model = lm.model
    with output_grad_leaves(model, modules) as (tr, leaves):
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = model.get_output_embeddings()(hidden[rows, cols]).float()
        loss = F.cross_entropy(logits, labels)
        grads = torch.autograd.grad(loss, [leaves[n] for n in modules])
    H = {n: tr.inputs[n][rows, cols].detach().float() for n in modules}
    G = {n: g[rows, cols].detach().float() for n, g in zip(modules, grads)}
    return ChunkFeatures(H, G, float(loss.detach()), int(labels.numel()))


def token_length(tok, r: EditRequest) -> int:
    return len(tok(r.prompt, add_special_tokens=True)["input_ids"]) + len(
        tok(" " + r.target_new.strip(), add_special_tokens=False)["input_ids"])


def chunks_of(tok, requests: Sequence[EditRequest], size: int) -> list[list[EditRequest]]:
    """The turn sorted by token length, longest first (stable), in chunks of ``size`` (UltraEdit data/base.py)."""
    order = sorted(requests, key=lambda r: -token_length(tok, r))
    return [order[i:i + size] for i in range(0, len(order), size)]


# =================================================================================================================
# the editor
# =================================================================================================================
@dataclass
class _State:
    """What :meth:`UltraEditEditor.after_apply` commits."""

    stats: dict[str, RunningStats]
    turns: int
    warmup_done: bool


@register(family="lifelong", collapse_study=True, order=130, tiny={"layers": (1, 2), "chunk_size": 1})
class UltraEditEditor(Editor):
    name = "ultraedit"
    config_cls = UltraEditConfig
    summary = ("UltraEdit: lifelong normalisation of [h ‖ ∇y] at the answer tokens, pseudo-values −η‖k̂‖²ĝ and one "
               "closed-form ridge solve per layer (no target optimisation; StableEdit warm-up / whitening options)")

    def __init__(self, lm: LoadedModel, config: EditorConfig | None = None, **kw):
        super().__init__(lm, config, **kw)
        self._state = _State({}, 0, False)
        self._pending: tuple[weakref.ref, _State] | None = None

    # ---- sequential state ---------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, RunningStats]:
        """The committed running statistics per group ("shared" or "layer<l>")."""
        return dict(self._state.stats)

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        """Commit the statistics :meth:`edit` computed for ``result`` (nothing when it came from another call)."""
        if self._pending is not None and self._pending[0]() is result:
            self._state = self._pending[1]
            self._pending = None

    def state_dict(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"format": np.asarray(_STATE_FORMAT), "turns": np.asarray(self._state.turns),
                                      "warmup_done": np.asarray(int(self._state.warmup_done)),
                                      "groups": np.asarray(sorted(self._state.stats))}
        for g, s in self._state.stats.items():
            out.update(s.to_arrays(f"stats|{g}"))
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(np.asarray(state.get("format", -1))) != _STATE_FORMAT:
            raise ValueError(f"ultraedit: unknown state format {state.get('format')!r} (expected {_STATE_FORMAT})")
        groups = [str(g) for g in np.asarray(state["groups"]).reshape(-1)]
        self._state = _State({g: RunningStats.from_arrays(state, f"stats|{g}") for g in groups},
                             int(np.asarray(state["turns"])), bool(int(np.asarray(state["warmup_done"]))))
        self._pending = None

    # ---- one turn -----------------------------------------------------------------------------------------
    def _group(self, layer: int) -> str:
        return "shared" if self.config.share_stats else f"layer{layer}"

    def _features(self, modules: Sequence[str], requests: Sequence[EditRequest]) -> list[ChunkFeatures]:
        return [chunk_features(self.lm, modules, c) for c in chunks_of(self.tok, requests, self.config.chunk_size)]

    def _turn(self, stats: dict[str, RunningStats], layers: Sequence[int], modules: Sequence[str],
              feats: Sequence[ChunkFeatures], normalization: str
              ) -> tuple[dict[str, RunningStats], dict[int, torch.Tensor], dict[str, Any]]:
        """Merge the turn's chunks into ``stats`` (a new dict), normalise, and solve every layer.
        Returns (statistics after the turn, ``{layer: ΔW [d, d_ff] float64}``, per-layer info)."""
        cfg = self.config
        stats = dict(stats)
        for ch in feats:  # every chunk once per layer (into the shared group when share_stats)
            for layer, m in zip(layers, modules):
                g = self._group(layer)
                if g not in stats:
                    stats[g] = RunningStats.empty(ch.H[m].shape[1], ch.G[m].shape[1],
                                                  comoment=cfg.normalization == "stable")
                stats[g] = stats[g].merged(torch.cat([ch.H[m], ch.G[m]], 1), cfg.chunk_var)
        deltas, info = {}, {}
        for layer, m in zip(layers, modules):
            H = torch.cat([ch.H[m] for ch in feats]).to(torch.float64)
            G = torch.cat([ch.G[m] for ch in feats]).to(torch.float64)
            s = stats[self._group(layer)]
            if normalization == "off":
                K_hat, G_hat = H, G
            else:
                Z_hat = s.normalize(torch.cat([H, G], 1))
                K_hat, G_hat = Z_hat[:, :H.shape[1]], Z_hat[:, H.shape[1]:]
                if normalization == "stable" and s.n > G.shape[1] + 1:
                    G_hat = whiten_values(G, s, floor=cfg.whiten_floor, prior=cfg.whiten_prior)
            V = pseudo_values(K_hat, G_hat, cfg.lr)
            t0 = time.perf_counter()
            D = ridge_delta(H, V, cfg.ridge)
            fit = (H @ D.T - V).norm() / V.norm().clamp_min(1e-300)
            deltas[layer] = D
            info[str(layer)] = {"n_tokens": int(H.shape[0]), "key_hat_sq": float((K_hat * K_hat).sum(1).mean()),
                                "value_hat_norm": float(G_hat.norm(dim=1).mean()), "V_norm": float(V.norm()),
                                "delta_norm": float(D.norm()), "fit_error": float(fit),
                                "whitened": float(normalization == "stable" and s.n > G.shape[1] + 1),
                                "seconds_solve": time.perf_counter() - t0}
        return stats, deltas, info

    def _warmup_requests(self) -> list[EditRequest]:
        from .data import load_requests  # only when a warm-up is configured
        reqs = load_requests(self.config.warmup_data, self.config.warmup_edits)
        if len(reqs) < self.config.warmup_edits:
            raise EditError(f"ultraedit: warmup_data {self.config.warmup_data!r} has {len(reqs)} requests, "
                            f"warmup_edits asks for {self.config.warmup_edits}")
        return reqs

    def edit(self, requests: Sequence[EditRequest]) -> EditResult:
        started = time.perf_counter()
        if not requests:
            raise EditError("ultraedit: no requests to edit")
        cfg, spec = self.config, self.spec
        layers = edit_layers(cfg, spec.n_layers)
        modules = [spec.mlp_out_module(i) for i in layers]
        names = [spec.mlp_out_weight(i) for i in layers]
        params = dict(self.model.named_parameters())
        stats = dict(self._state.stats)
        total = {layer: torch.zeros(spec.to_canonical(params[n]).shape, dtype=torch.float64)
                 for layer, n in zip(layers, names)}
        info: dict[str, Any] = {"n_requests": len(requests), "layers": list(layers)}
        undo = None
        t_feat = 0.0
        try:
            if cfg.warmup_edits and not self._state.warmup_done:
                t0 = time.perf_counter()
                warm = self._warmup_requests()
                for i in range(0, len(warm), cfg.warmup_turn):
                    feats = self._features(modules, warm[i:i + cfg.warmup_turn])
                    stats, D, _ = self._turn(stats, layers, modules, feats, "diag" if cfg.normalization != "off"
                                             else "off")
                    if cfg.warmup_apply:
                        step = self._as_result({n: D[layer] for layer, n in zip(layers, names)})
                        u = apply_result(self.lm, step, keep_undo=undo is None)
                        undo = undo or u
                        for layer in layers:
                            total[layer] += D[layer]
                info.update({"warmup_edits": len(warm), "warmup_seconds": time.perf_counter() - t0,
                             "warmup_delta_norm": {str(k): float(v.norm()) for k, v in total.items()}})
            t0 = time.perf_counter()
            feats = self._features(modules, requests)
            t_feat = time.perf_counter() - t0
            stats, D, layer_info = self._turn(stats, layers, modules, feats, cfg.normalization)
        finally:
            if undo is not None:
                undo(self.model)
        deltas = {}
        for layer, n in zip(layers, names):
            d = total[layer] + D[layer]
            if not torch.isfinite(d).all():
                raise EditError(f"ultraedit: the update of {n} is not finite (NaN/Inf)")
            W = params[n]
            deltas[n] = spec.to_param_layout(d.to(torch.float32)).to(W.dtype).contiguous()
            layer_info[str(layer)]["delta_rel"] = float(d.norm() / W.detach().double().norm().clamp_min(1e-300))
        n_tokens = sum(ch.n_tokens for ch in feats)
        info.update({"n_tokens": n_tokens, "loss_initial": sum(ch.loss * ch.n_tokens for ch in feats) / n_tokens,
                     "n_chunks": len(feats), "stats_n": {g: s.n for g, s in stats.items()},
                     "turn": self._state.turns + 1, "seconds_features": t_feat, "layer": layer_info})
        result = self._result(deltas=deltas, info=info, started=started)
        self._pending = (weakref.ref(result), _State(stats, self._state.turns + 1, True))
        return result

    def _as_result(self, deltas64: dict[str, torch.Tensor]) -> EditResult:
        params = dict(self.model.named_parameters())
        return EditResult(self.name, deltas={n: self.spec.to_param_layout(d.to(torch.float32)).to(params[n].dtype)
                                             .contiguous() for n, d in deltas64.items()})


__all__ = ["UltraEditConfig", "UltraEditEditor", "RunningStats", "ChunkFeatures", "chunk_features", "chunks_of",
           "pseudo_values", "ridge_delta", "whiten_values", "edit_layers", "NORMALIZATIONS",
           "CHUNK_VARS", "FLOAT32_EPS", "DEFAULT_WARMUP_DATA"]
