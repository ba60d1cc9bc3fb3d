"""editors/fields.py: the one coercion, field help, "did you mean" and ``--set`` parser of method and run configs."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from editors.fields import (
    ConfigError,
    check_choice,
    check_indices,
    check_range,
    coerce,
    coerce_fields,
    did_you_mean,
    field_help,
    help_meta,
    parse_method_sets,
    parse_sets,
)


@dataclass
class _Cfg:
    layers: tuple[int, ...] = field(default=(4, 5), metadata=help_meta("edited layers"))
    names: tuple[str, ...] = ("a", "b")
    lr: float = 0.5
    steps: int = 3
    adjust: bool = True
    limit: int | None = None
    device: str | None = None
    extra: dict = field(default_factory=dict)
    label: str = ""


def test_coerce_by_current_value_and_annotation():
    assert coerce("3, 4 ,5", (4, 5), "tuple[int, ...]") == (3, 4, 5)
    assert coerce("[6]", (4, 5), "tuple[int, ...]") == (6,)
    assert coerce("x, y", (), "tuple[str, ...]") == ("x", "y")  # stripped, str by the annotation
    assert coerce("1,2", (), "tuple[int, ...]") == (1, 2)
    assert coerce([1, 2], (4,), "tuple[int, ...]") == (1, 2)  # YAML lists become tuples
    assert coerce("0.1", 0.5, "float") == 0.1 and coerce("7", 3, "int") == 7
    assert coerce("off", True, "bool") is False and coerce("Yes", False, "bool") is True
    assert coerce("12", None, "int | None") == 12 and coerce("None", None, "int | None") is None
    assert coerce("none", 5, "Optional[int]") is None and coerce("2.5", None, "float | None") == 2.5
    assert coerce("cuda", None, "str | None") == "cuda" and coerce("", None, "str | None") is None
    assert coerce(" none ", "", "str") == "none"  # not optional: the text itself
    assert coerce('{"layers": [1]}', {}, "dict") == {"layers": [1]}
    with pytest.raises(ValueError, match="expected a boolean"):
        coerce("maybe", True, "bool")
    with pytest.raises(ValueError, match="JSON object"):
        coerce("[1]", {}, "dict")
    with pytest.raises(ValueError):
        coerce("big", 3, "int")


def test_coerce_fields_names_the_field_and_suggests():
    out = coerce_fields(_Cfg, {"layers": "1,2", "device": "none", "adjust": "false"})
    assert out == {"layers": (1, 2), "device": None, "adjust": False}
    with pytest.raises(ConfigError) as e:
        coerce_fields(_Cfg, {"stesp": "2"}, method="demo")
    msg = str(e.value)
    assert "unknown config field 'stesp' for method demo" in msg and "did you mean steps" in msg
    assert "valid fields: adjust, device, extra, label, layers, limit, lr, names, steps" in msg
    with pytest.raises(ConfigError, match="run field 'steps': invalid literal"):
        coerce_fields(_Cfg, {"steps": "many"}, what="run field")
    assert did_you_mean("zzz", ["steps"]) == ""


def test_field_help_lists_every_field_with_default_and_help():
    rows = {r["name"]: r for r in field_help(_Cfg)}
    assert list(rows) == ["layers", "names", "lr", "steps", "adjust", "limit", "device", "extra", "label"]
    assert rows["layers"] == {"name": "layers", "type": "tuple[int, ...]", "default": (4, 5), "help": "edited layers"}
    assert rows["extra"]["default"] == {} and rows["limit"]["type"] == "int | None" and rows["lr"]["help"] == ""


def test_parse_sets_and_method_sets():
    assert parse_sets(["lr=0.1", " run.eval_every =5", "layers=1,2", "lr=0.2", "note=a=b"]) == \
        {"lr": "0.2", "run.eval_every": "5", "layers": "1,2", "note": "a=b"}
    for bad in ("lr", "=3"):
        with pytest.raises(ConfigError, match=f"--set expects KEY=VALUE, got '{bad}'"):
            parse_sets([bad])
    assert parse_method_sets(["mose.lam=50", "rome.layer=3", "mose.k=2"]) == \
        {"mose": {"lam": "50", "k": "2"}, "rome": {"layer": "3"}}
    for bad in ("mose", "lam=50", "mose.=50", ".lam=5"):
        with pytest.raises(ConfigError, match=f"--set expects METHOD.KEY=VALUE, got '{bad}'"):
            parse_method_sets([bad])
    with pytest.raises(ConfigError, match="for a method of --methods, got 'adaedit.r=100'"):
        parse_method_sets(["adaedit.r=100"], methods=["rome"])


def _range_error(*args, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        check_range(*args, **kw)
    return str(e.value)


def test_check_range_bounds_open_and_closed():
    check_range("r", 1, 1)  # a closed bound admits itself
    assert _range_error("r", 0, 1) == "r must be >= 1, got 0"
    assert _range_error("lr", 0, 0, lo_open=True) == "lr must be > 0, got 0"  # an open one does not
    check_range("lr", 1e-12, 0, lo_open=True)
    check_range("keep_fraction", 1, 0, 1, lo_open=True)
    for bad in (0, 1.5, -0.1):
        assert _range_error("keep_fraction", bad, 0, 1, lo_open=True) == \
            f"keep_fraction must lie in (0, 1], got {bad}"
    check_range("dropout", 0, 0, 1, hi_open=True)
    assert _range_error("dropout", 1, 0, 1, hi_open=True) == "dropout must lie in [0, 1), got 1"
    check_range("p", 1, 0, 1)
    assert _range_error("p", 1.01, 0, 1) == "p must lie in [0, 1], got 1.01"
    assert _range_error("t", 5, hi=5, hi_open=True) == "t must be < 5, got 5"
    check_range("t", 5, hi=5)
    assert _range_error("t", 6, hi=5) == "t must be <= 5, got 6"
    for kw in ({"lo": 0}, {"lo": 0, "lo_open": True}, {"hi": 1}, {"lo": 0, "hi": 1}):
        with pytest.raises(ConfigError, match="got nan"):  # a NaN lies within no bounds
            check_range("x", float("nan"), **kw)


def test_check_range_integer_optional_and_note():
    check_range("n_edits", 3, 1, integer=True)
    assert _range_error("n_edits", 2.5, 1, integer=True) == "n_edits must be an integer >= 1, got 2.5"
    assert _range_error("n_edits", "3", 1, integer=True) == "n_edits must be an integer >= 1, got '3'"
    assert _range_error("n_edits", 0, 1, integer=True) == "n_edits must be an integer >= 1, got 0"
    check_range("general_n", None, 1, optional=True)
    assert _range_error("general_n", 0, 1, optional=True) == "general_n must be >= 1 or None, got 0"
    assert _range_error("retention_sample", -1, 0, integer=True, note="0 = every edit") == \
        "retention_sample must be an integer >= 0 (0 = every edit), got -1"
    with pytest.raises(TypeError):  # None is a value only for an optional field
        check_range("general_n", None, 1)


def test_check_choice_names_the_field_and_the_choices():
    check_choice("mode", "lora", ("ft", "lora"))
    with pytest.raises(ConfigError) as e:
        check_choice("mode", "LoRA", ("ft", "lora"))
    assert str(e.value) == "mode must be one of ft, lora, got 'LoRA'"
    with pytest.raises(ConfigError, match="must be one of a, b, got None"):
        check_choice("x", None, iter(["a", "b"]))  # any iterable of choices, listed in order


def test_method_configs_report_the_checks_with_the_method():
    from editors.base import make_config
    from editors.rect import RECTConfig
    with pytest.raises(ConfigError, match=r"^rect: keep_fraction must lie in \(0, 1\], got 0$"):
        make_config(RECTConfig, {"keep_fraction": 0}, method="rect")
    with pytest.raises(ConfigError, match=r"^rect: base must be one of rome, memit, got 'pmet'$"):
        make_config(RECTConfig, {"base": "pmet"}, method="rect")
    assert make_config(RECTConfig, {"keep_fraction": 1, "eps": 0}, method="rect").keep_fraction == 1


def test_check_indices_distinct_and_non_negative():
    check_indices("layers", ())
    check_indices("layers", (3, 1, 2))  # any order
    with pytest.raises(ConfigError, match=r"^layers must be non-negative, got \(1, -1\)$"):
        check_indices("layers", (1, -1))
    with pytest.raises(ConfigError, match=r"^layers has duplicates: \(2, 0, 2\)$"):
        check_indices("layers", (2, 0, 2))
