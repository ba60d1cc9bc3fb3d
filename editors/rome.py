"""ROME: Rank-One Model Editing (Meng et al., NeurIPS 2022, "Locating and Editing Factual Associations in GPT").

One request, one rank-one update of one MLP output projection W (``[d_out, d_in]`` canonical, METHODS.md section 1):

    k*  = mean over context templates of the projection's input at the subject's last token  (compute_u)
    v*  = the MLP output at that token that makes the model say the new target                (compute_v, 0.4)
    u   = C^{-1} k*  (mom2_adjustment)   or   k*  (no adjustment; the Llama hparams' choice)
    ΔW  = (v* - W k* - b) uᵀ / (uᵀ k*)                                                         (paper, Eq. 2)

so that ``(W + ΔW) k* + b = v*`` exactly (``b`` is the projection's bias, GPT-2 only): ``value_key = "mean"``.
The reference code (kmeng01/rome ``compute_v``, EasyEdit) instead writes v* for the key of the un-prefixed prompt,
``k_clean``: ΔW = (v* - W k_clean - b) uᵀ / (uᵀ k_clean), so that (W + ΔW) k_clean + b = v*. That is the default
(``value_key = "prompt"``): on SmolLM2-135M, CounterFact edits 9, 11 and 14 scored reliability 0 with the paper's form
(the prompt's own log-probability of the target only -1.1 to -6.4) and 1 with the reference form (-0.03 to -0.15),
and rephrases gained 2-3 nats. Several requests in one call are edited one after the other on the temporarily
updated model (each sees the previous ones, as ROME's sequential use does); the model is restored at the end and the
sum of the rank-one updates is returned.

The expensive step is v*; see :mod:`editors.targets` for how it is computed quickly.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .base import EditError, Editor, EditorConfig, EditResult, add_update_, finite_or_raise, math_dtype, relative_norm
from .fields import check_choice, check_range, help_meta
from .keys import compute_keys
from .registry import register
from .requests import EditRequest
from .stats import DEFAULT_MOM2_TOKENS, float64_device, layer_covariance
from .targets import compute_target_values
from .templates import check_template_source, resolve_context_templates

log = logging.getLogger(__name__)

VALUE_KEYS = ("mean", "prompt")


@dataclass
class ROMEConfig(EditorConfig):
    """ROME hyper-parameters. Defaults are for SmolLM2-135M (30 layers, d=576, d_ff=1536), mapped from the Llama-3-8B
    ROME hparams (jianghoucheng/AlphaEdit hparams/ROME/Llama3-8B.json, EasyEdit llama3.2-3b.yaml; METHODS.md
    section 13) and checked on the default model: see ``editors/presets/rome.yaml`` for the measured choice."""

    version = 3  # v3: early_stop_prob 0 by default (the reference's stop only)

    layer: int = field(default=5, metadata=help_meta(
        "Decoder layer whose MLP output projection (down_proj / c_proj) is edited (0-based). ROME edits one early-"
        "middle MLP found by causal tracing (GPT-2 XL: 17 of 48; Llama-3-8B: 5 of 32); 5 of SmolLM2's 30 layers "
        "(METHODS.md 13; how it was chosen: docs/DEFAULTS.md)."))
    v_num_grad_steps: int = field(default=20, metadata=help_meta(
        "Most forward passes of the v* optimisation (ROME v_num_grad_steps: 20 for GPT-2 XL, 25 for Llama-3-8B; "
        "the last pass only measures). It usually stops earlier, at loss < early_stop_loss."))
    v_lr: float = field(default=0.5, metadata=help_meta("Adam learning rate of the v* optimisation (ROME v_lr 0.5)."))
    v_weight_decay: float = field(default=1e-3, metadata=help_meta(
        "Weight of ||delta|| / ||v_init||^2 in the v* loss (ROME v_weight_decay: 0.5 GPT-2 XL, 1e-3 Llama-3-8B)."))
    clamp_norm_factor: float = field(default=4.0, metadata=help_meta(
        "After each step ||delta|| is clamped to clamp_norm_factor * ||v_init|| (ROME clamp_norm_factor 4)."))
    kl_factor: float = field(default=0.0625, metadata=help_meta(
        "Weight of KL(p_now || p_init) at the subject's last token of '{subject} is a' (ROME kl_factor 0.0625): "
        "keeps the subject's other properties (essence drift)."))
    v_loss_layer: int = field(default=-1, metadata=help_meta(
        "Layer whose output gives the logits of the v* loss through the final norm and unembedding (ROME "
        "v_loss_layer = n_layers - 1); -1 means the last layer."))
    early_stop_loss: float = field(default=5e-2, metadata=help_meta(
        "The v* optimisation stops once its loss (nll + kl + weight decay) is below this (ROME compute_v: 5e-2)."))
    early_stop_prob: float = field(default=0.0, metadata=help_meta(
        "If > 0, the v* optimisation also stops once the mean target probability over the rewriting prompts "
        "(geometric mean over target tokens) reaches this. Not in ROME (the reference stops only at loss < "
        "early_stop_loss); 0, the default, disables it. Measured over 30 sequential CounterFact edits "
        "(docs/DEFAULTS.md, docs/reference_agreement.md): 0.95 saves 22% of the CPU time per edit and keeps "
        "locality higher (0.83 vs 0.78) but loses generality (0.28 vs 0.38) and reliability (0.93 vs 0.95), and "
        "moves ΔW away from the reference's (cos 0.987, ||ΔW_ref||/||ΔW|| 1.22 on the reference's templates)."))
    mom2_adjustment: bool = field(default=False, metadata=help_meta(
        "Use u = C^{-1} k* (ROME paper Eq. 2, C = E[k kᵀ] over a text corpus) instead of u = k*. The Llama ROME "
        "hparams (AlphaEdit Llama3-8B.json, EasyEdit llama3.2-3b.yaml) turn it off; see the preset for SmolLM2."))
    mom2_n_tokens: int = field(default=DEFAULT_MOM2_TOKENS, metadata=help_meta(
        "Tokens of the covariance sample when mom2_adjustment is on (ROME: 100k Wikipedia articles; here a "
        "smaller offline corpus, editors.stats.layer_covariances)."))
    corpus: str = field(default="builtin", metadata=help_meta(
        "Covariance corpus: 'builtin' (the English prose of Python's pydoc topics, always available offline) or the "
        "path of a UTF-8 text file."))
    context_templates: str | list = field(default="rome", metadata=help_meta(
        "Context templates averaged for k* and used as rewriting prompts for v* (editors.templates."
        "resolve_context_templates). A spec of templates to sample: 'rome' = '{}' + 10 sampled prefixes of 5 "
        "tokens + 10 of 10 tokens (ROME / EasyEdit ROME, 21 prompts; the sampled text differs from EasyEdit's, "
        "whose draws are not seeded), 'memit' = '{}' + 5 of 10 tokens (6 prompts, about 3x faster), or "
        "'length:n_gen,...'. Or the templates themselves: a list of '{}'-strings, the same as a JSON string, or "
        "the path of a .json file (a list, or an object with a 'context_templates' list such as "
        "../shared/reference/rome_easyedit_cf0.json) or a text file with one template per line. k* is their "
        "plain mean (ROME compute_u); groups are flattened."))
    value_key: str = field(default="prompt", metadata=help_meta(
        "Key the closed form writes v* for: 'prompt' = the key of the un-prefixed prompt (kmeng01/rome and "
        "EasyEdit compute_v's right vector; the default: it makes the edited prompt itself say the target); "
        "'mean' = the template-averaged k* (ROME paper Eq. 2, (W+ΔW)k* = v*)."))
    fast: bool = field(default=True, metadata=help_meta(
        "Compute v* with the cached, subject-aligned forward of editors.targets (same numbers as the plain "
        "forward up to float rounding, several times faster); False runs the plain reference loop."))

    def validate(self) -> None:
        check_range("layer", self.layer, 0)
        check_range("v_num_grad_steps", self.v_num_grad_steps, 1)
        for name in ("v_lr", "clamp_norm_factor"):
            check_range(name, getattr(self, name), 0, lo_open=True)
        check_range("early_stop_prob", self.early_stop_prob, 0, 1)
        for name in ("v_weight_decay", "kl_factor", "early_stop_loss"):
            check_range(name, getattr(self, name), 0)
        check_range("mom2_n_tokens", self.mom2_n_tokens, 1)
        check_choice("value_key", self.value_key, VALUE_KEYS)
        check_template_source(self.context_templates)


@register(family="locate-then-edit", collapse_study=True, order=10,
          tiny={"layer": 1, "v_num_grad_steps": 2, "mom2_n_tokens": 2000})
class ROMEEditor(Editor):
    """Rank-one edit of one MLP output projection per request (see the module docstring)."""

    name = "rome"
    config_cls = ROMEConfig
    summary = "ROME: rank-one update of one MLP output projection (Meng et al. 2022)"

    def __init__(self, lm, config=None, *, cache_dir=None, seed=0):
        super().__init__(lm, config, cache_dir=cache_dir, seed=seed)
        self.templates: list[str] | None = None
        self._C_lu: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Context templates and (with mom2_adjustment) the LU factors of C, both from the unedited model."""
        cfg: ROMEConfig = self.config  # type: ignore[assignment]
        if cfg.layer >= self.spec.n_layers:
            raise EditError(f"rome: layer {cfg.layer} does not exist (the model has {self.spec.n_layers} layers)")
        if self.templates is None:
            groups = resolve_context_templates(self.lm, cfg.context_templates, self.seed, cache_dir=self.cache_dir)
            self.templates = [t for g in groups for t in g]
        if cfg.mom2_adjustment and self._C_lu is None:
            C = layer_covariance(self.lm, cfg.layer, corpus=cfg.corpus, n_tokens=cfg.mom2_n_tokens,
                                        cache_dir=self.cache_dir, dtype=torch.float64)
            self._C_lu = torch.linalg.lu_factor(C)

    def edit(self, requests: Sequence[EditRequest]) -> EditResult:
        started = time.perf_counter()
        cfg: ROMEConfig = self.config  # type: ignore[assignment]
        self.prepare()
        if not requests:
            raise EditError("rome: no requests")
        spec, layer = self.spec, cfg.layer
        name = spec.mlp_out_weight(layer)
        param = dict(self.model.named_parameters())[name]
        module = self.model.get_submodule(spec.mlp_out_module(layer))
        bias = getattr(module, "bias", None)
        saved = param.detach().clone()
        W0 = spec.to_canonical(saved).float()
        total = torch.zeros_like(W0)
        per_request, keys, values = [], [], []
        try:
            for req in requests:
                rec = self._edit_one(req, param, bias)
                dW = rec.pop("delta")
                keys.append(rec.pop("key"))
                values.append(rec.pop("value"))
                add_update_(param, spec.to_param_layout(dW))
                total += dW
                per_request.append(rec)
        except FloatingPointError as exc:
            raise EditError(f"rome: {exc}") from exc
        finally:
            with torch.no_grad():
                param.copy_(saved)
        finite_or_raise(self.name, "ΔW", total)
        rank = 1 if len(requests) == 1 else int(torch.linalg.matrix_rank(total.double(), rtol=1e-5).item())
        info = {
            "layer": layer,
            "param": name,
            "rank": rank,
            "delta_norm": total.norm().item(),
            "delta_rel_norm": relative_norm(total, W0),
            "target_prob": sum(r["target_prob"] for r in per_request) / len(per_request),
            "steps": sum(r["steps"] for r in per_request) / len(per_request),
            "loss": sum(r["loss"] for r in per_request) / len(per_request),
            "requests": per_request,
        }
        delta = spec.to_param_layout(total).contiguous().to(math_dtype(param.dtype))  # rounded once, when applied
        # k (the key v* is written for) and v* per request, for the analysis layer and the closed-form check
        artifacts = {"keys": torch.stack(keys), "values": torch.stack(values)}
        return self._result(deltas={name: delta}, info=info, artifacts=artifacts, started=started)

    # ------------------------------------------------------------------------------------------------------------
    def _edit_one(self, req: EditRequest, param: torch.Tensor, bias: torch.Tensor | None) -> dict:
        """ΔW for one request on the model as it is now, ``[d_out, d_in]`` canonical, plus diagnostics."""
        cfg: ROMEConfig = self.config  # type: ignore[assignment]
        t0 = time.perf_counter()
        k_star = compute_keys(self.lm, cfg.layer, [req], self.templates)[0]  # [d_ff]
        t_keys = time.perf_counter() - t0
        Z, zinfo = compute_target_values(
            self.lm, [req], cfg.layer, site="mlp_out", templates=self.templates, steps=cfg.v_num_grad_steps,
            lr=cfg.v_lr, weight_decay=cfg.v_weight_decay, clamp_norm_factor=cfg.clamp_norm_factor,
            kl_factor=cfg.kl_factor, loss_layer=cfg.v_loss_layer, early_stop_loss=cfg.early_stop_loss,
            early_stop_prob=cfg.early_stop_prob or None, fast=cfg.fast)
        v_star = Z[0]  # [d]
        t_values = zinfo["seconds"][0]
        k = k_star if cfg.value_key == "mean" else compute_keys(self.lm, cfg.layer, [req], ["{}"])[0]
        dev = float64_device(self.lm.device)
        with torch.no_grad():
            W = self.spec.to_canonical(param.detach()).to(dev, torch.float64)  # [d_out, d_in]
            k64, ks64 = k.to(dev, torch.float64), k_star.to(dev, torch.float64)
            u = torch.linalg.lu_solve(*self._C_lu, ks64[:, None])[:, 0] if cfg.mom2_adjustment else ks64  # [d_in]
            denom = u @ k64
            if not torch.isfinite(denom) or denom.abs() < 1e-12:
                raise EditError(f"rome: uᵀk = {denom.item():.3g} for {req.case_id!r}; the update is undefined")
            out = W @ k64 + (bias.detach().to(dev, torch.float64) if bias is not None else 0.0)
            right = (v_star.to(dev, torch.float64) - out) / denom  # [d_out]
            dW = torch.outer(right, u).to(self.lm.device, torch.float32)
        return {
            "delta": dW,
            "key": k.detach().float(),
            "value": v_star.detach().float(),
            "case_id": req.case_id,
            "steps": zinfo["steps"][0],
            "loss": zinfo["loss"][0],
            "nll": zinfo["nll"][0],
            "kl": zinfo["kl"][0],
            "target_prob": zinfo["target_prob"][0],
            "delta_v_norm": zinfo["delta_norm"][0],
            "v_init_norm": zinfo["init_norm"][0],
            "k_norm": k_star.norm().item(),
            "seconds_keys": t_keys,
            "seconds_values": t_values,
        }
