"""Evaluation protocol on tiny models: teacher forcing matches a plain forward pass, batching does not change
results, locality compares with the unedited model."""
import torch

from analysis.evaluation import (
    GEN,
    MARGIN,
    TF,
    editing_score,
    encode_pair,
    evaluate_requests,
    locality_pairs,
    locality_reference,
    locality_scores,
    summarize,
    teacher_forced,
)
from editors.base import EditResult, apply_result
from editors.requests import make_request

PROMPTS = ["The Eiffel Tower is located in the city of", "The capital of France is", "Hi"]
TARGETS = ["Rome", "Paris", "there my dear friend"]


def _reference_tf(lm, prompt, target):
    p, t = encode_pair(lm.tokenizer, prompt, target)
    ids = torch.tensor([p + t])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0]
    pos = [len(p) - 1 + j for j in range(len(t))]
    am = logits[pos].argmax(-1).tolist()
    lp = torch.log_softmax(logits[pos], -1)[torch.arange(len(t)), torch.tensor(t)].sum().item()
    return t, am, lp


def test_teacher_forced_matches_full_forward_and_is_batch_invariant(tiny_llama):
    outs = teacher_forced(tiny_llama, PROMPTS, TARGETS, batch_size=64)
    single = [teacher_forced(tiny_llama, [p], [t], batch_size=1)[0] for p, t in zip(PROMPTS, TARGETS)]
    for o, s, p, t in zip(outs, single, PROMPTS, TARGETS):
        ref_t, ref_am, ref_lp = _reference_tf(tiny_llama, p, t)
        assert list(o.target_ids) == ref_t
        assert list(o.argmax_ids) == ref_am
        assert abs(o.logprob - ref_lp) < 1e-3
        assert o.argmax_ids == s.argmax_ids and abs(o.logprob - s.logprob) < 1e-3


def _req(i, **kw):
    base = dict(source="t", record=i, case_id=i, prompt=PROMPTS[0], subject="The Eiffel Tower", target_new="Rome",
                target_true="Paris", rephrase_prompts=["Where is the Eiffel Tower? In the city of"],
                locality_prompts=["The capital of France is"], locality_answers=["Paris"])
    base.update(kw)
    return make_request(**base)


def test_locality_is_one_on_the_unedited_model_and_drops_after_a_large_change(tiny_llama):
    reqs = [_req(0), _req(1, locality_prompts=["The capital of Italy is"], locality_answers=["Rome"])]
    ref = locality_reference(tiny_llama, locality_pairs(reqs))
    assert locality_scores(tiny_llama, locality_pairs(reqs), ref) == [1.0, 1.0]
    # scramble a layer: locality against the ORIGINAL predictions must notice
    name = tiny_llama.spec.mlp_out_weight(3)
    p = dict(tiny_llama.model.named_parameters())[name]
    undo = apply_result(tiny_llama, EditResult("demo", deltas={name: torch.randn(p.shape) * 50}))
    try:
        rows = evaluate_requests(tiny_llama, reqs, ref)
        loc = [r["value"] for r in rows if r["metric"] == "locality"]
        assert len(loc) == 2 and min(loc) < 1.0
    finally:
        undo(tiny_llama.model)


def test_evaluate_requests_rows_have_protocol_labels(tiny_llama):
    reqs = [_req(0), _req(1)]
    ref = locality_reference(tiny_llama, locality_pairs(reqs))
    rows = evaluate_requests(tiny_llama, reqs, ref, protocols=(TF, MARGIN, GEN), gen_tokens=3)
    keys = {(r["metric"], r["protocol"]) for r in rows}
    assert {("reliability", TF), ("generality", TF), ("locality", TF), ("reliability", MARGIN),
            ("reliability", GEN), ("generality", GEN)} <= keys
    assert all(0.0 <= r["value"] <= 1.0 for r in rows)
    s = summarize(rows)
    assert s[("locality", TF)] == 1.0


def test_editing_score_is_harmonic_mean():
    assert abs(editing_score(1.0, 0.5, 0.5) - 3 / (1 + 2 + 2)) < 1e-12
    assert editing_score(1.0, 0.0, 1.0) == 0.0
