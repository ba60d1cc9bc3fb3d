"""WILD generation's three contexts on the embedded default model, unedited, on the first 20 built-in facts
(true targets, greedy, 16-token budget). Measured 2026-12-02: 'none' (the raw cloze prompt) answers 10 of 20
exactly; 'chat' (the model's chat template with a system prompt) answers in full sentences -- 0 exact, 12 with
token overlap; 'qa' (the WILD authors' "Please answer the question: Q: ... A:") makes SmolLM2-135M stop at once
(a newline or <|im_end|> first) on 17 of 20, so its WILD scores are near zero whatever an edit does. The README's
WILD section states this; these tests pin each context's format and its measured behaviour with margins."""
from __future__ import annotations

import pytest

from analysis import evaluation as ev
from editors.data import builtin_requests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def outputs(default_lm):
    reqs = builtin_requests()[:20]
    return reqs, {ctx: ev.wild_generate(default_lm, [r.prompt for r in reqs], context=ctx, max_new_tokens=16)
                  for ctx in ev.WILD_CONTEXTS}


def test_context_formats_on_the_default_tokenizer(default_lm):
    tok = default_lm.tokenizer
    chat = tok.decode(ev.wild_inputs(default_lm, "The capital of France is", "chat"))
    assert chat.count("<|im_start|>") == 3 and chat.rstrip().endswith("<|im_start|>assistant")  # generation prompt
    assert "You are a helpful assistant." in chat and "The capital of France is" in chat
    qa = tok.decode(ev.wild_inputs(default_lm, "The capital of France is", "qa"))
    assert qa.endswith("Q: The capital of France is\nA:") and qa.startswith("Please answer the question:")


def test_each_context_behaves_as_measured(outputs):
    reqs, outs = outputs
    em = {c: sum(ev.exact_match(o.text, r.target_true) for o, r in zip(outs[c], reqs)) for c in outs}
    overlap = {c: sum(ev.token_f1(o.text, r.target_true) > 0 for o, r in zip(outs[c], reqs)) for c in outs}
    empty = {c: sum(not o.text.strip() for o in outs[c]) for c in outs}
    assert em["none"] >= 7 and overlap["none"] >= 15 and empty["none"] <= 2  # measured 10 / 20 / 0
    assert em["chat"] <= 3 and overlap["chat"] >= 8 and empty["chat"] <= 2  # sentences: measured 0 / 12 / 0
    assert empty["qa"] >= 12 and em["qa"] <= 5  # stops at once: measured 17 empty, 2 exact
