"""The method registry: one module per method registers its editor class once.

Unknown names get an error that lists the valid ones and suggests near names (lm-evaluation-harness style).
"""
from __future__ import annotations

import difflib
import importlib

from .base import Editor

_METHOD_MODULES = {
    # registry name -> module under editors/ ; modules are imported lazily so that `methods` is cheap
    "ft": "ft",
    "ft-c": "ft",
    "rome": "rome",
    "memit": "memit",
    "pmet": "pmet",
    "emmet": "emmet",
    "alphaedit": "alphaedit",
    "rect": "rect",
    "prune": "prune",
    "adaedit": "adaedit",
    "mose": "mose",
    "lora": "lora",
    "flearning": "flearning",
    "geoedit": "geoedit",
    "malmen": "malmen",
    "agrade": "agrade",
}

_REGISTRY: dict[str, type[Editor]] = {}


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


def register(cls: type[Editor]) -> type[Editor]:
    """Class decorator: register ``cls`` under ``cls.name``. Duplicates are rejected."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is already registered by {_REGISTRY[cls.name].__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for mod in sorted(set(_METHOD_MODULES.values())):
        try:
            importlib.import_module(f"editors.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"editors.{mod}":
                raise


def available_methods() -> list[str]:
    """Names of every method whose module exists in this installation."""
    _load_all()
    return sorted(_REGISTRY)


def get_editor_class(name: str) -> type[Editor]:
    key = name.strip().lower()
    if key not in _REGISTRY and key in _METHOD_MODULES:
        try:
            importlib.import_module(f"editors.{_METHOD_MODULES[key]}")
        except ModuleNotFoundError as exc:
            if exc.name != f"editors.{_METHOD_MODULES[key]}":
                raise
    if key not in _REGISTRY:
        valid = available_methods()
        near = difflib.get_close_matches(key, valid, n=3)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise UnknownMethodError(f"unknown method {name!r}.{hint} Valid methods: {', '.join(valid)}")
    return _REGISTRY[key]
