"""The WILD protocol (analysis/evaluation.py ``wild_gen``): each test names the wrong variant it fails on."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import StopStringCriteria

from analysis import evaluation as ev
from editors.requests import make_request

REQ = make_request(source="test", record=0, case_id="eiffel", prompt="The Eiffel Tower is located in the city of",
                   subject="The Eiffel Tower", target_new="Rome", target_true="Paris",
                   rephrase_prompts=["Where is the Eiffel Tower? It is in", "The Eiffel Tower stands in"],
                   locality_prompts=["The capital of France is"], locality_answers=["Paris"])


def test_normalisation_and_scores():
    assert ev.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert ev.normalize_answer("an apple a day") == "apple day"  # wrong variant: articles kept
    assert ev.normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert ev.exact_match(" the Paris.", "Paris") == 1.0
    assert ev.exact_match("Paris, France", "Paris") == 0.0
    assert ev.token_f1("Paris France", "Paris") == pytest.approx(2 / 3)
    assert ev.token_f1("Paris Paris", "Paris") == pytest.approx(2 / 3)  # multiset overlap: 1 of 2 predicted
    assert ev.token_f1("", "") == 1.0 and ev.token_f1("the", "Paris") == 0.0 and ev.token_f1("Rome", "") == 0.0


def test_stop_mask_is_hf_stop_strings(tiny_llama):
    lm = tiny_llama
    mask = ev.wild_stop_mask(lm)
    tok = lm.tokenizer
    assert bool(mask[tok.eos_token_id])
    crit = StopStringCriteria(tok, [".", "\n"])
    prefix = tok("The capital of France is")["input_ids"]
    rng = random.Random(0)
    candidates = [int(i) for i in torch.nonzero(mask).flatten()] + rng.sample(range(len(tok)), 1000)
    eos = ev._eos_ids(lm)
    for v in candidates:
        if v in eos:
            continue
        hf = bool(crit(torch.tensor([prefix + [v]]), None)[0])
        assert hf == bool(mask[v]), f"token {v} {tok.decode([v])!r}: HF {hf}, mask {bool(mask[v])}"


def test_stop_mask_is_kept_per_tokenizer_and_follows_its_end_tokens(tiny_llama, monkeypatch):
    """The mask is decoded once per tokenizer, returned as a copy (a caller's change does not leak into the next
    call), and recomputed when the end tokens change. Fails on: no cache (decodes again), the cached tensor itself
    returned, a key without the end tokens."""
    lm = tiny_llama
    first = ev.wild_stop_mask(lm)
    decodes = []
    real = type(lm.tokenizer).batch_decode
    monkeypatch.setattr(type(lm.tokenizer), "batch_decode", lambda self, *a, **k: (decodes.append(1),
                                                                                    real(self, *a, **k))[1])
    again = ev.wild_stop_mask(lm)
    assert torch.equal(again, first) and not decodes
    again[:] = True
    assert torch.equal(ev.wild_stop_mask(lm), first)
    extra = int(torch.nonzero(~first).flatten()[0])
    monkeypatch.setattr(ev, "_eos_ids", lambda lm_: {lm.tokenizer.eos_token_id, extra})
    changed = ev.wild_stop_mask(lm)
    assert decodes and bool(changed[extra]) and int(changed.sum()) == int(first.sum()) + 1


def test_trailing_strip_in_the_authors_order(tiny_llama):
    lm = tiny_llama
    tok = lm.tokenizer
    for text in (" Paris.", " Paris\n", " Paris" + tok.eos_token):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ev.wild_answer_text(lm, ids) == " Paris", text
    ids = tok(" Paris.\n", add_special_tokens=False)["input_ids"]  # "." is stripped only when it is last
    assert ev.wild_answer_text(lm, ids) == " Paris."


def test_batched_left_padded_equals_one_by_one(tiny_llama):
    lm = tiny_llama
    prompts = ["The capital of France is", "A", "The mother tongue of Danielle Darrieux is, as everyone knows,",
               "Michael Jordan plays", "Rome"]
    mask = ev.wild_stop_mask(lm)
    batched = ev.wild_generate(lm, prompts, max_new_tokens=6, batch_size=4, stop_mask=mask)
    single = [ev.wild_generate(lm, [p], max_new_tokens=6, stop_mask=mask)[0] for p in prompts]
    assert [o.ids for o in batched] == [o.ids for o in single]
    assert all(1 <= len(o.ids) <= 6 for o in batched)
    for o in batched:  # cut after the first stop token, inclusive
        assert not any(bool(mask[t]) for t in o.ids[:-1])


def test_generation_stops_at_the_first_stop_token(tiny_llama, monkeypatch):
    lm = tiny_llama
    free = ev.wild_generate(lm, ["The capital of France is"], max_new_tokens=5)[0]
    assert len(free.ids) >= 2
    mask = torch.zeros_like(ev.wild_stop_mask(lm))
    # make the first token that was not generated before a stop token
    j = next((j for j in range(1, len(free.ids)) if free.ids[j] not in free.ids[:j]), 0)
    mask[free.ids[j]] = True
    cut = ev.wild_generate(lm, ["The capital of France is"], max_new_tokens=5, stop_mask=mask)[0]
    assert cut.ids == free.ids[:j + 1]  # wrong variant: the stop token dropped, or generation continued


def test_padding_side_restored_after_an_error(tiny_llama, monkeypatch):
    lm = tiny_llama
    side = lm.tokenizer.padding_side

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(lm.model, "generate", boom)
    with pytest.raises(RuntimeError, match="boom"):
        ev.wild_generate(lm, ["x"], max_new_tokens=2)
    assert lm.tokenizer.padding_side == side


def test_contexts(tiny_llama):
    lm = tiny_llama
    raw = ev.wild_inputs(lm, "Who?", "none")
    qa = ev.wild_inputs(lm, "Who?", "qa")
    chat = ev.wild_inputs(lm, "Who?", "chat")
    assert lm.tokenizer.decode(qa).endswith("Q: Who?\nA:")
    assert "You are a helpful assistant." in lm.tokenizer.decode(chat) and len(chat) > len(qa) > len(raw)
    with pytest.raises(ValueError, match="wild context"):
        ev.wild_inputs(lm, "Who?", "judge")


def test_rows_and_locality_against_the_unedited_model(tiny_llama):
    lm = tiny_llama
    ref = ev.wild_reference(lm, REQ.locality_prompts, max_new_tokens=6)
    rows = ev.evaluate_requests(lm, [REQ], {}, protocols=(ev.WILD,), wild=ref, wild_max_tokens=6)
    got = {(r["metric"], r["protocol"]): r["value"] for r in rows}
    for metric in ("reliability", "generality", "locality"):
        assert (metric, ev.WILD) in got and (metric, ev.WILD_F1) in got
    assert got[("locality", ev.WILD)] == 1.0 and got[("locality", ev.WILD_F1)] == 1.0
    with pytest.raises(KeyError, match="WILD reference"):
        ev.evaluate_requests(lm, [REQ], {}, protocols=(ev.WILD,), wild={}, wild_max_tokens=6)
    # a perturbation that changes the generation: locality 0 (token ids), F1 below 1
    first = ref[REQ.locality_prompts[0]].ids[0]

    def ban_first(module, args, output):  # the reference's first token can no longer win
        output[..., first] = -1e9
        return output

    handle = lm.model.get_output_embeddings().register_forward_hook(ban_first)
    try:
        after = ev.evaluate_requests(lm, [REQ], {}, protocols=(ev.WILD,), wild=ref, wild_max_tokens=6)
    finally:
        handle.remove()
    got = {(r["metric"], r["protocol"]): r["value"] for r in after}
    assert got[("locality", ev.WILD)] == 0.0 and got[("locality", ev.WILD_F1)] < 1.0
    with pytest.raises(ValueError, match="unknown protocol"):
        ev.evaluate_requests(lm, [REQ], {}, protocols=("wild",))


def test_wild_reference_cache_hits_only_on_identical_inputs(tiny_llama, tmp_path, monkeypatch, caplog):
    """The on-disk WILD reference: a second call with the same inputs generates nothing and returns the same
    outputs; changed prompts (or their order), token budget or WEIGHTS miss; a corrupt file is regenerated.
    Wrong variants it fails on: a key without the prompts / order / budget, the load-time hash instead of the
    current weights, trusting a corrupt or foreign file."""
    lm = tiny_llama
    prompts = ["The capital of France is", "Danielle Darrieux speaks", "The capital of France is"]
    calls = []
    real = ev.wild_generate
    monkeypatch.setattr(ev, "wild_generate", lambda lm_, ps, **kw: (calls.append(list(ps)), real(lm_, ps, **kw))[1])
    first = ev.wild_reference(lm, prompts, max_new_tokens=5, cache_root=str(tmp_path))
    (f,) = list((tmp_path / "wild_reference").iterdir())
    assert calls == [prompts[:2]]
    again = ev.wild_reference(lm, prompts, max_new_tokens=5, cache_root=str(tmp_path))
    assert len(calls) == 1 and again == first and list(again) == prompts[:2]
    for kw in ({"prompts": prompts[1::-1]}, {"max_new_tokens": 4}, {"prompts": prompts[:1]}):
        n = len(calls)
        ev.wild_reference(lm, kw.get("prompts", prompts), max_new_tokens=kw.get("max_new_tokens", 5),
                          cache_root=str(tmp_path))
        assert len(calls) == n + 1, kw
    w = lm.model.get_parameter(lm.spec.mlp_out_weight(1))
    w0 = w.detach().clone()
    with torch.no_grad():
        w.mul_(1.5)
    try:
        n = len(calls)
        ev.wild_reference(lm, prompts, max_new_tokens=5, cache_root=str(tmp_path))
        assert len(calls) == n + 1  # edited weights: not the unedited model's cached generations
    finally:
        with torch.no_grad():
            w.copy_(w0)
    n = len(calls)
    assert ev.wild_reference(lm, prompts, max_new_tokens=5, cache_root=str(tmp_path)) == first and len(calls) == n
    f.write_text("{not json")
    n = len(calls)
    assert ev.wild_reference(lm, prompts, max_new_tokens=5, cache_root=str(tmp_path)) == first
    assert len(calls) == n + 1 and "ignored" in caplog.text
    assert ev.wild_reference(lm, prompts, max_new_tokens=5, cache_root=str(tmp_path)) == first and len(calls) == n + 1
    ev.wild_reference(lm, prompts, max_new_tokens=5)  # no cache root: nothing read or written
    assert len(calls) == n + 2
