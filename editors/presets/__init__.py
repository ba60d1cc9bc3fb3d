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
    variants:                   # optional: named changes on top of the model's entry, for every model
      reference:
        description: what the variant is for and what it changes (shown by `python -m app methods NAME`)
        config:
          early_stop_prob: 0.0

:func:`build_config` is the one way a method's config for a model is made (a run, the collapse study, the editor
benchmark, a wrapper's base, the Playground, hypernetwork training): the config's defaults, then the preset of
(method, model) when there is one, then the caller's overrides. :func:`load_preset` returns the :class:`Preset` itself
(``config`` = the preset's field values) or None when the method has no preset for that model.
With ``variant=`` the variant's ``config`` is
applied on top of the model's entry (or of the config defaults when the model has none). The variant ``reference``
of a method computes what the field's reference code computes on the same inputs (docs/reference_agreement.md);
:func:`preset_variants` lists a method's variants with their descriptions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

import yaml

from ..base import ConfigError, EditorConfig, make_config
from ..registry import get_editor_class


class PresetError(ValueError):
    """A preset file is malformed (the message names the file and the problem)."""


@dataclass(frozen=True)
class Preset:
    """A resolved preset: ``model`` is the entry used ("" when only a variant applied), ``variant`` the variant
    applied on top (None for none)."""

    method: str
    model: str
    version: int
    config: dict[str, Any] = field(default_factory=dict)
    variant: str | None = None


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
    variants = data.get("variants", {}) or {}
    if not isinstance(variants, dict):
        raise PresetError(f"preset {fname}: 'variants' must be a mapping of variant names")
    for vname, entry in variants.items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("config", {}) or {}, dict)
                or not isinstance(entry.get("description", ""), str)):
            raise PresetError(f"preset {fname}: variant {vname!r} must be a mapping with 'description' (text) and "
                              f"'config' (a mapping of config fields)")
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


def preset_variants(method: str) -> dict[str, str]:
    """``{variant name: description}`` of ``method``'s preset file (empty without a preset or variants)."""
    found = _read(method)
    if found is None:
        return {}
    return {name: " ".join(str(entry.get("description", "")).split())
            for name, entry in (found[1].get("variants", {}) or {}).items()}


def variant_config(method: str, variant: str) -> dict[str, Any]:
    """The config fields ``variant`` sets for ``method``.

    Raises:
        PresetError: the method has no preset file or no such variant (the message lists the valid ones).
    """
    found = _read(method)
    variants = (found[1].get("variants", {}) or {}) if found else {}
    if variant not in variants:
        valid = ", ".join(sorted(variants)) or "none"
        raise PresetError(f"method {method!r} has no preset variant {variant!r} (variants: {valid})")
    return dict(variants[variant].get("config", {}) or {})


def load_preset(method: str, model_name: str = "default", variant: str | None = None) -> Preset | None:
    """The preset of ``method`` for ``model_name`` (exact name, then the path's basename), or None; with
    ``variant``, that variant's fields on top (a Preset with ``model=""`` when the model has no entry).

    Raises:
        PresetError: a malformed preset file, or an unknown ``variant`` (see :func:`variant_config`).
    """
    found = _read(method)
    extra = variant_config(method, variant) if variant else {}
    if found is None:
        return None
    fname, data = found
    models = data.get("models", {}) or {}
    candidates = [model_name]
    if model_name:
        candidates.append(os.path.basename(os.path.normpath(model_name)))
    common = dict(method=data.get("method", method), version=int(data["version"]), variant=variant or None)
    for key in candidates:
        if key in models:
            return Preset(model=key, config={**_resolve(fname, models, key), **extra}, **common)
    return Preset(model="", config=extra, **common) if variant else None


def build_config(method: str, model: str = "default", overrides: Mapping[str, Any] | None = None, *,
                 use_preset: bool = True, variant: str = "") -> tuple[EditorConfig, int | None]:
    """The validated config of ``method`` for ``model``: defaults, then the (method, model) preset when
    ``use_preset`` and one exists, then the preset variant ``variant`` when given, then ``overrides`` (strings are
    coerced to the fields' types).

    Args:
        method: registry name (case-insensitive).
        model: the model's name as given to ``load_model`` ("default", a path, a hub id); see :func:`load_preset`.
        variant: a named variant of the method's preset (e.g. ``"reference"``); ``""`` = none. Needs ``use_preset``.

    Returns:
        ``(config, preset_version)``; the version is None when no preset was used.

    Raises:
        UnknownMethodError: ``method`` is not registered (the message suggests near names).
        ConfigError: an unknown field or a bad value, in the preset or in ``overrides`` (the message names it).
    """
    cls = get_editor_class(method)
    if variant and not use_preset:
        raise ConfigError(f"{cls.name}: preset variant {variant!r} needs the preset (use_preset)")
    if variant:
        try:
            preset = load_preset(cls.name, model, variant)
        except PresetError as exc:
            raise ConfigError(str(exc)) from exc
    else:
        preset = load_preset(cls.name, model) if use_preset else None
    values = {**(preset.config if preset is not None else {}), **dict(overrides or {})}
    return make_config(cls.config_cls, values, method=cls.name), (preset.version if preset is not None else None)


__all__ = ["Preset", "PresetError", "build_config", "load_preset", "preset_names", "preset_variants", "variant_config"]
