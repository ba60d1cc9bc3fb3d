"""The editor contract: configs, results, applying and undoing an edit.

Editors return what they would change; they never leave the model changed (kmeng01/rome: "model at beginning of
function == model at end of function"). The run engine applies an :class:`EditResult` with :func:`apply_result`,
which returns an :class:`Undo` that restores the touched parameters bit for bit.

Two kinds of change exist:
  * additive ``deltas[name]`` in the parameter's own layout: ``W <- W + delta``;
  * left-multiplicative ``factors[name]`` (MOSE): in the canonical ``[d_out, d_in]`` orientation ``W <- R W``
    with ``R`` of shape ``[d_out, d_out]``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

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
    """

    method: str
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    config_version: int = 1
    seconds: float = 0.0

    @property
    def param_names(self) -> list[str]:
        return sorted(set(self.deltas) | set(self.factors))

    def is_finite(self) -> bool:
        return all(torch.isfinite(t).all().item() for t in (*self.deltas.values(), *self.factors.values()))


@dataclass
class Undo:
    """Exact copies of the parameters an :func:`apply_result` touched."""

    saved: dict[str, torch.Tensor]

    def __call__(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.saved.items():
                params[name].copy_(value)


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
    return Undo(saved) if keep_undo else None


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
