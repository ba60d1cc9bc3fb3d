"""ROME on the embedded default model (SmolLM2-135M-Instruct) with its preset: the classic Eiffel Tower -> Rome."""
from __future__ import annotations

import pytest
import torch

from analysis.evaluation import greedy_continuations, starts_with_target
from editors.base import apply_result, make_config
from editors.presets import load_preset
from editors.requests import make_request
from editors.rome import ROMEConfig, ROMEEditor

pytestmark = pytest.mark.slow

EIFFEL = make_request(source="test_rome_default", record=0, case_id="eiffel",
                      prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
                      target_new="Rome", target_true="Paris")


def test_rome_moves_the_eiffel_tower_to_rome(clean_default_lm, tmp_path):
    lm = clean_default_lm
    preset = load_preset("rome", lm.name)
    assert preset is not None
    editor = ROMEEditor(lm, make_config(ROMEConfig, preset.config, method="rome"), cache_dir=str(tmp_path), seed=0)
    editor.prepare()
    before = greedy_continuations(lm, [EIFFEL.prompt, "The capital of France is"], max_new_tokens=4)
    assert starts_with_target(before[0], "Paris") and starts_with_target(before[1], "Paris")

    result = editor.edit([EIFFEL])
    assert result.info["rank"] == 1 and result.info["target_prob"] > 0.5
    assert 0 < result.info["delta_rel_norm"] < 0.5
    undo = apply_result(lm, result)
    try:
        after = greedy_continuations(lm, [EIFFEL.prompt, "The capital of France is"], max_new_tokens=4)
        assert starts_with_target(after[0], "Rome"), after
        assert starts_with_target(after[1], "Paris"), after
    finally:
        undo(lm.model)
    name = result.param_names[0]
    assert torch.isfinite(dict(lm.model.named_parameters())[name]).all()
