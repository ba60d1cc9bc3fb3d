"""The batched multi-layer update of the MEMIT family (MEMIT, PMET, EMMET, AlphaEdit; reused by AdaEdit).

One call edits the MLP output projection ``W_l`` (canonical ``[d, d_ff]``) of every layer in ``layers`` for a batch
of ``n`` requests (kmeng01/memit ``execute_memit``; guides METHODS.md sections 2-5):

1. targets ``Z [n, d]`` are optimised once, at the LAST edit layer ``L = layers[-1]`` (METHODS.md 0.4), either on the
   residual stream (``site="residual"``: MEMIT, EMMET, AlphaEdit) or on the MLP output (``site="mlp_out"``: PMET's
   FFN-only variant, AdaEdit);
2. for each edit layer ``l_i`` in ascending order, on the model as it is NOW (the updates of ``l_0 .. l_{i-1}`` of
   this call are in place):

   * ``K [d_ff, n]`` = keys of ``l_i`` (input of its MLP output projection at the subject's last token, averaged
     over the context-template groups, MEMIT ``compute_ks``);
   * ``R = spread(Z - current values at L)`` ``[d, n]``: ``current values`` are read at the target site of ``L``
     on the bare prompt (MEMIT ``cur_zs``), ``spread`` divides by ``len(layers) - i`` (MEMIT, "linear") or by its
     square root (PMET, "sqrt");
   * ``delta_l = solve(K, R, state)`` ``[d, d_ff]`` -- the method's closed form, computed in ``solve_dtype``
     (float64 for MEMIT / EMMET / PMET, float32 for AlphaEdit);
   * ``W_l <- W_l + delta_l`` temporarily, so that the keys and residuals of the layers above see it;
3. every touched weight is put back bit for bit (also on errors) and the deltas are returned in the parameters'
   own layout: applying them with :func:`editors.base.apply_result` reproduces exactly the weights this call used.

The solve is pluggable: ``solve(K, R, state) -> delta`` with ``state`` a :class:`LayerState` (the layer, its
position, the current weight, the covariance in the solve dtype, method-specific statistics in ``extra`` and an
``info`` dict the solve may fill). Plain closed forms live in the method modules (``memit_solve``,
``emmet_solve``, ``alphaedit_solve``); :class:`MultiLayerEditor` is the abstract editor that wires configs,
covariances, templates and sequential key statistics around :func:`multilayer_update`.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from .base import EditError, Editor, EditorConfig, EditResult, add_update_, math_dtype
from .fields import check_choice, check_range, help_meta
from .keys import compute_keys, current_values
from .requests import EditRequest
from .stats import DEFAULT_MOM2_TOKENS, layer_covariances
from .targets import compute_target_values, target_value_summary
from .templates import as_template_groups, check_template_source, resolve_context_templates

log = logging.getLogger(__name__)

SITES = ("residual", "mlp_out")
SPREADS = ("linear", "sqrt")
#: the registry's ``tiny`` overrides of the layer loop (one edit on the 4-layer models of editors.testing in
#: seconds): edit layers 1-2, a small covariance sample, two target steps; the MEMIT family's methods use them
TINY_OVERRIDES = MappingProxyType({"layers": (1, 2), "mom2_n_tokens": 2000, "v_num_grad_steps": 2})


# =================================================================================================================
# the generic update
# =================================================================================================================
@dataclass
class LayerState:
    """What a solve sees for one edit layer.

    Attributes:
        layer: model layer index ``l_i``.
        position: ``i``, the layer's position among the edit layers (0-based).
        n_edit_layers: ``len(layers)``.
        W: the layer's current weight, canonical ``[d, d_ff]`` fp32 (read only).
        C: the layer's covariance ``E[k kᵀ]`` ``[d_ff, d_ff]`` in the solve dtype, or None when none was given.
        extra: method-specific per-layer statistics (e.g. accumulated ``K_p K_pᵀ``, a projector ``P``).
        info: scalars the solve wants recorded for this layer (merged into the result's per-layer info).
    """

    layer: int
    position: int
    n_edit_layers: int
    W: torch.Tensor
    C: torch.Tensor | None
    extra: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


#: ``solve(K [d_ff, n], R [d, n], state) -> delta [d, d_ff]`` (canonical orientation)
Solve = Callable[[torch.Tensor, torch.Tensor, LayerState], torch.Tensor]


@dataclass
class MultiLayerOutput:
    """What :func:`multilayer_update` computed.

    Attributes:
        deltas: parameter name -> update in the parameter's layout (fp32), ``W <- W + delta``.
        canonical: layer -> the same update, canonical ``[d, d_ff]`` (fp32).
        keys: layer -> ``K [d_ff, n]`` used in that layer's solve (fp32; on the partly edited model).
        Z: the targets ``[n, d]`` at the target site of the last edit layer.
        info: ``{"layers": {str(layer): {...}}, "z": {...}, "residual_final": ..., ...}`` (JSON-friendly).
    """

    deltas: dict[str, torch.Tensor]
    canonical: dict[int, torch.Tensor]
    keys: dict[int, torch.Tensor]
    Z: torch.Tensor
    info: dict[str, Any]


def spread_residual(R: torch.Tensor, i: int, n_layers: int, mode: str = "linear") -> torch.Tensor:
    """The share of residual ``R`` (``[n, d]`` or ``[d, n]``) that layer ``i`` of ``n_layers`` edited layers takes.

    MEMIT (memit_main.py): ``R / (n_layers - i)`` ("linear": the remaining residual is split evenly over the layers
    still to edit); PMET: ``R / sqrt(n_layers - i)`` ("sqrt").
    """
    if not 0 <= i < n_layers:
        raise ValueError(f"layer position {i} out of range for {n_layers} layers")
    remaining = n_layers - i
    if mode == "linear":
        return R / remaining
    if mode == "sqrt":
        return R / math.sqrt(remaining)
    raise ValueError(f"unknown spread mode {mode!r}; valid: linear, sqrt")




def check_layers(layers: Sequence[int], n_model_layers: int | None = None) -> tuple[int, ...]:
    """Validate edit layers: non-empty, strictly ascending, non-negative (and < ``n_model_layers`` when given)."""
    out = tuple(int(x) for x in layers)
    if not out:
        raise ValueError("layers must name at least one layer")
    if any(x < 0 for x in out):
        raise ValueError(f"layers must be non-negative, got {out}")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"layers must be strictly ascending (the targets live at the last one), got {out}")
    if n_model_layers is not None and out[-1] >= n_model_layers:
        raise ValueError(f"layer {out[-1]} out of range: the model has {n_model_layers} layers "
                         f"(0..{n_model_layers - 1})")
    return out


def _mean_col_norm(X: torch.Tensor) -> float:
    return float(X.double().norm(dim=0).mean()) if X.numel() else 0.0


def multilayer_update(lm, requests: Sequence[EditRequest], layers: Sequence[int], solve: Solve, *,
                      covariances: Mapping[int, torch.Tensor] | None = None,
                      extra: Mapping[int, dict] | None = None,
                      site: str = "residual", spread: str = "linear", templates=("{}",),
                      solve_dtype: torch.dtype = torch.float64, z_kwargs: Mapping[str, Any] | None = None,
                      Z: torch.Tensor | None = None, final_residual: bool = True,
                      residual_site: str | None = None) -> MultiLayerOutput:
    """MEMIT-style batched update of several layers' MLP output projections (module docstring).

    Args:
        lm: the model (left exactly as found).
        requests: the batch (``n >= 1``).
        layers: edit layers, strictly ascending; the targets live at ``layers[-1]``.
        solve: the method's closed form ``solve(K [d_ff, n], R [d, n], state) -> delta [d, d_ff]``.
        covariances: layer -> ``C [d_ff, d_ff]`` (any dtype; handed to the solve in ``solve_dtype``).
        extra: layer -> method statistics put in ``state.extra`` (not copied; tensors should already be in
            ``solve_dtype`` on ``lm.device``).
        site: where the targets live: "residual" (decoder layer output) or "mlp_out" (MLP output).
        spread: "linear" (MEMIT: ``R / (len(layers) - i)``) or "sqrt" (PMET: ``R / sqrt(len(layers) - i)``).
        templates: context-template groups (``[["{}"], [...]]``) or a flat list: keys are averaged within groups
            then over groups; the z optimisation uses them all, flattened.
        solve_dtype: dtype of ``K``, ``R`` and ``C`` handed to the solve.
        z_kwargs: keyword arguments of :func:`editors.targets.compute_target_values` (steps, lr, weight_decay,
            clamp_norm_factor, kl_factor, loss_layer, early_stop_loss, ...).
        Z: precomputed targets ``[n, d]`` (skips the z optimisation; tests and methods that reuse targets).
        final_residual: also measure the residual left at the target site after every layer was updated.
        residual_site: where the residual ``Z - current`` of the layer loop is measured (None = ``site``). With
            ``site="mlp_out"`` and ``residual_site="residual"`` the target change ``δ = Z - v_init`` found at the
            last layer's MLP output is carried to the residual stream (writing δ at the MLP output of L adds δ to
            the stream after L): ``Z_res = h_L(before this call) + δ``, and every layer's residual is
            ``Z_res - h_L(now)``. Then the growth of L's MLP output caused by editing the layers below it (their
            edits also change L's input) is not asked of the layers again (AdaEdit option ``residual_site``).

    Raises:
        EditError: a solve returned the wrong shape or non-finite values.
    """
    if site not in SITES:
        raise ValueError(f"unknown target site {site!r}; valid: {', '.join(SITES)}")
    if spread not in SPREADS:
        raise ValueError(f"unknown spread {spread!r}; valid: {', '.join(SPREADS)}")
    residual_site = site if residual_site is None else residual_site
    if residual_site not in SITES:
        raise ValueError(f"unknown residual site {residual_site!r}; valid: {', '.join(SITES)}")
    requests = list(requests)
    if not requests:
        raise ValueError("multilayer_update needs at least one request")
    spec, model = lm.spec, lm.model
    layers = check_layers(layers, spec.n_layers)
    L = layers[-1]
    n = len(requests)
    groups = as_template_groups(templates)
    flat = [t for g in groups for t in g]
    info: dict[str, Any] = {"n_requests": n, "edit_layers": list(layers), "target_layer": L, "site": site,
                            "spread": spread, "residual_site": residual_site}

    t0 = time.perf_counter()
    v_init = None
    if Z is None:
        Z, z_info = compute_target_values(lm, requests, L, site=site, templates=flat, **dict(z_kwargs or {}))
        v_init = z_info.get("init")
        info["z"] = target_value_summary(z_info)
        # top-level means, named as ROME's info (benchmarks/bench_editors.py reads these)
        info["target_prob"] = info["z"].get("target_prob_mean")
        info["steps"] = info["z"].get("steps_mean")
    else:
        Z = Z.to(lm.device, torch.float32)
        if tuple(Z.shape) != (n, spec.hidden_size):
            raise ValueError(f"Z must be [{n}, {spec.hidden_size}], got {tuple(Z.shape)}")
        info["z"] = {"given": True}
    info["seconds_z"] = time.perf_counter() - t0
    Z = Z.detach()
    if residual_site != site:  # carry δ = Z - v_init from `site` to `residual_site` (docstring)
        if v_init is None:
            v_init = current_values(lm, L, requests, site=site)
        Z = (current_values(lm, L, requests, site=residual_site) + (Z - v_init.to(Z.device, Z.dtype))).detach()

    params = dict(model.named_parameters())
    names = {layer: spec.mlp_out_weight(layer) for layer in layers}
    saved = {layer: params[names[layer]].detach().clone() for layer in layers}
    deltas: dict[str, torch.Tensor] = {}
    canonical: dict[int, torch.Tensor] = {}
    keys: dict[int, torch.Tensor] = {}
    per_layer: dict[str, dict] = {}
    t1 = time.perf_counter()
    try:
        for i, layer in enumerate(layers):
            K = compute_keys(lm, layer, requests, groups).T  # [d_ff, n]
            cur = current_values(lm, L, requests, site=residual_site).T  # [d, n], bare prompt (MEMIT cur_zs)
            R_total = Z.T - cur
            R = spread_residual(R_total, i, len(layers), spread)
            W = spec.to_canonical(params[names[layer]].detach())
            W = W.to(math_dtype(W.dtype))  # the solve sees fp32 (fp64) weights, also of a half-precision model
            C = covariances.get(layer) if covariances is not None else None
            state = LayerState(layer=layer, position=i, n_edit_layers=len(layers), W=W,
                               C=None if C is None else C.to(lm.device, solve_dtype),
                               extra=dict((extra or {}).get(layer, {})))
            Kd, Rd = K.to(solve_dtype), R.to(solve_dtype)
            delta = solve(Kd, Rd, state)
            if tuple(delta.shape) != tuple(W.shape):
                raise EditError(f"solve for layer {layer} returned shape {tuple(delta.shape)}, "
                                f"expected {tuple(W.shape)} (canonical [d_out, d_in])")
            if not torch.isfinite(delta).all():
                raise EditError(f"the update of layer {layer} is not finite (ill-conditioned solve?)")
            fit = (delta.to(solve_dtype) @ Kd - Rd).norm() / Rd.norm().clamp_min(1e-30)
            d32 = delta.detach().to(torch.float32)
            w0_norm = float(saved[layer].double().norm())
            per_layer[str(layer)] = {
                "position": i,
                "residual_norm": _mean_col_norm(R_total),  # mean over requests of ||z - current||
                "spread_norm": _mean_col_norm(R),  # the share this layer is asked to write
                "key_norm": _mean_col_norm(K),
                "fit_error": float(fit),  # ||dW K - R|| / ||R||: how much of its share the layer did not write
                "delta_norm": float(d32.double().norm()),
                "rel_delta_norm": float(d32.double().norm()) / w0_norm if w0_norm > 0 else math.inf,
                **{k: v for k, v in state.info.items()},
            }
            d_param = spec.to_param_layout(d32).contiguous()
            with torch.no_grad():
                add_update_(params[names[layer]], d_param)  # exactly what apply_result will do (one rounding)
            deltas[names[layer]] = d_param
            canonical[layer] = d32
            keys[layer] = K.detach()
            log.debug("layer %d: residual %.4g, delta %.4g", layer, per_layer[str(layer)]["residual_norm"],
                      per_layer[str(layer)]["delta_norm"])
        if final_residual:
            cur = current_values(lm, L, requests, site=residual_site).T
            info["residual_final"] = _mean_col_norm(Z.T - cur)
            info["residual_initial"] = per_layer[str(layers[0])]["residual_norm"]
    finally:
        with torch.no_grad():
            for layer in layers:
                params[names[layer]].copy_(saved[layer])
    info["layers"] = per_layer
    info["seconds_layers"] = time.perf_counter() - t1
    return MultiLayerOutput(deltas=deltas, canonical=canonical, keys=keys, Z=Z, info=info)


@torch.no_grad()
def key_second_moments(lm, layers: Sequence[int], requests: Sequence[EditRequest], templates=("{}",),
                       dtype: torch.dtype = torch.float64) -> dict[int, torch.Tensor]:
    """``{layer: K Kᵀ}`` ``[d_ff, d_ff]`` of the requests' keys on the model as it is now (MEMIT_seq / AlphaEdit
    accumulate these after each applied batch: ``cache_c += K Kᵀ`` with K recomputed on the edited model)."""
    groups = as_template_groups(templates)
    out = {}
    for layer in layers:
        K = compute_keys(lm, layer, list(requests), groups).T.to(dtype)
        out[int(layer)] = K @ K.T
    return out


# =================================================================================================================
# the abstract editor
# =================================================================================================================
#: values of ``MultiLayerConfig.solve_precision`` (None: the method's own ``solve_dtype``)
SOLVE_PRECISIONS: dict[str, torch.dtype | None] = {"auto": None, "float64": torch.float64, "float32": torch.float32}


@dataclass
class MultiLayerConfig(EditorConfig):
    """Fields every MEMIT-family method shares (not registered itself). Defaults: MEMIT's Llama3-8B hparams mapped
    to SmolLM2-135M (guides METHODS.md section 13) with v_lr 0.5 (see its help); each method overrides what
    differs."""

    layers: tuple[int, ...] = field(default=(4, 5, 6, 7, 8), metadata=help_meta(
        "Edit layers (0-based, strictly ascending): the MLP output projection (down_proj / c_proj) of each is "
        "changed; the targets z live at the last one. MEMIT/AlphaEdit Llama3-8B use [4..8] of 32 layers "
        "(jianghoucheng/AlphaEdit hparams); METHODS.md section 13 keeps [4..8] for SmolLM2-135M's 30 layers."))
    v_num_grad_steps: int = field(default=25, metadata=help_meta(
        "Adam steps of the target optimisation (METHODS.md 0.4; 25 in the Llama3-8B MEMIT/AlphaEdit hparams)."))
    v_lr: float = field(default=0.5, metadata=help_meta(
        "Adam learning rate of the target optimisation. AlphaEdit's Llama3-8B MEMIT/AlphaEdit hparams use 0.1; 0.5 "
        "as EasyEdit llama3.2-3b MEMIT and ROME, because 0.1 leaves z short of the target on SmolLM2-135M within 25 "
        "steps (docs/DEFAULTS.md)."))
    v_weight_decay: float = field(default=0.5, metadata=help_meta(
        "Weight of the reference's decay term ||delta|| / ||z_init||^2 in the target loss (MEMIT hparams: 0.5)."))
    clamp_norm_factor: float = field(default=0.75, metadata=help_meta(
        "||delta|| <= clamp_norm_factor * ||z_init|| after every step (MEMIT Llama3-8B / GPT-J: 0.75)."))
    kl_factor: float = field(default=0.0625, metadata=help_meta(
        "Weight of KL(p_now || p_init) on '{subject} is a' in the target loss (MEMIT hparams: 0.0625)."))
    v_loss_layer: int = field(default=-1, metadata=help_meta(
        "Layer whose output gives the logits of the target loss; -1 = the last layer (v_loss_layer 31 for "
        "Llama3-8B, 29 for SmolLM2-135M)."))
    early_stop_loss: float = field(default=5e-2, metadata=help_meta(
        "The target optimisation stops once its loss is below this (memit compute_z: 5e-2)."))
    context_templates: str | list = field(default="memit", metadata=help_meta(
        "Context templates (editors.templates.resolve_context_templates). A spec of templates to sample: 'memit' = "
        "'{}' plus 5 sampled prefixes of 10 tokens in a second group (memit_main.py get_context_templates); "
        "'rome' = 21 templates; or 'length:n_gen,...'. Or the templates themselves: a list of lists of "
        "'{}'-strings (groups, as MEMIT's [['{}'], [...]]; a flat list is ONE group), the same as a JSON string, "
        "or the path of a .json / text file (blank lines separate groups). Keys are averaged within each group, "
        "then over groups (memit compute_ks); the target optimisation uses all templates."))
    mom2_n_tokens: int = field(default=DEFAULT_MOM2_TOKENS, metadata=help_meta(
        "Tokens of the covariance sample C = E[k kᵀ] per layer (METHODS.md 0.1; the reference uses 100k Wikipedia "
        "articles, unreachable here). Computed once on the unedited model in prepare() and cached on disk."))
    corpus: str = field(default="builtin", metadata=help_meta(
        "Covariance corpus: 'builtin' (Python's documentation prose, always present) or the path of a UTF-8 "
        "text file (editors.stats.layer_covariances)."))
    solve_precision: str = field(default="auto", metadata=help_meta(
        "dtype of the closed-form solve (keys, residuals, covariance): 'auto' = the method's own (float64 for "
        "MEMIT, PMET, EMMET, AdaEdit as their reference code; float32 for AlphaEdit), 'float64', 'float32'. "
        "float64 costs little on a CPU or an H100/H200 but runs 32-64x slower than float32 on consumer and "
        "inference GPUs (L4, A10, RTX): float32 there, at the price of a less exact solve of an ill-conditioned "
        "λC + KKᵀ (check the layers' fit_error in the edit info)."))

    def validate(self) -> None:
        check_layers(self.layers)
        check_range("v_num_grad_steps", self.v_num_grad_steps, 1)
        for name in ("v_lr", "clamp_norm_factor"):
            check_range(name, getattr(self, name), 0, lo_open=True)
        for name in ("v_weight_decay", "kl_factor", "early_stop_loss"):
            check_range(name, getattr(self, name), 0)
        check_range("mom2_n_tokens", self.mom2_n_tokens, 1)
        check_template_source(self.context_templates)
        check_choice("solve_precision", self.solve_precision, SOLVE_PRECISIONS)

    def z_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`editors.targets.compute_target_values`."""
        return {"steps": self.v_num_grad_steps, "lr": self.v_lr, "weight_decay": self.v_weight_decay,
                "clamp_norm_factor": self.clamp_norm_factor, "kl_factor": self.kl_factor,
                "loss_layer": None if self.v_loss_layer < 0 else self.v_loss_layer,
                "early_stop_loss": self.early_stop_loss}


class KeyMomentsState:
    """Mixin of the editors that accumulate the keys of the batches applied so far (MEMIT_seq, AlphaEdit): their
    sequential state ``KpKp`` (layer -> ΣK_pK_pᵀ) and ``n_accumulated`` as :meth:`Editor.state_dict` arrays, so a
    resumed run (app/snapshots.py) solves with the same K_pK_pᵀ as an uninterrupted one."""

    KpKp: dict[int, torch.Tensor]
    n_accumulated: int
    state_in_store: ClassVar[bool] = False  # d_ff x d_ff per layer: resume snapshots only

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_accumulated": torch.tensor(self.n_accumulated)}
        out.update({f"KpKp|{layer}": M.detach().cpu() for layer, M in self.KpKp.items()})
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = self.lm.device  # type: ignore[attr-defined]
        self.n_accumulated = int(torch.as_tensor(state.get("n_accumulated", 0)))
        self.KpKp = {int(k.split("|", 1)[1]): torch.as_tensor(v).to(device) for k, v in state.items()
                     if k.startswith("KpKp|")}


class MultiLayerEditor(Editor):
    """Abstract editor around :func:`multilayer_update`. Concrete methods set ``name``, ``config_cls``, ``site``,
    ``spread``, ``solve_dtype`` and implement :meth:`solve`; they may add per-layer statistics
    (:meth:`layer_extra`), one-time work (:meth:`prepare_method`), result details (:meth:`finish`) and sequential
    state (:meth:`after_apply`).

    After :meth:`prepare`: ``self.C`` (layer -> covariance, float64, on the model's device, of the UNEDITED model)
    and ``self.templates`` (template groups) are set; they are computed once per editor, never per edit.
    """

    site: ClassVar[str] = "residual"
    #: where the layer loop measures the residual (None = ``site``; AdaEdit makes it a config field)
    residual_site: ClassVar[str | None] = None
    spread: ClassVar[str] = "linear"
    solve_dtype: ClassVar[torch.dtype] = torch.float64
    #: whether the method needs the covariance statistics
    needs_covariance: ClassVar[bool] = True

    def __init__(self, lm, config: EditorConfig | None = None, *, cache_dir: str | None = None, seed: int = 0):
        super().__init__(lm, config, cache_dir=cache_dir, seed=seed)
        self.C: dict[int, torch.Tensor] = {}
        self.templates: list[list[str]] = []
        self._prepared = False

    # ---- hooks for concrete methods ----------------------------------------------------------------------
    def solve(self, K: torch.Tensor, R: torch.Tensor, state: LayerState) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def layer_extra(self, layer: int) -> dict:
        """Per-layer statistics handed to :meth:`solve` in ``state.extra``."""
        return {}

    def prepare_method(self) -> None:
        """Method-specific one-time work after covariances and templates exist (e.g. AlphaEdit's projectors)."""

    def finish(self, out: MultiLayerOutput, info: dict, artifacts: dict) -> None:
        """Add method-specific entries to the result's ``info`` / ``artifacts``."""

    # ---- the contract --------------------------------------------------------------------------------------
    def prepare(self) -> None:
        if self._prepared:
            return
        cfg = self.config
        try:
            layers = check_layers(cfg.layers, self.spec.n_layers)
        except ValueError as exc:
            raise EditError(f"{self.name}: {exc}") from exc
        t0 = time.perf_counter()
        if self.needs_covariance:
            self.C = layer_covariances(self.lm, layers, corpus=cfg.corpus, n_tokens=cfg.mom2_n_tokens,
                                              cache_dir=self.cache_dir, dtype=torch.float64)
        self.seconds_covariance = time.perf_counter() - t0
        self.templates = resolve_context_templates(self.lm, cfg.context_templates, self.seed,
                                                   cache_dir=self.cache_dir)
        self.prepare_method()
        self._prepared = True

    def edit(self, requests: Sequence[EditRequest]) -> EditResult:
        started = time.perf_counter()
        self.prepare()
        cfg = self.config
        layers = check_layers(cfg.layers)
        extra = {layer: self.layer_extra(layer) for layer in layers}
        out = multilayer_update(self.lm, requests, layers, self.solve, covariances=self.C, extra=extra,
                                site=self.site, spread=self.spread, templates=self.templates,
                                solve_dtype=SOLVE_PRECISIONS[cfg.solve_precision] or self.solve_dtype,
                                z_kwargs=cfg.z_kwargs(), residual_site=self.residual_site)
        info = dict(out.info)
        artifacts: dict[str, Any] = {}
        self.finish(out, info, artifacts)
        return self._result(deltas=out.deltas, info=info, artifacts=artifacts, started=started)


__all__ = ["LayerState", "Solve", "MultiLayerOutput", "multilayer_update", "key_second_moments", "check_layers",
           "KeyMomentsState", "MultiLayerConfig", "MultiLayerEditor", "SITES", "SPREADS", "SOLVE_PRECISIONS",
           "TINY_OVERRIDES"]
