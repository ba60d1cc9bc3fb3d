"""Context templates (editors/templates.py) on a tiny random model."""
from __future__ import annotations

import os

import pytest

from editors import templates
from editors.templates import parse_template_spec

# cheap templates for unit tests: "{}" + one sampled prefix of 4 tokens per start word
SMALL_SPEC = "4:5"


@pytest.fixture()
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


def test_context_templates_shape_determinism_and_cache(tiny_llama, cache_dir, monkeypatch):
    groups = templates.context_template_groups(tiny_llama, 0, SMALL_SPEC, cache_dir=cache_dir)
    assert groups[0] == ["{}"] and len(groups) == 2 and len(groups[1]) == 5
    flat = templates.context_templates(tiny_llama, 0, SMALL_SPEC, cache_dir=cache_dir)
    assert flat == [t for g in groups for t in g]
    for t in flat:
        assert t.count("{}") == 1 and t.endswith("{}")
        assert t.replace("{}", "").count("{") == 0 and t.replace("{}", "").count("}") == 0
    # cached on disk: a second call samples nothing
    files = [f for _, _, fs in os.walk(cache_dir) for f in fs if f.endswith(".json")]
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("templates were sampled again instead of read from the cache")

    monkeypatch.setattr(templates, "_sample_prefixes", boom)
    assert templates.context_template_groups(tiny_llama, 0, SMALL_SPEC, cache_dir=cache_dir) == groups


def test_context_templates_seeded(tiny_llama, tmp_path):
    a = templates.context_templates(tiny_llama, 3, SMALL_SPEC, cache_dir=str(tmp_path / "a"))
    b = templates.context_templates(tiny_llama, 3, SMALL_SPEC, cache_dir=str(tmp_path / "b"))
    c = templates.context_templates(tiny_llama, 4, SMALL_SPEC, cache_dir=str(tmp_path / "c"))
    assert a == b and a != c


def test_template_specs_named():
    assert parse_template_spec("rome") == ((5, 10), (10, 10))
    assert parse_template_spec("memit") == ((10, 5),)
    assert parse_template_spec("5:10,10:10") == ((5, 10), (10, 10))
    with pytest.raises(ValueError, match="unknown context-template spec"):
        parse_template_spec("romee")
