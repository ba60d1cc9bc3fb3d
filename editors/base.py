"""The editor contract: configs, results, applying and undoing an edit.

Editors return what they would change; they never leave the model changed (kmeng01/rome: "model at beginning of
function == model at end of function"). The run engine applies an :class:`EditResult` with :func:`apply_result`,
which returns an :class:`Undo` that restores the touched parameters bit for bit.

Three kinds of change exist:
  * additive ``deltas[name]`` in the parameter's own layout: ``W <- W + delta``;
  * left-multiplicative ``factors[name]`` (MOSE): in the canonical ``[d_out, d_in]`` orientation ``W <- R W``
    with ``R`` of shape ``[d_out, d_out]``;
  * an ``adaptor`` patch (:class:`AdaptorPatch`) for an editor whose state is not a weight delta (GRACE's
    codebook): the editor attaches its adaptor to the model (a hook) and the patch changes the adaptor's state;
    applying it returns an exact undo, like the weights'.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol, Sequence

import torch

from .fields import ConfigError, coerce_fields, field_help
from .models import LoadedModel
from .requests import EditRequest


class EditError(RuntimeError):
    """An edit could not be computed (names the method and the reason)."""


@dataclass
class EditorConfig:
    """Base of every method config. Each field carries ``metadata={"help": ...}`` citing the paper where it can.

    Subclasses are plain dataclasses; :meth:`validate` checks ranges (called by :func:`make_config`).
    """

    version: ClassVar[int] = 1

    def validate(self) -> None:  # overridden where ranges matter
        pass

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_help(cls) -> list[dict]:
        """[{name, type, default, help}] for every field (used by the CLI's ``methods`` and the app's forms)."""
        return field_help(cls)


def make_config(config_cls: type[EditorConfig], overrides: dict | None = None, *, method: str = "") -> EditorConfig:
    """Build a validated config from defaults plus ``overrides`` (values may be strings from the CLI; see
    :func:`editors.fields.coerce`). A method's config for a model starts from its preset:
    :func:`editors.presets.build_config`."""
    owner = method or config_cls.__name__
    cfg = config_cls()
    for key, value in coerce_fields(config_cls, overrides or {}, cfg, method=owner).items():
        setattr(cfg, key, value)
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConfigError(f"{owner}: {exc}") from exc
    return cfg


class AdaptorPatch(Protocol):
    """A change to an editor's adaptor (not to a parameter), built by the editor's :meth:`Editor.edit`."""

    def validate(self) -> None:
        """Raise :class:`EditError` on a malformed patch (shapes, unknown entries); nothing applied yet."""

    def is_finite(self) -> bool:
        """No NaN / Inf in the patch's tensors."""

    def tensors(self) -> list[torch.Tensor]:
        """The patch's tensors in order (keys, values, ...): for comparisons and the record."""

    def apply(self) -> Callable[[], None]:
        """Apply the patch to the live adaptor; returns the exact undo."""

    def summary(self) -> dict:
        """Scalars for the record (entries added, radii changed, ...)."""


@dataclass
class EditResult:
    """What one call to :meth:`Editor.edit` computed.

    Attributes:
        method: registry name.
        deltas: parameter name -> additive update in the parameter's layout.
        factors: parameter name -> left factor R, canonical ``[d_out, d_out]`` (W <- R W).
        info: scalars for the record (per layer / per request diagnostics: norms, losses, ranks, ...).
        artifacts: tensors / arrays for the analysis layer (e.g. GeoEdit's per-neuron angles, AlphaEdit's P dims).
        config: the config the edit ran with (dict), with ``config_version``.
        seconds: wall time of the computation.
        adaptor: a change of the editor's adaptor state (:class:`AdaptorPatch`), or None.
    """

    method: str
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    config_version: int = 1
    seconds: float = 0.0
    adaptor: AdaptorPatch | None = None

    @property
    def param_names(self) -> list[str]:
        return sorted(set(self.deltas) | set(self.factors))

    def is_finite(self) -> bool:
        return all(torch.isfinite(t).all().item() for t in (*self.deltas.values(), *self.factors.values())) and (
            self.adaptor is None or bool(self.adaptor.is_finite()))


@dataclass
class Undo:
    """Exact copies of the parameters an :func:`apply_result` touched, and the undo of its adaptor patch."""

    saved: dict[str, torch.Tensor]
    extra: list[Callable[[], None]] = field(default_factory=list)

    def __call__(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.saved.items():
                params[name].copy_(value)
        for fn in reversed(self.extra):
            fn()


def apply_result(lm: LoadedModel, result: EditResult, *, keep_undo: bool = True) -> Undo | None:
    """Apply ``result`` to ``lm.model`` in place. Returns an :class:`Undo` (exact) unless ``keep_undo`` is False.

    Raises:
        EditError: a delta or factor is not finite or does not match its parameter's shape; nothing is changed.
    """
    params = dict(lm.model.named_parameters())
    for name in result.param_names:
        if name not in params:
            raise EditError(f"{result.method}: result names unknown parameter {name!r}")
    for name, d in result.deltas.items():
        if tuple(d.shape) != tuple(params[name].shape):
            raise EditError(f"{result.method}: delta for {name} has shape {tuple(d.shape)}, "
                            f"parameter has {tuple(params[name].shape)}")
    if not result.is_finite():
        raise EditError(f"{result.method}: the computed update contains NaN or Inf; the model was not changed")
    if result.adaptor is not None:
        result.adaptor.validate()
    saved = {n: params[n].detach().clone() for n in result.param_names} if keep_undo else {}
    with torch.no_grad():
        for name, R in result.factors.items():
            p = params[name]
            W = lm.spec.to_canonical(p.data)
            ct = math_dtype(p.dtype)
            new = R.to(p.device, ct) @ W.to(ct)
            p.copy_(lm.spec.to_param_layout(new).to(p.dtype))
        for name, d in result.deltas.items():
            add_update_(params[name], d)
    extra = [result.adaptor.apply()] if result.adaptor is not None else []
    return Undo(saved, extra) if keep_undo else None


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype edit maths runs in for a parameter of ``dtype``: float32 for half-precision (bfloat16 / float16)
    and float32 parameters, float64 for float64 ones (``torch.promote_types(dtype, float32)``)."""
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def add_update_(p: torch.Tensor, d: torch.Tensor) -> None:
    """``p <- round(p + d)``: the sum is formed in :func:`math_dtype` and rounded to ``p``'s dtype ONCE.

    For a float32 parameter this is exactly ``p.add_(d)``; for a bfloat16 / float16 one it avoids rounding ``d``
    to half precision before the addition (two roundings). Every editor that writes an update into the model
    (:func:`apply_result`, the MEMIT family's layer-by-layer loop) goes through here, so that what an editor measured
    on its temporarily edited model is exactly what applying its result gives."""
    ct = math_dtype(p.dtype)
    if p.dtype == ct:
        p.add_(d.to(p.device, ct))
    else:
        p.copy_((p.to(ct) + d.to(p.device, ct)).to(p.dtype))


class Editor:
    """Base of every method. Subclasses set ``name`` and ``config_cls`` and implement :meth:`edit`.

    An editor instance lives for one run: sequential state (e.g. AlphaEdit's accumulated K_p K_pᵀ) is kept on the
    instance, never in module globals, and updated in :meth:`after_apply`.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[EditorConfig]] = EditorConfig
    #: short description for ``python -m app methods`` and the app
    summary: ClassVar[str] = ""

    def __init__(self, lm: LoadedModel, config: EditorConfig | None = None, *, cache_dir: str | None = None,
                 seed: int = 0):
        self.lm = lm
        self.config = config if config is not None else make_config(self.config_cls, method=self.name)
        self.cache_dir = cache_dir
        self.seed = seed

    @property
    def model(self) -> torch.nn.Module:
        return self.lm.model

    @property
    def tok(self):
        return self.lm.tokenizer

    @property
    def spec(self):
        return self.lm.spec

    def prepare(self) -> None:
        """One-time work before the first edit (statistics, projectors). Must not change the model."""

    def edit(self, requests: Sequence[EditRequest]) -> EditResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        """Called by the engine after ``result`` was applied (sequential state updates)."""

    #: whether the engine stores :meth:`state_dict` as the artifact ``editor_state`` at every checkpoint (small
    #: states a page shows: a codebook, running statistics); False for large ones (accumulated key moments, a copy of
    #: W0), which go only into resume snapshots (app/snapshots.py)
    state_in_store: ClassVar[bool] = True

    # ---- state that is not a weight delta (base: none) --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The editor's COMPLETE sequential state, as flat ``{key: numpy array or tensor}``: everything beyond the
        weights that its next edit depends on (running statistics, a codebook, accumulated key moments, ...), so
        that an editor restored with :meth:`load_state_dict` on the edited model makes the same next edit as the one
        that made the earlier edits (resume snapshots; tests/unit/test_resume.py checks every shipped method).
        Empty: nothing beyond the weights."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (resume / replay)."""
        if state:
            raise ValueError(f"{self.name}: this editor keeps no state, got keys {sorted(state)[:3]}")

    def state_metrics(self, prompts: Sequence[str]) -> list[dict]:
        """Scalars describing the editor's own state at a checkpoint, ``[{metric, value, layer?}]`` (the engine
        records them as ``kind="editor"`` rows next to the weight diagnostics; e.g. a codebook's size and the share of
        ``prompts`` it answers). Must not change the model."""
        return []

    def watched_params(self) -> list[str]:
        """Parameters whose weight diagnostics the engine records although no result touches them (an editor that
        works beside the weights names the matrices it sits on, so their exactly flat curves are shown)."""
        return []

    def close(self) -> None:
        """Release what the editor attached to the model (hooks, adaptors). Idempotent; the engine calls it when the
        run ends, also after an error."""

    # helper for subclasses
    def _result(self, deltas=None, factors=None, info=None, artifacts=None, started: float | None = None
                ) -> EditResult:
        return EditResult(
            method=self.name,
            deltas=deltas or {},
            factors=factors or {},
            info=info or {},
            artifacts=artifacts or {},
            config=self.config.to_dict(),
            config_version=type(self.config).version,
            seconds=(time.perf_counter() - started) if started is not None else 0.0,
        )


def finite_or_raise(method: str, name: str, t: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise EditError(f"{method}: {name} became NaN/Inf during the edit")
    return t


def relative_norm(delta: torch.Tensor, weight: torch.Tensor) -> float:
    w = weight.norm().item()
    return delta.norm().item() / w if w > 0 else math.inf
