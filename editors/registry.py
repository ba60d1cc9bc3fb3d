"""The method registry: one module per method registers its editor class once, with the metadata other places need.

A method module under ``editors/`` registers its editor with the :func:`register` decorator::

    @register(family="locate-then-edit", collapse_study=True, order=10,
              tiny={"layer": 1, "v_num_grad_steps": 2, "mom2_n_tokens": 2000})
    class ROMEEditor(Editor):
        name = "rome"
        ...

Nothing else needs editing: the registry finds method modules itself (it imports every module of the ``editors``
package but the test helpers the first time a method is looked up), and the contract tests, the plots' method
order and the study defaults read :func:`methods_in_order`, :func:`collapse_study_methods`, :func:`methods_in_family`
and :func:`method_info`. Unknown names get an error that lists the valid ones and suggests near names
(lm-evaluation-harness style); duplicates are rejected (peft ``register_peft_method``).
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, overload

from .base import Editor

#: the families a method can belong to (in the order tables list them)
FAMILIES: tuple[str, ...] = ("locate-then-edit", "constrained", "multiplicative", "fine-tuning", "hypernetwork",
                             "memory", "lifelong")


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows about one method.

    Attributes:
        name: the registry name (``editor_cls.name``).
        editor_cls: the editor class.
        family: one of :data:`FAMILIES` ("" only for throw-away editors that tests register).
        collapse_study: whether the sequential-collapse study runs this method by default.
        order: where the method stands in tables and figures (and so which colour it gets); None = after every
            ordered method, by name. Never renumber a shipped method: its colour would change.
        tiny: config overrides that make one edit on the 4-layer random models of :func:`editors.testing.tiny_model`
            take seconds (the contract tests' row for the method); empty = the config's defaults.
    """

    name: str
    editor_cls: type[Editor]
    family: str = ""
    collapse_study: bool = False
    order: int | None = None
    tiny: Mapping[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> str:
        """The module that registered the method (``editors.<name>`` for the project's own methods)."""
        return self.editor_cls.__module__


_REGISTRY: dict[str, MethodInfo] = {}


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


@overload
def register(cls: type[Editor]) -> type[Editor]: ...


@overload
def register(*, family: str = "", collapse_study: bool = False, order: int | None = None,
             tiny: Mapping[str, Any] | None = None) -> Callable[[type[Editor]], type[Editor]]: ...


def register(cls=None, *, family="", collapse_study=False, order=None, tiny=None):
    """Class decorator: register ``cls`` under ``cls.name`` with its metadata (see :class:`MethodInfo`).

    ``@register`` alone registers with no metadata (for throw-away editors in tests); the project's methods use
    ``@register(family=..., ...)``.

    Raises:
        ValueError: the class has no name, the name is taken by another class, or the family is unknown.
    """
    if family and family not in FAMILIES:
        raise ValueError(f"unknown method family {family!r}; valid: {', '.join(FAMILIES)}")

    def add(editor_cls: type[Editor]) -> type[Editor]:
        if not editor_cls.name:
            raise ValueError(f"{editor_cls.__name__} has no name")
        old = _REGISTRY.get(editor_cls.name)
        if old is not None and old.editor_cls is not editor_cls:
            raise ValueError(f"method {editor_cls.name!r} is already registered by {old.module}")
        _REGISTRY[editor_cls.name] = MethodInfo(editor_cls.name, editor_cls, family, bool(collapse_study), order,
                                                MappingProxyType(dict(tiny or {})))
        return editor_cls

    return add(cls) if cls is not None else add


#: modules of the package that are no method modules and that product code must not import (the test helpers)
_NOT_SCANNED = frozenset({"testing"})


def discover() -> None:
    """Import every module of the ``editors`` package (a method module registers its editor when imported), except
    private ones and the test helpers.

    Raises:
        ModuleNotFoundError: a module needs a package that is not installed (the error names it).
    """
    package = importlib.import_module(__package__)
    for mod in pkgutil.iter_modules(package.__path__):
        if not mod.ispkg and not mod.name.startswith("_") and mod.name not in _NOT_SCANNED:
            importlib.import_module(f"{__package__}.{mod.name}")


def available_methods() -> list[str]:
    """Names of every registered method, sorted."""
    discover()
    return sorted(_REGISTRY)


def methods_in_order() -> list[str]:
    """Every registered method in table / figure order: by ``order``, then the unordered ones by name."""
    discover()
    return sorted(_REGISTRY, key=lambda m: (_REGISTRY[m].order is None, _REGISTRY[m].order or 0, m))


def collapse_study_methods() -> list[str]:
    """The methods the sequential-collapse study runs by default, in :func:`methods_in_order` order."""
    return [m for m in methods_in_order() if _REGISTRY[m].collapse_study]


def methods_in_family(family: str) -> list[str]:
    """The methods of one family (e.g. "hypernetwork": the ones ``python -m app train`` trains), in table order.

    Raises:
        ValueError: ``family`` is not one of :data:`FAMILIES`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown method family {family!r}; valid: {', '.join(FAMILIES)}")
    return [m for m in methods_in_order() if _REGISTRY[m].family == family]


def method_info(name: str) -> MethodInfo:
    """The registry's record of ``name`` (case-insensitive).

    Raises:
        UnknownMethodError: no such method (the message lists the valid ones and suggests near names).
    """
    key = name.strip().lower()
    if key not in _REGISTRY:
        discover()
    if key not in _REGISTRY:
        valid = available_methods()
        near = difflib.get_close_matches(key, valid, n=3)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise UnknownMethodError(f"unknown method {name!r}.{hint} Valid methods: {', '.join(valid)}")
    return _REGISTRY[key]


def get_editor_class(name: str) -> type[Editor]:
    """The editor class of ``name`` (case-insensitive); see :func:`method_info`."""
    return method_info(name).editor_cls


__all__ = ["FAMILIES", "MethodInfo", "UnknownMethodError", "register", "discover", "available_methods",
           "methods_in_order", "collapse_study_methods", "methods_in_family", "method_info", "get_editor_class"]
