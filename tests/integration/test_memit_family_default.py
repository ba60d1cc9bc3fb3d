"""The MEMIT family on the embedded default model (SmolLM2-135M): with their default configs (= the presets),
``memit``, ``pmet``, ``emmet`` and ``alphaedit`` make a counterfactual edit succeed right after the edit
(teacher-forced reliability >= 0.9, EVALUATION.md ``tf_token_acc``) while a nearby fact ("The capital of France is"
-> Paris) still comes out of greedy generation. Each edit is undone; ``clean_default_lm`` checks that bit for bit.

Cost: the covariances of layers 4-8 are computed once (cached on disk, shared by all four methods and by later
runs); each method then optimises one target with the 6 "memit" context templates.
"""
from __future__ import annotations

import pytest

from analysis.evaluation import greedy_continuations, locality_pairs, locality_reference, starts_with_target
from editors.base import make_config
from editors.presets import load_preset
from editors.registry import get_editor_class
from tests.helpers import PARIS, eiffel_request, score_applied

pytestmark = pytest.mark.slow

# a built-in style counterfactual: a fact the default model knows, rewritten to a false object
EIFFEL = eiffel_request("test_memit_family_default", probes=True)

METHODS = ("memit", "pmet", "emmet", "alphaedit")


@pytest.mark.parametrize("method", METHODS)
def test_presets_are_the_defaults(method):
    cls = get_editor_class(method)
    preset = load_preset(method, "default")
    assert preset is not None and preset.version >= 1
    assert make_config(cls.config_cls, preset.config, method=method) == make_config(cls.config_cls, method=method)


@pytest.mark.parametrize("method", METHODS)
# default-model edits: up to 243 s (alphaedit) on the shared 2-core machine (load ~8, 2026-12-01)
@pytest.mark.timeout(900)
def test_edit_succeeds_and_keeps_paris(clean_default_lm, method):
    lm = clean_default_lm
    assert starts_with_target(greedy_continuations(lm, [PARIS], max_new_tokens=4)[0], "Paris")
    reference = locality_reference(lm, locality_pairs([EIFFEL]))

    cls = get_editor_class(method)
    editor = cls(lm, make_config(cls.config_cls, method=method), seed=0)
    editor.prepare()
    result = editor.edit([EIFFEL])
    assert result.info["z"]["target_prob_mean"] > 0.5, result.info["z"]
    assert result.info["residual_final"] < result.info["residual_initial"]
    if method == "alphaedit":
        assert all(d > 0 for d in editor.null_dims.values())
        assert max(result.artifacts["preserved_share"]) < 1e-3

    after, (paris,) = score_applied(lm, result, EIFFEL, reference, [PARIS])
    assert after["reliability"] >= 0.9, (method, after, result.info["layers"])
    assert starts_with_target(paris, "Paris"), (method, paris)
