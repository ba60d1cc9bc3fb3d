"""The method registry (editors/registry.py): discovery of method modules, metadata, order, errors."""
from __future__ import annotations

import sys
import textwrap

import pytest

import editors
from editors import registry
from editors.base import Editor

NEW_METHOD = '''
from editors.base import Editor
from editors.registry import register


@register(family="memory", tiny={"layers": (1,)})
class ZZProbeEditor(Editor):
    name = "zz-probe"
    summary = "a method module the registry has never been told about"
'''


@pytest.fixture()
def isolated_registry(monkeypatch):
    """The registry with every shipped method, restored after the test (whatever the test registers)."""
    registry.discover()  # first, so that the shipped methods register into the registry that is kept
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry


def test_a_new_method_module_is_discovered_without_editing_anything(tmp_path, monkeypatch, isolated_registry):
    (tmp_path / "zz_probe_method.py").write_text(textwrap.dedent(NEW_METHOD), encoding="utf-8")
    monkeypatch.setattr(editors, "__path__", [*editors.__path__, str(tmp_path)])
    try:
        assert "zz-probe" in registry.available_methods()
        info = registry.method_info("ZZ-Probe")
        assert info.family == "memory" and not info.collapse_study and dict(info.tiny) == {"layers": (1,)}
        assert info.module == "editors.zz_probe_method"  # so the contract table gives it rows
        order = registry.methods_in_order()
        assert order[-1] == "zz-probe"  # no order: after every ordered method
        assert "zz-probe" not in registry.collapse_study_methods()
    finally:
        sys.modules.pop("editors.zz_probe_method", None)


def test_discovery_leaves_the_test_helpers_alone(monkeypatch, isolated_registry):
    monkeypatch.delitem(sys.modules, "editors.testing", raising=False)
    registry.discover()
    assert "editors.testing" not in sys.modules


def test_order_and_collapse_study_defaults():
    order = registry.methods_in_order()
    assert sorted(order) == registry.available_methods() and len(set(order)) == len(order)
    ordered = [m for m in order if registry.method_info(m).order is not None]
    assert [registry.method_info(m).order for m in ordered] == sorted(registry.method_info(m).order for m in ordered)
    assert order[:4] == ["rome", "ft", "ft-c", "memit"]
    assert registry.collapse_study_methods() == ["rome", "memit", "alphaedit", "rect", "prune", "adaedit", "mose",
                                                 "ultraedit", "grace"]  # issue 18: the lifelong paradigms
    assert registry.methods_in_family("hypernetwork") == ["malmen", "agrade"]
    assert registry.methods_in_family("fine-tuning") == ["ft", "ft-c", "lora", "flearning", "geoedit", "geoedit-mw"]
    assert registry.methods_in_family("memory") == ["grace"]
    assert registry.methods_in_family("lifelong") == ["ultraedit"]
    with pytest.raises(ValueError, match="unknown method family"):
        registry.methods_in_family("hypernet")


def test_register_rejects_duplicates_unknown_families_and_nameless_classes(isolated_registry):
    class One(Editor):
        name = "zz-dup"

    class Two(Editor):
        name = "zz-dup"

    registry.register(One)
    registry.register(One)  # the same class again is fine (a module imported twice)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Two)
    with pytest.raises(ValueError, match="unknown method family 'retrieval'.*locate-then-edit"):
        registry.register(family="retrieval")

    class Nameless(Editor):
        pass

    with pytest.raises(ValueError, match="has no name"):
        registry.register(family="memory")(Nameless)
    assert registry.method_info("zz-dup").family == ""  # bare @register: no metadata


def test_unknown_method_suggests_near_names():
    with pytest.raises(registry.UnknownMethodError) as err:
        registry.get_editor_class("memitt")
    msg = str(err.value)
    assert "unknown method 'memitt'" in msg and "Did you mean memit" in msg and "Valid methods:" in msg


def test_app_defaults_derive_from_the_registry():
    """The study's default methods are the registry's collapse-study methods; the trainer's method list (spelled out
    so that the CLI parser imports no editor) is the registry's hypernetwork family."""
    from app.study import DEFAULT_METHODS
    from app.train import HYPERNET_METHODS

    assert list(DEFAULT_METHODS) == registry.collapse_study_methods()
    assert list(HYPERNET_METHODS) == registry.methods_in_family("hypernetwork")
