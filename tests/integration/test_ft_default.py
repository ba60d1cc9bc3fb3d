"""Fine-tuning baselines on the embedded default model (SmolLM2-135M): with their default configs, ``ft`` (FT-M)
and ``ft-c`` (L∞-constrained) make a counterfactual edit succeed right after the edit (teacher-forced reliability
>= 0.9, EVALUATION.md ``tf_token_acc``) while an unrelated-but-nearby fact ("The capital of France is" -> Paris)
still comes out of greedy generation. Every edit is undone; ``clean_default_lm`` checks that bit for bit.
"""
from __future__ import annotations

import pytest

from analysis.evaluation import (
    TF,
    evaluate_requests,
    greedy_continuations,
    locality_pairs,
    locality_reference,
    starts_with_target,
)
from editors.base import make_config
from editors.registry import get_editor_class
from editors.requests import make_request
from tests.helpers import PARIS, eiffel_request, score_applied

pytestmark = pytest.mark.slow

# built-in style counterfactuals: facts the default model knows, rewritten to a false object
EIFFEL = eiffel_request("test_ft_default", probes=True)
LOUVRE = make_request(  # a two-token target: FT-M must get both tokens right at their own positions
    source="test_ft_default", record=1, case_id="louvre-buenos-aires",
    prompt="The Louvre is located in the city of", subject="The Louvre",
    target_new="Buenos Aires", target_true="Paris",
    locality_prompts=[PARIS], locality_answers=["Paris"], relation="located_in")


@pytest.mark.parametrize("method, overrides, request_", [
    pytest.param("ft", {"objective": "target_new"}, EIFFEL, id="ft-M-eiffel"),
    pytest.param("ft", {"objective": "target_new"}, LOUVRE, id="ft-M-louvre"),
    pytest.param("ft-c", {}, EIFFEL, id="ft-c-eiffel"),
])
def test_ft_edit_succeeds_and_keeps_paris(clean_default_lm, method, overrides, request_):
    lm = clean_default_lm
    assert starts_with_target(greedy_continuations(lm, [PARIS], max_new_tokens=4)[0], "Paris")
    reference = locality_reference(lm, locality_pairs([request_]))
    before = {r["metric"]: r["value"] for r in evaluate_requests(lm, [request_], reference) if r["protocol"] == TF}

    cls = get_editor_class(method)
    editor = cls(lm, make_config(cls.config_cls, overrides, method=method), seed=0)
    editor.prepare()
    result = editor.edit([request_])
    assert result.info["loss_final"] < result.info["loss_initial"]
    if method == "ft-c":
        eps = result.config["epsilon"]
        assert all(d.abs().max().item() <= eps * (1 + 1e-6) for d in result.deltas.values())

    after, (paris, edited) = score_applied(lm, result, request_, reference, [PARIS, request_.prompt])

    # (a later target token may already follow from the earlier ones: " Aires" after " Buenos")
    assert before["reliability"] <= 0.5, "the unedited model already says the new target; pick another fact"
    assert after["reliability"] >= 0.9, (
        f"{method}: reliability {after['reliability']:.2f} after the edit (info {result.info})")
    assert starts_with_target(paris, "Paris"), f"{method}: '{PARIS}' now continues with {paris!r}"
    assert starts_with_target(edited, request_.target_new), f"{method}: greedy continuation {edited!r}"
