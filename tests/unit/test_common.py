"""The shared locate-then-edit machinery (editors/common.py) on tiny random models and the default tokenizer."""
from __future__ import annotations

import math
import os

import pytest
import torch

from editors import common
from editors.hooks import Trace
from editors.requests import make_request
from editors.testing import default_tokenizer, tiny_model

REQ = make_request(source="test_common", record=0, case_id="eiffel",
                   prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
                   target_new="Rome Italy", target_true="Paris")
REQ2 = make_request(source="test_common", record=1, case_id="darrieux",
                    prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                    target_new="English", target_true="French")
# cheap templates for unit tests: "{}" + one sampled prefix of 4 tokens per start word
SMALL_SPEC = "4:5"


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture()
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------------------
# subject token
# ---------------------------------------------------------------------------------------------------------------
def _check_subject_index(tok, text: str, subject: str, start: int | None = None) -> int:
    idx = common.subject_token_index(tok, text, subject, start)
    if start is None:
        start = text.rfind(subject)
    end = start + len(subject)
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    a, b = offsets[idx]
    # the token covers the subject's last character, and no later token touches the subject
    assert a <= end - 1 < b, (text, subject, offsets[idx])
    assert all(o_a >= end or o_b <= o_a for o_a, o_b in offsets[idx + 1:])
    return idx


@pytest.mark.parametrize("text,subject", [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
    ("Danielle Darrieux's mother tongue is", "Danielle Darrieux"),  # possessive right after the subject
    ("Where is Zürich? It is in", "Zürich"),  # non-ASCII
    ("東京 is the capital of", "東京"),  # multi-byte characters, subject at the very start
    ("The capital of France is Paris", "Paris"),  # subject at the very end
    ("Towers of London are old", "Tower"),  # a token straddles the subject's end
    ("  spaced   subject  here", "subject"),
    ("iPhone 15 Pro Max was made by", "iPhone 15 Pro Max"),
])
def test_subject_token_index_tricky(tok, text, subject):
    idx = _check_subject_index(tok, text, subject)
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert 0 <= idx < len(ids)


def test_subject_token_index_picks_the_given_occurrence(tok):
    text = "Paris is nice. I said Paris"
    last = _check_subject_index(tok, text, "Paris")
    first = _check_subject_index(tok, text, "Paris", start=0)
    assert first < last
    assert first == common.subject_token_index(tok, "Paris is nice.", "Paris")


def test_subject_token_index_errors(tok):
    with pytest.raises(ValueError, match="does not occur"):
        common.subject_token_index(tok, "The capital of France is", "Berlin")
    with pytest.raises(ValueError, match="not at character"):
        common.subject_token_index(tok, "The capital of France is", "France", start=0)


def test_fill_template_marks_the_slot_occurrence():
    text, start = common.fill_template("The Eiffel Tower. {}", REQ)
    assert text == "The Eiffel Tower. " + REQ.prompt
    assert start == len("The Eiffel Tower. ") and text[start:start + len(REQ.subject)] == REQ.subject


def test_target_token_ids_have_leading_space(tok):
    ids = common.target_token_ids(tok, "Rome")
    assert tok.decode(ids) == " Rome"


# ---------------------------------------------------------------------------------------------------------------
# context templates
# ---------------------------------------------------------------------------------------------------------------
def test_context_templates_shape_determinism_and_cache(tiny_llama, cache_dir, monkeypatch):
    groups = common.context_template_groups(tiny_llama, 0, SMALL_SPEC, cache_dir=cache_dir)
    assert groups[0] == ["{}"] and len(groups) == 2 and len(groups[1]) == 5
    flat = common.context_templates(tiny_llama, 0, SMALL_SPEC, cache_dir=cache_dir)
    assert flat == [t for g in groups for t in g]
    for t in flat:
        assert t.count("{}") == 1 and t.endswith("{}")
        assert t.replace("{}", "").count("{") == 0 and t.replace("{}", "").count("}") == 0
    # cached on disk: a second call samples nothing
    files = [f for _, _, fs in os.walk(cache_dir) for f in fs if f.endswith(".json")]
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("templates were sampled again instead of read from the cache")

    monkeypatch.setattr(common, "_sample_prefixes", boom)
    assert common.context_template_groups(tiny_llama, 0, SMALL_SPEC, cache_dir=cache_dir) == groups


def test_context_templates_seeded(tiny_llama, tmp_path):
    a = common.context_templates(tiny_llama, 3, SMALL_SPEC, cache_dir=str(tmp_path / "a"))
    b = common.context_templates(tiny_llama, 3, SMALL_SPEC, cache_dir=str(tmp_path / "b"))
    c = common.context_templates(tiny_llama, 4, SMALL_SPEC, cache_dir=str(tmp_path / "c"))
    assert a == b and a != c


def test_template_specs_named():
    assert common._parse_template_spec("rome") == ((5, 10), (10, 10))
    assert common._parse_template_spec("memit") == ((10, 5),)
    assert common._parse_template_spec("5:10,10:10") == ((5, 10), (10, 10))
    with pytest.raises(ValueError, match="unknown context-template spec"):
        common._parse_template_spec("romee")


# ---------------------------------------------------------------------------------------------------------------
# keys and values
# ---------------------------------------------------------------------------------------------------------------
TEMPLATES = ["{}", "A short prefix. {}", "Another, longer prefix of text here. {}"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compute_keys_shape_and_value(arch):
    lm = tiny_model(arch)
    K = common.compute_keys(lm, 1, [REQ, REQ2], TEMPLATES)
    assert K.shape == (2, lm.spec.mlp_size) and K.dtype == torch.float32
    # the plain mean over templates of the projection's input at the subject's last token (full forward)
    name = lm.spec.mlp_out_module(1)
    expected = []
    for req in (REQ, REQ2):
        ks = []
        for t in TEMPLATES:
            text, start = common.fill_template(t, req)
            idx = common.subject_token_index(lm.tokenizer, text, req.subject, start)
            ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
            with Trace(lm.model, [name], retain_input=True) as tr, torch.no_grad():
                lm.model(input_ids=ids)
            ks.append(tr.inputs[name][0, idx])
        expected.append(torch.stack(ks).mean(0))
    torch.testing.assert_close(K, torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_compute_keys_groups_average_groups_first(tiny_llama):
    groups = [["{}"], TEMPLATES[1:]]
    K = common.compute_keys(tiny_llama, 1, [REQ], groups)[0]
    k0 = common.compute_keys(tiny_llama, 1, [REQ], ["{}"])[0]
    k1 = common.compute_keys(tiny_llama, 1, [REQ], TEMPLATES[1:])[0]
    torch.testing.assert_close(K, (k0 + k1) / 2)


def test_compute_keys_stops_after_the_traced_layer(tiny_llama):
    calls = []
    top = tiny_llama.model.get_submodule(tiny_llama.spec.layer(tiny_llama.spec.n_layers - 1))
    handle = top.register_forward_hook(lambda *a: calls.append(1))
    try:
        common.compute_keys(tiny_llama, 1, [REQ], TEMPLATES)
    finally:
        handle.remove()
    assert calls == []


def test_current_values_shape(tiny_gpt2):
    for site in ("residual", "mlp_out"):
        V = common.current_values(tiny_gpt2, 2, [REQ, REQ2], site=site)
        assert V.shape == (2, tiny_gpt2.spec.hidden_size)
    with pytest.raises(ValueError, match="unknown edit site"):
        common.current_values(tiny_gpt2, 2, [REQ], site="attn")


# ---------------------------------------------------------------------------------------------------------------
# target values
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("site", ["mlp_out", "residual"])
def test_target_values_fast_matches_reference_and_reduces_loss(arch, site):
    lm = tiny_model(arch)
    kw = dict(site=site, templates=TEMPLATES, steps=6, lr=0.5, weight_decay=1e-3, clamp_norm_factor=4.0,
              kl_factor=0.0625, early_stop_loss=0.0)
    Zf, info_f = common.compute_target_values(lm, [REQ, REQ2], 1, fast=True, **kw)
    Zr, info_r = common.compute_target_values(lm, [REQ, REQ2], 1, fast=False, **kw)
    assert Zf.shape == (2, lm.spec.hidden_size)
    torch.testing.assert_close(Zf, Zr, rtol=1e-4, atol=1e-5)
    for a, b in zip(info_f["loss"], info_r["loss"]):
        assert math.isclose(a, b, rel_tol=1e-4)
    # the optimisation lowers the NLL of the target (first forward: delta = 0)
    Z0, info0 = common.compute_target_values(lm, [REQ, REQ2], 1, fast=True, **{**kw, "steps": 1})
    torch.testing.assert_close(Z0, info0["init"])
    for before, after in zip(info0["nll"], info_f["nll"]):
        assert after < before
    # clamp: ||z - init|| <= clamp * ||init||
    for z, init in zip(Zf, info_f["init"]):
        assert (z - init).norm() <= 4.0 * init.norm() * (1 + 1e-5)


def test_target_values_reach_the_target_on_a_tiny_model():
    """A random tiny model's logits are bounded by its final norm (|logit| <= ~1.3, p <= ~1e-4 for any token), so
    the unembedding is scaled up; the prompt ends with the subject so the target is read where delta is added."""
    lm = tiny_model("llama", tie=False)
    with torch.no_grad():
        lm.model.get_output_embeddings().weight.mul_(50.0)
    req = make_request(source="test_common", record=2, case_id="bare", prompt="Danielle Darrieux",
                       subject="Danielle Darrieux", target_new="English")
    for site in ("residual", "mlp_out"):
        Z, info = common.compute_target_values(lm, [req], 2, site=site, templates=["{}"], steps=30, lr=1.0,
                                               weight_decay=0.0, clamp_norm_factor=100.0, kl_factor=0.0)
        assert info["target_prob"][0] > 0.95
        assert info["steps"][0] < 29  # stopped early at loss < 5e-2


def test_target_values_loss_layer(tiny_gpt2):
    Z, info = common.compute_target_values(tiny_gpt2, [REQ], 1, templates=TEMPLATES, steps=3, loss_layer=2)
    Zr, info_r = common.compute_target_values(tiny_gpt2, [REQ], 1, templates=TEMPLATES, steps=3, loss_layer=2,
                                              fast=False)
    torch.testing.assert_close(Z, Zr, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="loss layer"):
        common.compute_target_values(tiny_gpt2, [REQ], 2, templates=TEMPLATES, loss_layer=1)


def test_target_values_leave_the_model_alone(tiny_llama):
    before = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in tiny_llama.model.named_parameters()}
    common.compute_target_values(tiny_llama, [REQ], 1, templates=TEMPLATES, steps=2)
    for n, p in tiny_llama.model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None
    assert not tiny_llama.model.training


# ---------------------------------------------------------------------------------------------------------------
# covariance
# ---------------------------------------------------------------------------------------------------------------
def test_layer_covariance_symmetric_psd_and_cached(cache_dir, monkeypatch):
    lm = tiny_model("gpt2")
    Cs = common.layer_covariances(lm, [1, 2], n_tokens=2000, seq_len=128, cache_dir=cache_dir)
    assert set(Cs) == {1, 2}
    for C in Cs.values():
        assert C.shape == (lm.spec.mlp_size, lm.spec.mlp_size) and C.dtype == torch.float32
        torch.testing.assert_close(C, C.T)
        assert torch.linalg.eigvalsh(C.double()).min() > -1e-6 * C.abs().max()
    files = sorted(f for _, _, fs in os.walk(cache_dir) for f in fs if f.endswith(".safetensors"))
    assert len(files) == 2

    def boom(*a, **k):
        raise AssertionError("statistics were recomputed instead of read from the cache")

    monkeypatch.setattr(common, "_corpus_windows", boom)
    C1 = common.layer_covariance(lm, 1, n_tokens=2000, seq_len=128, cache_dir=cache_dir, dtype=torch.float64)
    assert C1.dtype == torch.float64
    torch.testing.assert_close(C1.float(), Cs[1])


def test_layer_covariance_matches_a_direct_computation(cache_dir):
    lm = tiny_model("llama")
    C = common.layer_covariance(lm, 1, n_tokens=256, seq_len=128, cache_dir=cache_dir, dtype=torch.float64)
    windows = common._corpus_windows(lm.tokenizer, common.builtin_corpus_text(), 256, 128)
    name = lm.spec.mlp_out_module(1)
    with Trace(lm.model, [name], retain_input=True) as tr, torch.no_grad():
        lm.model(input_ids=windows)
    K = tr.inputs[name].reshape(-1, lm.spec.mlp_size).double()
    torch.testing.assert_close(C, K.T @ K / K.shape[0], rtol=1e-5, atol=1e-7)


def test_layer_covariance_refuses_an_edited_model(cache_dir):
    lm = tiny_model("llama", seed=5)
    W = lm.model.get_parameter(lm.spec.mlp_out_weight(0))
    with torch.no_grad():
        W.add_(1.0)
    try:
        with pytest.raises(RuntimeError, match="unedited"):
            common.layer_covariance(lm, 0, n_tokens=256, seq_len=128, cache_dir=cache_dir)
    finally:
        with torch.no_grad():
            W.sub_(1.0)


def test_layer_covariance_user_corpus(tmp_path, cache_dir):
    lm = tiny_model("llama")
    path = tmp_path / "my corpus.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    C = common.layer_covariance(lm, 1, corpus=str(path), n_tokens=256, seq_len=64, cache_dir=cache_dir)
    assert C.shape == (lm.spec.mlp_size, lm.spec.mlp_size)
    with pytest.raises(FileNotFoundError):
        common.layer_covariance(lm, 1, corpus=str(tmp_path / "missing.txt"), cache_dir=cache_dir)


def test_builtin_corpus_is_large_prose():
    text = common.builtin_corpus_text()
    assert len(text) > 300_000 and "the" in text


# ---------------------------------------------------------------------------------------------------------------
# spread
# ---------------------------------------------------------------------------------------------------------------
def test_spread_residual():
    R = torch.ones(3, 4)
    torch.testing.assert_close(common.spread_residual(R, 0, 5), R / 5)
    torch.testing.assert_close(common.spread_residual(R, 4, 5), R)
    torch.testing.assert_close(common.spread_residual(R, 1, 5, mode="sqrt"), R / 2)
    # linear spreading with the residual recomputed after each layer adds up to the whole residual
    left, total = R.clone(), torch.zeros_like(R)
    for i in range(5):
        part = common.spread_residual(left, i, 5)
        total += part
        left = left - part
    torch.testing.assert_close(total, R)
    with pytest.raises(ValueError):
        common.spread_residual(R, 5, 5)
    with pytest.raises(ValueError, match="unknown spread mode"):
        common.spread_residual(R, 0, 5, mode="cube")
