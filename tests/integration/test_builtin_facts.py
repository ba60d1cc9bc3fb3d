"""The built-in fact set and locality probes hold facts the embedded default model actually knows.

Known = the greedy continuation starts with the answer, or the teacher-forced argmax at the first answer position is
the answer's first token (the criterion of scripts/verify_builtin_facts.py).
"""
from __future__ import annotations

import pytest

from analysis.evaluation import greedy_continuations, starts_with_target, teacher_forced
from editors.data import builtin_probes, builtin_requests

pytestmark = pytest.mark.slow


def _known(lm, pairs: list[tuple[str, str]]) -> list[bool]:
    prompts = [p for p, _ in pairs]
    answers = [a for _, a in pairs]
    texts = greedy_continuations(lm, prompts, max_new_tokens=6)
    tf = teacher_forced(lm, prompts, answers)
    return [starts_with_target(text, a) or o.argmax_ids[0] == o.target_ids[0]
            for text, a, o in zip(texts, answers, tf)]


def test_default_model_knows_builtin_facts_and_probes(default_lm):
    facts = builtin_requests()
    probes = builtin_probes()
    pairs = [(r.prompt, r.target_true) for r in facts] + list(probes)
    known = _known(default_lm, pairs)  # one batched pass for both sets
    fact_known, probe_known = known[:len(facts)], known[len(facts):]
    missed = [f"{r.case_id}: {r.prompt!r} -> {r.target_true!r}" for r, k in zip(facts, fact_known) if not k]
    assert sum(fact_known) / len(facts) >= 0.95, f"facts not known: {missed}"
    missed = [f"{p!r} -> {a!r}" for (p, a), k in zip(probes, probe_known) if not k]
    assert sum(probe_known) / len(probes) >= 0.90, f"probes not known: {missed}"
