"""ROME (editors/rome.py) on tiny random Llama and GPT-2 (Conv1D) models."""
from __future__ import annotations

import pytest
import torch

from editors.base import ConfigError, apply_result, make_config
from editors.keys import compute_keys
from editors.presets import load_preset
from editors.registry import get_editor_class
from editors.rome import ROMEConfig, ROMEEditor
from editors.stats import layer_covariance
from editors.testing import tiny_model
from tests.helpers import darrieux_request, eiffel_request

REQ = eiffel_request("test_rome")
REQ2 = darrieux_request("test_rome")
# small and fast: layer 1 of 4, "{}" + one 4-token prefix per start word, a few v* steps
SMALL = {"layer": 1, "v_num_grad_steps": 4, "context_templates": "4:5"}


def _editor(lm, tmp_path, seed=0, **overrides):
    return ROMEEditor(lm, make_config(ROMEConfig, {**SMALL, **overrides}, method="rome"),
                      cache_dir=str(tmp_path / "cache"), seed=seed)


def _params(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def edited(lm, tmp_path_factory):
    """(editor, result, parameters before) for one request, computed once per architecture."""
    tmp = tmp_path_factory.mktemp("rome")
    before = _params(lm)
    editor = _editor(lm, tmp)
    editor.prepare()
    return editor, editor.edit([REQ]), before


def test_registry_and_config():
    assert get_editor_class("rome") is ROMEEditor
    assert all(f["help"] for f in ROMEConfig.field_help())
    with pytest.raises(ConfigError, match="valid fields"):
        make_config(ROMEConfig, {"layers": 3}, method="rome")
    with pytest.raises(ConfigError, match="value_key"):
        make_config(ROMEConfig, {"value_key": "median"}, method="rome")
    with pytest.raises(ConfigError, match="context-template"):
        make_config(ROMEConfig, {"context_templates": "nonsense"}, method="rome")


def test_preset_is_a_valid_config():
    preset = load_preset("rome", "default")
    assert preset is not None and preset.version >= 1
    cfg = make_config(ROMEConfig, preset.config, method="rome")
    assert cfg.layer == preset.config["layer"]


def test_delta_shape_rank_one_and_info(lm, edited):
    editor, result, _ = edited
    name = lm.spec.mlp_out_weight(1)
    assert list(result.deltas) == [name] and not result.factors
    param = dict(lm.model.named_parameters())[name]
    assert result.deltas[name].shape == param.shape and result.deltas[name].dtype == param.dtype
    D = lm.spec.to_canonical(result.deltas[name]).double()
    assert torch.linalg.matrix_rank(D, rtol=1e-5).item() == 1
    for key in ("layer", "rank", "delta_norm", "delta_rel_norm", "target_prob", "steps", "loss"):
        assert key in result.info
    assert result.info["layer"] == 1 and result.info["rank"] == 1
    assert result.info["delta_norm"] == pytest.approx(D.norm().item(), rel=1e-4)
    assert result.artifacts["keys"].shape == (1, lm.spec.mlp_size)
    assert result.artifacts["values"].shape == (1, lm.spec.hidden_size)
    assert result.config["layer"] == 1 and result.config_version == ROMEConfig.version


def test_model_unchanged_by_edit_and_exact_undo(lm, edited):
    _, result, before = edited
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), n
    undo = apply_result(lm, result)
    name = result.param_names[0]
    changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [name]
    undo(lm.model)
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_closed_form_writes_v_star_for_k_star(lm, tmp_path):
    """value_key="mean" (the paper's Eq. 2): (W + ΔW) k* + b = v*, the edited projection maps the template-averaged
    key to the optimised value."""
    before = _params(lm)
    editor = _editor(lm, tmp_path, value_key="mean")
    editor.prepare()
    result = editor.edit([REQ])
    name = result.param_names[0]
    W = lm.spec.to_canonical(before[name]).double()
    D = lm.spec.to_canonical(result.deltas[name]).double()
    bias = lm.model.get_submodule(lm.spec.mlp_out_module(1)).bias
    b = bias.detach().double() if bias is not None else 0.0
    k = result.artifacts["keys"][0].double()
    v = result.artifacts["values"][0].double()
    torch.testing.assert_close((W + D) @ k + b, v, rtol=1e-4, atol=1e-4)
    # and k* is the template-averaged key of the unedited model
    k_ref = compute_keys(lm, 1, [REQ], editor.templates)[0]
    torch.testing.assert_close(result.artifacts["keys"][0], k_ref)


def test_mom2_adjustment_and_prompt_key(lm, tmp_path):
    """With u = C^{-1}k* the update direction changes but the closed form still holds; value_key="prompt" (the
    default) writes v* for the un-prefixed prompt's key (kmeng01/rome compute_v)."""
    before = _params(lm)
    name = lm.spec.mlp_out_weight(1)
    W = lm.spec.to_canonical(before[name]).double()
    bias = lm.model.get_submodule(lm.spec.mlp_out_module(1)).bias
    b = bias.detach().double() if bias is not None else 0.0
    for overrides in ({"mom2_adjustment": True, "mom2_n_tokens": 2048, "value_key": "mean"}, {"value_key": "prompt"}):
        editor = _editor(lm, tmp_path, **overrides)
        editor.prepare()
        result = editor.edit([REQ])
        D = lm.spec.to_canonical(result.deltas[name]).double()
        assert torch.linalg.matrix_rank(D, rtol=1e-5).item() == 1
        k = result.artifacts["keys"][0].double()
        v = result.artifacts["values"][0].double()
        torch.testing.assert_close((W + D) @ k + b, v, rtol=1e-4, atol=1e-4)
        if overrides["value_key"] == "prompt":
            torch.testing.assert_close(result.artifacts["keys"][0], compute_keys(lm, 1, [REQ], ["{}"])[0])
        else:
            C = layer_covariance(lm, 1, n_tokens=2048, cache_dir=str(tmp_path / "cache"),
                                        dtype=torch.float64)
            u = torch.linalg.solve(C, k)
            # every column of ΔW is parallel to C^{-1}k*
            row = D[D.norm(dim=1).argmax()]
            assert abs(torch.nn.functional.cosine_similarity(row, u, dim=0).item()) > 1 - 1e-6
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_same_seed_same_delta(lm, edited, tmp_path):
    _, result, _ = edited
    again = _editor(lm, tmp_path, seed=0).edit([REQ])
    for name in result.deltas:
        assert torch.equal(result.deltas[name], again.deltas[name])


def test_two_requests_in_one_call_are_sequential(lm, tmp_path):
    before = _params(lm)
    editor = _editor(lm, tmp_path, v_num_grad_steps=2)
    result = editor.edit([REQ, REQ2])
    name = result.param_names[0]
    assert result.info["rank"] == 2 and len(result.info["requests"]) == 2
    assert result.artifacts["keys"].shape[0] == 2
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), n
    # the second request's closed form holds on the model already carrying the first update
    k1, v1 = result.artifacts["keys"][0].double(), result.artifacts["values"][0].double()
    k2, v2 = result.artifacts["keys"][1].double(), result.artifacts["values"][1].double()
    W = lm.spec.to_canonical(before[name]).double()
    D = lm.spec.to_canonical(result.deltas[name]).double()
    bias = lm.model.get_submodule(lm.spec.mlp_out_module(1)).bias
    b = bias.detach().double() if bias is not None else 0.0
    torch.testing.assert_close((W + D) @ k2 + b, v2, rtol=1e-4, atol=1e-4)
    assert k1.shape == k2.shape and v1.shape == v2.shape


def test_layer_out_of_range(lm, tmp_path):
    from editors.base import EditError
    editor = _editor(lm, tmp_path, layer=lm.spec.n_layers)
    with pytest.raises(EditError, match="does not exist"):
        editor.edit([REQ])
