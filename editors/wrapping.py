"""Methods that post-process another method's additive update (RECT, PRUNE).

A wrapped editor owns a BASE editor (``rome`` or ``memit``, its config made by :func:`editors.presets.build_config`:
the base's preset for the model, then ``base_overrides``), lets it compute its update on the model as it is now, and
returns a transformed update instead. ``prepare`` and ``after_apply`` are forwarded to the base (so e.g. MEMIT_seq's
key statistics stay correct); the base's ``info`` is kept under ``info["base"]`` and its artifacts are passed through.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch

from .base import ConfigError, EditError, Editor, EditorConfig, EditResult
from .fields import check_choice, help_meta
from .presets import build_config
from .registry import UnknownMethodError, get_editor_class
from .requests import EditRequest

#: base methods a wrapped editor may post-process (additive MLP-output updates of the ROME / MEMIT family)
BASES = ("rome", "memit")


@dataclass
class WrappedConfig(EditorConfig):
    """Fields every wrapper shares (not registered itself)."""

    base: str = field(default="rome", metadata=help_meta(
        "The method whose update is post-processed: 'rome' (the papers' default base) or 'memit'."))
    base_overrides: dict = field(default_factory=dict, metadata=help_meta(
        "Config fields of the base method, {field: value} (a JSON object when given as a string, e.g. "
        "'{\"layers\": [5]}'), applied on top of the base's preset; unknown fields are rejected with the base's "
        "list of valid fields."))
    base_preset: bool = field(default=True, metadata=help_meta(
        "Start the base's config from its preset for the edited model (editors/presets/<base>.yaml), as a run of "
        "the base method itself would; False = the base config's defaults."))

    def validate(self) -> None:
        check_choice("base", self.base, BASES)
        if not isinstance(self.base_overrides, Mapping):
            raise ValueError(f"base_overrides must be a mapping of the base's config fields, "
                             f"got {type(self.base_overrides).__name__}")
        self.base_overrides = dict(self.base_overrides)


class WrappedEditor(Editor):
    """Abstract: subclasses implement :meth:`transform_param` (one matrix's delta -> new delta and info), or
    :meth:`transform` (base result -> deltas and info)."""

    config_cls: ClassVar[type] = WrappedConfig

    def __init__(self, lm, config: EditorConfig | None = None, *, cache_dir: str | None = None, seed: int = 0):
        super().__init__(lm, config, cache_dir=cache_dir, seed=seed)
        self._base: Editor | None = None

    @property
    def base(self) -> Editor:
        """The base editor (built on first use)."""
        if self._base is None:
            cfg = self.config
            try:
                base_cfg, _ = build_config(cfg.base, self.lm.name, cfg.base_overrides, use_preset=cfg.base_preset)
            except UnknownMethodError as exc:
                raise EditError(f"{self.name}: base method {cfg.base!r} is not installed ({exc})") from exc
            except ConfigError as exc:
                raise ConfigError(f"{self.name}.base: {exc}") from exc
            self._base = get_editor_class(cfg.base)(self.lm, base_cfg, cache_dir=self.cache_dir, seed=self.seed)
        return self._base

    def prepare(self) -> None:
        self.base.prepare()

    def transform_param(self, name: str, delta: torch.Tensor, W: torch.Tensor
                        ) -> tuple[torch.Tensor, dict[str, Any]]:  # pragma: no cover - abstract
        """One edited matrix: the base's ``delta`` of parameter ``name`` and its current weight ``W`` (detached;
        both in parameter layout) -> the delta to return instead and that matrix's info."""
        raise NotImplementedError

    def transform(self, result: EditResult, requests: Sequence[EditRequest]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The base's result -> ``(deltas, info)``: :meth:`transform_param` on each edited matrix, its info under
        ``info["params"][name]``. Override for a transform that needs all matrices (or the requests) at once."""
        params = dict(self.model.named_parameters())
        deltas, per_param = {}, {}
        for name, d in result.deltas.items():
            deltas[name], per_param[name] = self.transform_param(name, d, params[name].detach())
        return deltas, {"params": per_param}

    def edit(self, requests: Sequence[EditRequest]) -> EditResult:
        started = time.perf_counter()
        base_result = self.base.edit(requests)
        if base_result.factors:
            raise EditError(f"{self.name}: base {self.config.base!r} returned multiplicative factors; only "
                            f"additive updates can be post-processed")
        deltas, info = self.transform(base_result, requests)
        info = {**info, "base": base_result.info, "base_seconds": base_result.seconds}
        return self._result(deltas=deltas, info=info, artifacts=dict(base_result.artifacts), started=started)

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        self.base.after_apply(requests, result)

    #: the base's state may be large (MEMIT_seq's key moments), PRUNE's holds W0: resume snapshots only
    state_in_store: ClassVar[bool] = False

    def state_dict(self) -> dict[str, Any]:
        """The base editor's state under ``base|``."""
        return {f"base|{k}": v for k, v in self.base.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("base|")})


__all__ = ["BASES", "WrappedConfig", "WrappedEditor"]
