"""Subject tokens, keys and current values (editors/keys.py) on tiny random models and the default tokenizer."""
from __future__ import annotations

import pytest
import torch

from editors import keys
from editors.hooks import Trace
from editors.testing import default_tokenizer, tiny_model
from tests.helpers import darrieux_request, eiffel_request

REQ = eiffel_request("test_keys", target_new="Rome Italy")
REQ2 = darrieux_request("test_keys")


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


# ---------------------------------------------------------------------------------------------------------------
# subject token
# ---------------------------------------------------------------------------------------------------------------
def _check_subject_index(tok, text: str, subject: str, start: int | None = None) -> int:
    idx = keys.subject_token_index(tok, text, subject, start)
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
    assert first == keys.subject_token_index(tok, "Paris is nice.", "Paris")


def test_subject_token_index_errors(tok):
    with pytest.raises(ValueError, match="does not occur"):
        keys.subject_token_index(tok, "The capital of France is", "Berlin")
    with pytest.raises(ValueError, match="not at character"):
        keys.subject_token_index(tok, "The capital of France is", "France", start=0)


def test_fill_template_marks_the_slot_occurrence():
    text, start = keys.fill_template("The Eiffel Tower. {}", REQ)
    assert text == "The Eiffel Tower. " + REQ.prompt
    assert start == len("The Eiffel Tower. ") and text[start:start + len(REQ.subject)] == REQ.subject


def test_target_token_ids_have_leading_space(tok):
    ids = keys.target_token_ids(tok, "Rome")
    assert tok.decode(ids) == " Rome"


# ---------------------------------------------------------------------------------------------------------------
# keys and values
# ---------------------------------------------------------------------------------------------------------------
TEMPLATES = ["{}", "A short prefix. {}", "Another, longer prefix of text here. {}"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compute_keys_shape_and_value(arch):
    lm = tiny_model(arch)
    K = keys.compute_keys(lm, 1, [REQ, REQ2], TEMPLATES)
    assert K.shape == (2, lm.spec.mlp_size) and K.dtype == torch.float32
    # the plain mean over templates of the projection's input at the subject's last token (full forward)
    name = lm.spec.mlp_out_module(1)
    expected = []
    for req in (REQ, REQ2):
        ks = []
        for t in TEMPLATES:
            text, start = keys.fill_template(t, req)
            idx = keys.subject_token_index(lm.tokenizer, text, req.subject, start)
            ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
            with Trace(lm.model, [name], retain_input=True) as tr, torch.no_grad():
                lm.model(input_ids=ids)
            ks.append(tr.inputs[name][0, idx])
        expected.append(torch.stack(ks).mean(0))
    torch.testing.assert_close(K, torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_compute_keys_groups_average_groups_first(tiny_llama):
    groups = [["{}"], TEMPLATES[1:]]
    K = keys.compute_keys(tiny_llama, 1, [REQ], groups)[0]
    k0 = keys.compute_keys(tiny_llama, 1, [REQ], ["{}"])[0]
    k1 = keys.compute_keys(tiny_llama, 1, [REQ], TEMPLATES[1:])[0]
    torch.testing.assert_close(K, (k0 + k1) / 2)


def test_compute_keys_stops_after_the_traced_layer(tiny_llama):
    calls = []
    top = tiny_llama.model.get_submodule(tiny_llama.spec.layer(tiny_llama.spec.n_layers - 1))
    handle = top.register_forward_hook(lambda *a: calls.append(1))
    try:
        keys.compute_keys(tiny_llama, 1, [REQ], TEMPLATES)
    finally:
        handle.remove()
    assert calls == []


def test_current_values_shape(tiny_gpt2):
    for site in ("residual", "mlp_out"):
        V = keys.current_values(tiny_gpt2, 2, [REQ, REQ2], site=site)
        assert V.shape == (2, tiny_gpt2.spec.hidden_size)
    with pytest.raises(ValueError, match="unknown edit site"):
        keys.current_values(tiny_gpt2, 2, [REQ], site="attn")
