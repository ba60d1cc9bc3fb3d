"""GeoEdit on the embedded default model (SmolLM2-135M): with its default config, one batch edit of a few built-in
facts succeeds (teacher-forced reliability >= 0.8, EVALUATION.md ``tf_token_acc``) while "The capital of France is"
still continues with Paris under greedy decoding; the edit is undone and ``clean_default_lm`` checks that bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest

from analysis.evaluation import (
    TF,
    evaluate_requests,
    greedy_continuations,
    locality_pairs,
    locality_reference,
    starts_with_target,
)
from editors.base import apply_result, make_config
from editors.data import load_requests
from editors.geoedit import GeoEditConfig, GeoEditEditor

pytestmark = [
    pytest.mark.slow,
]

PARIS = "The capital of France is"
N_FACTS = 4


def _builtin(n: int):
    try:
        return load_requests("builtin", n)
    except FileNotFoundError as exc:  # the resource file is written by another part of the project
        pytest.skip(f"built-in facts not available: {exc}")


# a default-model edit: 294 s on the shared 2-core machine (load ~8, 2026-12-01); 300 s is too close
@pytest.mark.timeout(900)
def test_geoedit_batch_edit_succeeds_and_keeps_paris(clean_default_lm):
    lm = clean_default_lm
    requests = _builtin(N_FACTS)
    assert starts_with_target(greedy_continuations(lm, [PARIS], max_new_tokens=4)[0], "Paris")
    reference = locality_reference(lm, locality_pairs(requests))

    editor = GeoEditEditor(lm, make_config(GeoEditConfig, {}, method="geoedit"), seed=0)
    editor.prepare()
    result = editor.edit(requests)
    art = result.artifacts
    n = result.info["n_neurons"]
    assert all(art[k].shape == (n,) for k in ("raw_angle", "latent_angle", "neuron_class", "alpha", "beta"))
    # Fig. 3: the latent angles are less concentrated around 90 degrees than the raw ones
    raw, latent = art["raw_angle"], art["latent_angle"]
    assert np.nanstd(latent) > np.nanstd(raw)
    near90 = lambda a: float(np.mean((a >= 85) & (a <= 95)))  # noqa: E731
    assert near90(raw) > near90(latent), (near90(raw), near90(latent))

    undo = apply_result(lm, result)
    try:
        rows = evaluate_requests(lm, requests, reference)
        paris = greedy_continuations(lm, [PARIS], max_new_tokens=4)[0]
    finally:
        undo(lm.model)
    reliability = np.mean([r["value"] for r in rows if r["protocol"] == TF and r["metric"] == "reliability"])
    assert reliability >= 0.8, f"geoedit: reliability {reliability:.2f} (info {result.info})"
    assert starts_with_target(paris, "Paris"), f"geoedit: '{PARIS}' now continues with {paris!r}"
