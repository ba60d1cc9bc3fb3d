"""Context templates (editors/templates.py) on a tiny random model."""
from __future__ import annotations

import json
import os

import pytest
import torch

from editors import templates
from editors.templates import check_template_source, load_template_file, parse_template_spec, resolve_context_templates

# cheap templates for unit tests: "{}" + one sampled prefix of 4 tokens per start word
SMALL_SPEC = "4:5"


@pytest.fixture()
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


def _files(folder):
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".json")]


def test_context_templates_shape_determinism_and_cache(tiny_llama, cache_dir, monkeypatch):
    groups = templates.context_template_groups(tiny_llama, 0, SMALL_SPEC, cache_dir=cache_dir)
    assert groups[0] == ["{}"] and len(groups) == 2 and len(groups[1]) == 5
    flat = templates.context_templates(tiny_llama, 0, SMALL_SPEC, cache_dir=cache_dir)
    assert flat == [t for g in groups for t in g]
    for t in flat:
        assert t.count("{}") == 1 and t.endswith("{}")
        assert t.replace("{}", "").count("{") == 0 and t.replace("{}", "").count("}") == 0
    # cached on disk: a second call samples nothing
    files = _files(cache_dir)
    assert len(files) == 1
    with open(files[0], encoding="utf-8") as fh:
        assert json.load(fh)["key"]["v"] == templates._TEMPLATE_FORMAT_VERSION == 2

    def boom(*a, **k):
        raise AssertionError("templates were sampled again instead of read from the cache")

    monkeypatch.setattr(templates, "_sample_rows", boom)
    assert templates.context_template_groups(tiny_llama, 0, SMALL_SPEC, cache_dir=cache_dir) == groups


def test_context_templates_of_an_older_format_are_not_reused(tiny_llama, cache_dir, monkeypatch):
    monkeypatch.setattr(templates, "_TEMPLATE_FORMAT_VERSION", 1)
    templates.context_template_groups(tiny_llama, 0, SMALL_SPEC, cache_dir=cache_dir)
    monkeypatch.setattr(templates, "_TEMPLATE_FORMAT_VERSION", 2)
    calls = []
    real = templates._sample_rows
    monkeypatch.setattr(templates, "_sample_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    templates.context_template_groups(tiny_llama, 0, SMALL_SPEC, cache_dir=cache_dir)
    assert calls == [1] and len(_files(cache_dir)) == 2


def test_context_templates_seeded(tiny_llama, tmp_path):
    a = templates.context_templates(tiny_llama, 3, "rome", cache_dir=str(tmp_path / "a"))
    b = templates.context_templates(tiny_llama, 3, "rome", cache_dir=str(tmp_path / "b"))
    c = templates.context_templates(tiny_llama, 4, "rome", cache_dir=str(tmp_path / "c"))
    assert len(a) == 21 and a == b and a != c


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_sampling_matches_plain_forwards(arch):
    """One left-padded, KV-cached batch draws what row-by-row full forwards (no cache, no padding) give with the
    same generator: rows of different prompt lengths and total lengths, the longest setting the step count."""
    from editors.testing import tiny_model
    lm = tiny_model(arch)
    tok, model = lm.tokenizer, lm.model
    rows = [(tok("The")["input_ids"], 4), (tok("Because of this, the")["input_ids"], 9),
            (tok("I")["input_ids"], 7), (tok("You")["input_ids"], 1)]
    assert len({len(p) for p, _ in rows}) > 1
    got = templates._sample_rows(lm, rows, 5, torch.Generator().manual_seed(7))

    gen = torch.Generator().manual_seed(7)
    seqs = [list(p) for p, _ in rows]
    want = [max(0, n - len(p)) for p, n in rows]
    unembed = model.get_output_embeddings()
    with torch.no_grad():
        for step in range(max(want)):
            probs, idxs = [], []
            for s in seqs:
                h = model.base_model(input_ids=torch.tensor([s])).last_hidden_state[0, -1]
                top, idx = unembed(h).float().topk(5)
                probs.append(torch.softmax(top, -1))
                idxs.append(idx)
            pick = torch.multinomial(torch.stack(probs), 1, generator=gen)[:, 0]
            for r, s in enumerate(seqs):
                if step < want[r]:
                    s.append(int(idxs[r][pick[r]]))
    assert got == seqs
    assert [len(s) for s in got] == [4, 9, 7, 1]


def test_clean_generation_is_the_references():
    # EasyEdit generate_fast: NFKD, "\n\n" -> " "; get_context_templates: braces -> spaces; single newlines stay
    assert templates._clean_generation("I\n* The {x}\n\nend ﬁ") == "I\n* The  x  end fi"


def test_explicit_templates_list_json_and_files(tmp_path):
    flat = ["{}", "A. {}", "B. {}"]
    assert resolve_context_templates(None, flat) == [flat]
    groups = [["{}"], ["A. {}", "B. {}"]]
    assert resolve_context_templates(None, groups) == groups
    assert resolve_context_templates(None, json.dumps(groups)) == groups
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"context_templates": flat, "other": 1}))
    assert load_template_file(str(p)) == [flat] == resolve_context_templates(None, str(p))
    q = tmp_path / "t.txt"
    q.write_text("{}\n\nA. {}\nB. {}\n")
    assert resolve_context_templates(None, str(q)) == groups
    check_template_source(str(q))
    check_template_source("rome")


@pytest.mark.parametrize("source, message", [
    ("romee", "unknown context-template spec"),
    (["{}", "no slot"], "exactly one"),
    ([["{}"], []], "group 1 is empty"),
    (["{}", ["A. {}"]], "not a mix"),
    ("[1, 2", "not a valid JSON list"),
    ("missing/templates.json", "does not exist"),
    (3, "must be a spec"),
])
def test_bad_template_sources_say_what_is_wrong(source, message):
    with pytest.raises(ValueError, match=message):
        check_template_source(source)


def test_bad_template_file_is_named(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"templates": ["{}"]}))
    with pytest.raises(ValueError, match=r"bad\.json.*'context_templates'"):
        check_template_source(str(p))
    p.write_text(json.dumps(["{}", "x"]))
    with pytest.raises(ValueError, match=r"bad\.json.*exactly one"):
        check_template_source(str(p))


def test_configs_take_explicit_templates(tiny_llama, tmp_path):
    """ROME and the MEMIT family use the given templates as they are (nothing is sampled)."""
    from editors.base import ConfigError, make_config
    from editors.memit import MEMITConfig, MEMITEditor
    from editors.rome import ROMEConfig, ROMEEditor
    flat = ["{}", "First. {}", "Second. {}"]
    ed = ROMEEditor(tiny_llama, make_config(ROMEConfig, {"layer": 1, "context_templates": flat}),
                    cache_dir=str(tmp_path))
    ed.prepare()
    assert ed.templates == flat and not _files(str(tmp_path))
    groups = [["{}"], ["First. {}", "Second. {}"]]
    ed = MEMITEditor(tiny_llama, make_config(MEMITConfig, {"layers": (1, 2), "mom2_n_tokens": 500,
                                                           "context_templates": json.dumps(groups)}),
                     cache_dir=str(tmp_path))
    ed.prepare()
    assert ed.templates == groups
    with pytest.raises(ConfigError, match="exactly one"):
        make_config(ROMEConfig, {"context_templates": ["{}", "none"]})


def test_template_specs_named():
    assert parse_template_spec("rome") == ((5, 10), (10, 10))
    assert parse_template_spec("memit") == ((10, 5),)
    assert parse_template_spec("5:10,10:10") == ((5, 10), (10, 10))
    with pytest.raises(ValueError, match="unknown context-template spec"):
        parse_template_spec("romee")
