"""MOSE, AdaEdit, RECT and PRUNE on the embedded default model, with the config a run would use (preset + defaults).

Each editor must make a counterfactual edit succeed (teacher-forced reliability >= 0.9 right after applying) without
changing the greedy answer to "The capital of France is" (Paris), and its undo must restore the model bit for bit
(the ``clean_default_lm`` fixture fails a test that leaves the model edited).
"""
from __future__ import annotations

import pytest
import torch

from analysis import evaluation as ev
from editors.base import apply_result
from editors.presets import build_config
from editors.registry import available_methods, get_editor_class
from editors.requests import make_request

pytestmark = pytest.mark.slow

FRANCE = "The capital of France is"

#: used when the built-in fact set is not installed: a CounterFact record the default model does not know
FALLBACK = make_request(source="test", record=0, case_id="darrieux", prompt="The mother tongue of Danielle Darrieux is",
                        subject="Danielle Darrieux", target_new="English", target_true="French",
                        rephrase_prompts=["Where Danielle Darrieux is from, people speak the language of"],
                        locality_prompts=["Michel Rocard is a native speaker of"], locality_answers=["French"])


def _request():
    """The first built-in counterfactual edit (the fallback when the built-in set is missing)."""
    try:
        from editors.data import builtin_requests
        reqs = builtin_requests()
    except (ImportError, OSError, ValueError):
        return FALLBACK
    return reqs[0] if reqs else FALLBACK


# AdaEdit's preset uses ROME's MLP-output target clamp (4): with PMET's 1 the target of the first built-in fact
# (Japan -> euro) stalled at probability 0.02 and the edit scored reliability 0.0 (see AdaEditConfig).
@pytest.mark.parametrize("method", ["mose", "adaedit", "rect", "prune"])
# default-model edits: up to 332 s (adaedit, mose) on the shared 2-core machine (load ~8, 2026-12-01)
@pytest.mark.timeout(900)
def test_edit_succeeds_keeps_france_and_undoes(clean_default_lm, method):
    assert method in available_methods()
    lm = clean_default_lm
    req = _request()
    assert ev.greedy_continuations(lm, [FRANCE], 4)[0].strip().startswith("Paris")
    reference = ev.locality_reference(lm, ev.locality_pairs([req]))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}

    cls = get_editor_class(method)
    config, _ = build_config(method, lm.name)
    editor = cls(lm, config, seed=0)
    editor.prepare()
    result = editor.edit([req])
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters()), "edit() changed the model"
    undo = apply_result(lm, result)
    try:
        rows = ev.evaluate_requests(lm, [req], reference)
        reliability = ev.summarize(rows)[("reliability", ev.TF)]
        france = ev.greedy_continuations(lm, [FRANCE], 4)[0]
    finally:
        undo(lm.model)
    assert reliability >= 0.9, f"{method}: reliability {reliability:.2f} after the edit ({result.info})"
    assert france.strip().startswith("Paris"), f"{method}: 'The capital of France is' -> {france!r}"
    changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])]
    assert not changed, f"undo left {changed[:3]} changed"
