"""Presets per (method, model): small YAML files with a version (lm-evaluation-harness task-YAML style).

``editors/presets/<method>.yaml``::

    version: 1                  # bump whenever a value changes; a run records the version it used
    method: rome
    models:
      default:                  # the name given to load_model ("default", a local path or a hub id)
        layer: 5
        ...
      SmolLM2-135M-Instruct:    # also matched by display name / path basename
        include: default        # reuse another entry of the same file, then override
        ...

:func:`build_config` is the one way a method's config for a model is made (a run, the collapse study, the editor
benchmark, a wrapper's base, the Playground, hypernetwork training): the config's defaults, then the preset of
(method, model) when there is one, then the caller's overrides. :func:`load_preset` returns the :class:`Preset` itself
(``config`` = the preset's field values) or None when the method has no preset for that model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

import yaml

from ..base import EditorConfig, make_config
from ..registry import get_editor_class


class PresetError(ValueError):
    """A preset file is malformed (the message names the file and the problem)."""


@dataclass(frozen=True)
class Preset:
    method: str
    model: str
    version: int
    config: dict[str, Any] = field(default_factory=dict)


def _read(method: str) -> tuple[str, dict] | None:
    fname = f"{method.strip().lower().replace('-', '_')}.yaml"
    res = resources.files(__package__).joinpath(fname)
    if not res.is_file():
        return None
    try:
        data = yaml.safe_load(res.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise PresetError(f"preset {fname}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
        raise PresetError(f"preset {fname}: expected a mapping with 'version' and 'models'")
    if not isinstance(data.get("version"), int):
        raise PresetError(f"preset {fname}: 'version' must be an integer")
    return fname, data


def _resolve(fname: str, models: dict, key: str, seen: tuple[str, ...] = ()) -> dict:
    if key in seen:
        raise PresetError(f"preset {fname}: include cycle {' -> '.join(seen + (key,))}")
    entry = models.get(key)
    if not isinstance(entry, dict):
        raise PresetError(f"preset {fname}: model entry {key!r} is missing or not a mapping")
    entry = dict(entry)
    base = entry.pop("include", None)
    out = _resolve(fname, models, base, seen + (key,)) if base else {}
    out.update(entry)
    return out


def preset_names(method: str) -> list[str]:
    """Model names that have a preset for ``method``."""
    found = _read(method)
    return sorted(found[1].get("models", {})) if found else []


def load_preset(method: str, model_name: str = "default") -> Preset | None:
    """The preset of ``method`` for ``model_name`` (exact name, then the path's basename), or None."""
    found = _read(method)
    if found is None:
        return None
    fname, data = found
    models = data.get("models", {}) or {}
    candidates = [model_name]
    if model_name:
        candidates.append(os.path.basename(os.path.normpath(model_name)))
    for key in candidates:
        if key in models:
            return Preset(method=data.get("method", method), model=key, version=int(data["version"]),
                          config=_resolve(fname, models, key))
    return None


def build_config(method: str, model: str = "default", overrides: Mapping[str, Any] | None = None, *,
                 use_preset: bool = True) -> tuple[EditorConfig, int | None]:
    """The validated config of ``method`` for ``model``: defaults, then the (method, model) preset when
    ``use_preset`` and one exists, then ``overrides`` (strings are coerced to the fields' types).

    Args:
        method: registry name (case-insensitive).
        model: the model's name as given to ``load_model`` ("default", a path, a hub id); see :func:`load_preset`.

    Returns:
        ``(config, preset_version)``; the version is None when no preset was used.

    Raises:
        UnknownMethodError: ``method`` is not registered (the message suggests near names).
        ConfigError: an unknown field or a bad value, in the preset or in ``overrides`` (the message names it).
    """
    cls = get_editor_class(method)
    preset = load_preset(cls.name, model) if use_preset else None
    values = {**(preset.config if preset is not None else {}), **dict(overrides or {})}
    return make_config(cls.config_cls, values, method=cls.name), (preset.version if preset is not None else None)


__all__ = ["Preset", "PresetError", "build_config", "load_preset", "preset_names"]
