"""Dataclass fields set from text: help metadata, type coercion, "did you mean" and the ``--set`` parser.

One implementation for every config made of dataclass fields: the method configs (:class:`editors.base.EditorConfig`,
through :func:`editors.base.make_config`) and the application's run config (``app.runconfig.RunConfig``). Values
come from the command line (``--set KEY=VALUE``), a form or a YAML preset; strings are coerced to the field's type,
and an unknown name is answered with the near names and the list of valid ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from typing import Any, Iterable, Mapping, Sequence


class ConfigError(ValueError):
    """An invalid or unknown config field; the message lists the valid ones."""


def help_meta(text: str) -> dict[str, str]:
    """Field metadata carrying its help text: ``field(default=..., metadata=help_meta("..."))``."""
    return {"help": text}


def type_name(t: Any) -> str:
    """A field's annotation as text (``"int"``, ``"tuple[int, ...]"``, ``"float | None"``)."""
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def field_default(f: dataclasses.Field) -> Any:
    """The default of a dataclass field (a fresh one for ``default_factory``; None when it has none)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def field_help(cls: type) -> list[dict]:
    """``[{name, type, default, help}]`` of every field of the dataclass ``cls`` (for forms and ``--help``)."""
    return [{"name": f.name, "type": type_name(f.type), "default": field_default(f),
             "help": f.metadata.get("help", "")} for f in dataclasses.fields(cls)]


def did_you_mean(name: str, valid: Sequence[str]) -> str:
    """``" (did you mean a, b?)"`` with the names of ``valid`` close to ``name``, or ``""``."""
    near = difflib.get_close_matches(name, list(valid), n=3)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _optional(t: str) -> tuple[str, bool]:
    """``"int | None"`` / ``"Optional[int]"`` -> ``("int", True)``; ``"int"`` -> ``("int", False)``."""
    t = t.replace(" ", "")
    if t.startswith("Optional[") and t.endswith("]"):
        return t[len("Optional["):-1], True
    parts = [p for p in t.split("|") if p]
    if "None" in parts and len(parts) > 1:
        return "|".join(p for p in parts if p != "None"), True
    return t, False


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_KINDS = {bool: "bool", int: "int", float: "float", tuple: "tuple", list: "tuple", dict: "dict", str: "str"}


def coerce(value: Any, current: Any, annotation: str) -> Any:
    """``value`` (a string from the CLI or a form, or a YAML / JSON value) as the type of a field.

    The type is that of the field's ``current`` value, else its ``annotation`` (``"int | None"``,
    ``"tuple[int, ...]"``). Strings: booleans from 1/0, true/false, yes/no, on/off; "none" / "null" / "" is None for
    an optional field; tuples from ``"1, 2"`` or a JSON list ``"[1, 2]"``; a dict from a JSON object. Other values
    pass through (a list becomes a tuple for a tuple field).

    Raises:
        ValueError: the string is not a value of the field's type (the message says what was expected).
    """
    base, optional = _optional(annotation)
    kind = _KINDS.get(type(current)) if current is not None else None
    if kind is None:
        kind = next((k for prefix, k in (("bool", "bool"), ("int", "int"), ("float", "float"), ("tuple", "tuple"),
                                         ("list", "tuple"), ("dict", "dict")) if base.startswith(prefix)), "str")
    if not isinstance(value, str):
        return tuple(value) if kind == "tuple" and isinstance(value, list) else value
    s = value.strip()
    if optional and s.lower() in ("none", "null", ""):
        return None
    if kind == "bool":
        if s.lower() not in _BOOLS:
            raise ValueError(f"expected a boolean (true/false), got {value!r}")
        return _BOOLS[s.lower()]
    if kind == "int":
        return int(s)
    if kind == "float":
        return float(s)
    if kind == "tuple":
        items = json.loads(s) if s.startswith("[") else [x.strip() for x in s.split(",") if x.strip()]
        if current:
            elem = type(current[0])
        else:
            elem = int if "int" in base else float if "float" in base else str
        return tuple(elem(x) if isinstance(x, str) else x for x in items)
    if kind == "dict":
        try:
            parsed = json.loads(s) if s else {}
        except ValueError as exc:
            raise ValueError(f"expected a JSON object, got {value!r} ({exc})") from exc
        if not isinstance(parsed, dict):
            raise ValueError(f"expected a JSON object, got {value!r}")
        return parsed
    return s


def _finite_or_inf(value: Any) -> Any:
    """``value`` unless it is (or holds) a NaN: no field means anything by NaN, and a NaN reaches the edit as a
    silent no-op or a NaN update (an infinity may mean "no limit" and passes)."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    if any(isinstance(v, float) and math.isnan(v) for v in items):
        raise ValueError(f"NaN is not a valid value (got {value!r})")
    return value


def check_names(cls: type, names: Iterable[str], *, what: str = "config field", method: str = ""
                ) -> dict[str, dataclasses.Field]:
    """The fields of the dataclass ``cls``, by name, after checking that every one of ``names`` is one of them.

    Args:
        what: how a field is named in messages ("config field", "run field").
        method: the method the fields belong to, named in messages.

    Raises:
        ConfigError: an unknown name, with the near names and the valid ones.
    """
    valid = {f.name: f for f in dataclasses.fields(cls)}
    for key in names:
        if key not in valid:
            owner = f" for method {method}" if method else ""
            raise ConfigError(f"unknown {what} {key!r}{owner}{did_you_mean(key, list(valid))}; "
                              f"valid fields: {', '.join(sorted(valid))}")
    return valid


def coerce_fields(cls: type, changes: Mapping[str, Any], current: Any = None, *, what: str = "config field",
                  method: str = "") -> dict[str, Any]:
    """``changes`` to fields of the dataclass ``cls`` with every name checked (:func:`check_names`) and every value
    coerced (:func:`coerce`) to the type of the field's value in ``current`` (default: the fields' defaults).

    Raises:
        ConfigError: an unknown name, or a value of the wrong type (naming the field).
    """
    valid = check_names(cls, changes, what=what, method=method)
    out = {}
    for key, value in changes.items():
        f = valid[key]
        now = getattr(current, key) if current is not None else field_default(f)
        try:
            out[key] = _finite_or_inf(coerce(value, now, type_name(f.type)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{what} {key!r}{f' of {method}' if method else ''}: {exc}") from exc
    return out


def _rule(lo: Any, hi: Any, lo_open: bool, hi_open: bool, integer: bool) -> str:
    """What a value must do, as the messages word it: ``"be >= 1"``, ``"be an integer > 0"``, ``"lie in (0, 1]"``."""
    kind = "an integer " if integer else ""
    if lo is not None and hi is not None:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        return f"be {kind}in {interval}" if integer else f"lie in {interval}"
    if lo is not None:
        return f"be {kind}{'>' if lo_open else '>='} {lo}"
    return f"be {kind}{'<' if hi_open else '<='} {hi}"


def check_range(name: str, value: Any, lo: Any = None, hi: Any = None, *, lo_open: bool = False,
                hi_open: bool = False, integer: bool = False, optional: bool = False, note: str = "") -> None:
    """Check that the field ``name`` holds a number within the bounds (closed unless ``lo_open`` / ``hi_open``).

    A NaN lies within no bounds. Messages name the field, the bounds and the value:
    ``"r must be >= 1, got 0"``, ``"keep_fraction must lie in (0, 1], got 1.5"``, ``"general_n must be >= 1 or None,
    got 0"``, ``"n_edits must be an integer >= 1, got 2.5"``.

    Args:
        integer: the value must also be an ``int``.
        optional: None is valid too.
        note: what the bounds mean, in parentheses after them.

    Raises:
        ConfigError: the value is outside the bounds (or not an int with ``integer``).
    """
    if optional and value is None:
        return
    ok = not integer or isinstance(value, int)
    if ok and lo is not None:
        ok = lo < value if lo_open else lo <= value
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        rule = _rule(lo, hi, lo_open, hi_open, integer)
        raise ConfigError(f"{name} must {rule}{' or None' if optional else ''}{f' ({note})' if note else ''}, "
                          f"got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """Check that the field ``name`` holds one of ``choices``.

    Raises:
        ConfigError: ``"<name> must be one of a, b, got 'c'"``.
    """
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_indices(name: str, values: Sequence[int]) -> None:
    """Check that the field ``name`` holds distinct non-negative indices (layers; any order, possibly none).

    Raises:
        ConfigError: ``"<name> must be non-negative, got (1, -1)"`` or ``"<name> has duplicates: (1, 1)"``.
    """
    if any(int(x) < 0 for x in values):
        raise ConfigError(f"{name} must be non-negative, got {values}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name} has duplicates: {values}")


def parse_sets(pairs: Sequence[str], *, form: str = "KEY=VALUE") -> dict[str, str]:
    """``--set KEY=VALUE`` strings as ``{key: value}`` (keys stripped, values as given; a later key wins).

    Raises:
        ConfigError: a string without ``=`` or with an empty key (``form`` is what the message asks for).
    """
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects {form}, got {pair!r}")
        out[key] = value
    return out


def parse_method_sets(pairs: Sequence[str], methods: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
    """``--set METHOD.KEY=VALUE`` strings (the study's and the editor benchmark's) as ``{method: {key: value}}``.

    Args:
        methods: when given, METHOD must be one of them (the command's ``--methods``).
    """
    form = "METHOD.KEY=VALUE"
    out: dict[str, dict[str, str]] = {}
    for pair in pairs:
        (key, value), = parse_sets([pair], form=form).items()
        method, dot, name = key.partition(".")
        if not dot or not method or not name:
            raise ConfigError(f"--set expects {form}, got {pair!r}")
        if methods is not None and method not in methods:
            raise ConfigError(f"--set expects {form} for a method of --methods, got {pair!r}")
        out.setdefault(method, {})[name] = value
    return out


__all__ = ["ConfigError", "help_meta", "type_name", "field_default", "field_help", "did_you_mean", "coerce",
           "check_names", "coerce_fields", "check_range", "check_choice", "check_indices", "parse_sets",
           "parse_method_sets"]
