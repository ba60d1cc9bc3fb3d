"""GeoEdit's steps (editors/geoedit.py), LoRA's merged delta (editors/lora.py) and F-Learning's arithmetic
(editors/flearning.py) on constructed vectors and tiny random models."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from editors.base import EditError, apply_result, make_config
from editors.flearning import FLearningConfig, FLearningEditor
from editors.ft import FTConfig, FTEditor
from editors.geoedit import (
    ALIGNED,
    CONFLICTING,
    ORTHOGONAL,
    GeoEditConfig,
    GeoEditEditor,
    TaskVectorAE,
    classify,
    from_neurons,
    fuse,
    minmax,
    row_angles,
    to_neurons,
)
from editors.lora import LoRAConfig, LoRAEditor
from editors.requests import make_request
from editors.testing import tiny_model

REQS = [
    make_request(source="test_geoedit", record=0, case_id="eiffel",
                 prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
                 target_new="Rome", target_true="Paris"),
    make_request(source="test_geoedit", record=1, case_id="darrieux",
                 prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                 target_new="English", target_true="French"),
]


def _pair(phi_deg: float, d: int = 8, r_old: float = 1.0, r_new: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """h_old along e1, h_new at angle phi from it in the (e1, e2) plane."""
    phi = math.radians(phi_deg)
    a, b = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    a[0] = r_old
    b[0], b[1] = r_new * math.cos(phi), r_new * math.sin(phi)
    return a, b


def _snapshot(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _unchanged(lm, snap) -> bool:
    return all(torch.equal(p, snap[n]) for n, p in lm.model.named_parameters())


# ---------------------------------------------------------------------------------------------------------------
# Eq. 10-11 on constructed latent vectors
# ---------------------------------------------------------------------------------------------------------------
def test_angles_classes_and_fusion_on_constructed_vectors():
    phis = [30.0, 84.0, 90.0, 94.0, 120.0, 180.0]
    pairs = [_pair(p) for p in phis]
    h_old = torch.stack([a for a, _ in pairs])
    h_new = torch.stack([b for _, b in pairs])
    ang = row_angles(h_old, h_new)
    assert np.allclose(ang.numpy(), phis, atol=1e-6)
    cls = classify(ang, 85.0, 95.0)
    assert cls.tolist() == [ALIGNED, ALIGNED, ORTHOGONAL, ORTHOGONAL, CONFLICTING, CONFLICTING]

    alpha = torch.tensor([0.5, 0.2, 0.9, 0.9, 0.3, 1.0], dtype=torch.float64)
    beta = torch.tensor([1.0, 0.4, 0.8, 0.8, 0.6, 0.5], dtype=torch.float64)
    out = fuse(h_old, h_new, cls, alpha, beta)
    for i, c in enumerate(cls.tolist()):
        sign = {ALIGNED: 1.0, CONFLICTING: -1.0}.get(c)
        expected = torch.zeros_like(h_new[i]) if sign is None else sign * alpha[i] * h_old[i] + beta[i] * h_new[i]
        assert torch.allclose(out[i], expected), (phis[i], out[i], expected)
    # aligned at 30 deg: 0.5*(1,0) + 1*(2cos30, 2sin30)
    assert torch.allclose(out[0, :2], torch.tensor([0.5 + 2 * math.cos(math.radians(30)), 1.0], dtype=torch.float64))
    # conflicting at 180 deg: -1*(1,0) + 0.5*(-2, 0) = (-2, 0): forget the old direction, learn the new
    assert torch.allclose(out[5, :2], torch.tensor([-2.0, 0.0], dtype=torch.float64), atol=1e-12)


def test_switched_off_rules_fall_back_to_new_task_vector():
    h_old = torch.stack([_pair(p)[0] for p in (30.0, 90.0, 150.0)])
    h_new = torch.stack([_pair(p)[1] for p in (30.0, 90.0, 150.0)])
    cls = classify(row_angles(h_old, h_new), 85.0, 95.0)
    a = b = torch.full((3,), 0.5, dtype=torch.float64)
    out = fuse(h_old, h_new, cls, a, b, synergistic=False, orthogonal=False, conflicting=False)
    assert torch.equal(out, h_new)
    out = fuse(h_old, h_new, cls, a, b, orthogonal=False)
    assert torch.equal(out[1], h_new[1]) and not torch.equal(out[0], h_new[0])


def test_nan_angle_counts_as_aligned_and_minmax():
    ang = row_angles(torch.zeros(1, 4), torch.ones(1, 4))
    assert math.isnan(float(ang[0])) and classify(ang, 85, 95).tolist() == [ALIGNED]
    assert np.allclose(minmax(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])
    assert np.allclose(minmax(np.array([1.0, 1.0])), [1.0, 1.0])


def test_autoencoder_is_homogeneous_and_decodes_zero_to_zero():
    torch.manual_seed(0)
    ae = TaskVectorAE(32, 16, 4)
    x = torch.randn(5, 32)
    assert torch.equal(ae.decode(torch.zeros(3, 4)), torch.zeros(3, 32))
    assert torch.allclose(ae.encode(3.0 * x), 3.0 * ae.encode(x), atol=1e-5)
    # latent angles do not depend on the size of a task vector
    assert torch.allclose(row_angles(ae.encode(x), ae.encode(x.flip(0))),
                          row_angles(ae.encode(7.0 * x), ae.encode(x.flip(0))), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# GeoEdit end to end on a tiny model
# ---------------------------------------------------------------------------------------------------------------
# the paper's importance fusion (Eq. 11-13); the default for SmolLM2 is the fixed '+MW' weights (GeoEditConfig.fusion)
GEO_SMALL = {"layers": (1,), "num_steps": 3, "ae_steps": 60, "ae_kl_every": 20, "fusion": "importance"}


def test_orthogonal_neurons_get_no_update():
    lm = tiny_model("llama")
    snap = _snapshot(lm)
    # every latent angle is in [0, 180] = [phi1, phi2]: every neuron is 'orthogonal' -> no update at all
    cfg = make_config(GeoEditConfig, {**GEO_SMALL, "phi1": 0.0, "phi2": 180.0}, method="geoedit")
    res = GeoEditEditor(lm, cfg, seed=0).edit(REQS)
    assert _unchanged(lm, snap)
    assert (res.artifacts["neuron_class"] == ORTHOGONAL).all()
    assert all(torch.equal(d, torch.zeros_like(d)) for d in res.deltas.values())
    # the default thresholds: orthogonal neurons (columns of down_proj, neuron_axis 'auto') are zero, the others
    # not all zero
    res = GeoEditEditor(lm, make_config(GeoEditConfig, GEO_SMALL, method="geoedit"), seed=0).edit(REQS)
    assert res.artifacts["neuron_axis"] == "in"
    D = to_neurons(lm.spec.to_canonical(next(iter(res.deltas.values()))), "in")
    ortho = torch.as_tensor(res.artifacts["neuron_class"] == ORTHOGONAL)
    assert (D[ortho] == 0).all() and (D[~ortho].abs().sum(1) > 0).any()
    art = res.artifacts
    assert art["raw_angle"].shape == art["latent_angle"].shape == art["alpha"].shape == (D.shape[0],)
    assert art["alpha"].max() == 1.0 and art["beta"].max() == 1.0  # min-max normalised importance


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("module,axis,expected", [("mlp_out", "auto", "in"), ("mlp_in", "auto", "out"),
                                                  ("mlp_out", "out", "out")])
def test_neuron_axis_sets_neurons_importance_and_delta_layout(arch, module, axis, expected):
    """'auto' = the FFN neuron (d_n = hidden size): columns of the MLP output projection, rows of the input ones;
    the neuron count, d_n, importance length and the zero pattern of the delta all follow the resolved axis."""
    lm = tiny_model(arch)
    ov = {**GEO_SMALL, "ae_steps": 10, "module": module, "neuron_axis": axis}
    res = GeoEditEditor(lm, make_config(GeoEditConfig, ov, method="geoedit"), seed=0).edit(REQS)
    art, spec = res.artifacts, lm.spec
    assert art["neuron_axis"] == res.info["neuron_axis"] == expected
    mats = [to_neurons(spec.to_canonical(res.deltas[p]), expected) for p in art["param_names"]]
    assert res.info["n_neurons"] == sum(m.shape[0] for m in mats) == art["alpha"].shape[0] == art["beta"].shape[0]
    assert {m.shape[1] for m in mats} == {res.info["d_n"]}
    if axis == "auto":
        assert res.info["d_n"] == spec.hidden_size and mats[0].shape[0] == spec.mlp_size
    ortho = torch.as_tensor(art["neuron_class"] == ORTHOGONAL)
    assert (torch.cat(mats)[ortho] == 0).all()


def test_neuron_helpers_and_column_importance_in_lora_mode():
    W = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(to_neurons(W, "out"), W) and torch.equal(to_neurons(W, "in"), W.T)
    assert torch.equal(from_neurons(to_neurons(W, "in"), "in"), W)
    lm = tiny_model("llama")
    ov = {**GEO_SMALL, "ae_steps": 10, "mode": "lora"}
    res = GeoEditEditor(lm, make_config(GeoEditConfig, ov, method="geoedit"), seed=0).edit(REQS)
    # column neurons of down_proj [hidden, mlp]: importance from the columns of A, one per MLP neuron
    assert res.info["n_neurons"] == lm.spec.mlp_size and res.artifacts["beta"].max() == 1.0
    with pytest.raises(ValueError, match="neuron_axis"):
        make_config(GeoEditConfig, {"neuron_axis": "rows"}, method="geoedit")


def test_autoencoder_training_reduces_reconstruction_error():
    lm = tiny_model("llama")
    cfg = make_config(GeoEditConfig, {**GEO_SMALL, "ae_steps": 150}, method="geoedit")
    res = GeoEditEditor(lm, cfg, seed=0).edit(REQS)
    curve = res.artifacts["ae_mse_curve"]
    assert curve.shape == (150,)
    assert curve[-20:].mean() < 0.7 * curve[:5].mean(), (curve[:5], curve[-20:])
    assert len(res.artifacts["ae_kl"]) == 150 // 20 and np.isfinite(res.artifacts["ae_kl"]).all()


def test_fixed_weights_ablation_uses_fixed_alpha_beta():
    lm = tiny_model("gpt2")
    cfg = make_config(GeoEditConfig, {**GEO_SMALL, "ae_steps": 10, "fusion": "fixed"}, method="geoedit")
    res = GeoEditEditor(lm, cfg, seed=0).edit(REQS)
    assert (res.artifacts["alpha"] == 0.3).all() and (res.artifacts["beta"] == 1.0).all()


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_delta_is_b_a_scale_and_model_unchanged(arch):
    lm = tiny_model(arch)
    snap = _snapshot(lm)
    modules = [(n, type(m)) for n, m in lm.model.named_modules()]
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    cfg = make_config(LoRAConfig, {"layers": (1, 2), "num_steps": 3, "rank": 4, "alpha": 8.0}, method="lora")
    res = LoRAEditor(lm, cfg, seed=0).edit(REQS)
    assert _unchanged(lm, snap)
    assert [(n, type(m)) for n, m in lm.model.named_modules()] == modules, "the adapter was not removed"
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == flags
    assert not hasattr(lm.model, "peft_config")
    for name, d in res.deltas.items():
        A = torch.as_tensor(res.artifacts["lora_A"][name])
        B = torch.as_tensor(res.artifacts["lora_B"][name])
        assert A.shape[0] == 4 and B.shape[1] == 4
        assert res.artifacts["lora_scale"][name] == 2.0
        assert torch.equal(d, lm.spec.to_param_layout(B @ A * 2.0).contiguous())
        assert d.abs().max() > 0
    # applying the delta reproduces the adapted model's function: the edit lowered the loss
    assert res.info["loss_final"] < res.info["loss_initial"]


# ---------------------------------------------------------------------------------------------------------------
# F-Learning
# ---------------------------------------------------------------------------------------------------------------
def test_flearning_subtracts_lambda_tau_old_then_learns():
    lm = tiny_model("llama")
    snap = _snapshot(lm)
    common = {"layers": (1,), "num_steps": 3, "batch_size": 2}
    lam = 0.5
    res = FLearningEditor(lm, make_config(FLearningConfig, {**common, "forget_lambda": lam}), seed=0).edit(REQS)
    assert _unchanged(lm, snap)
    name = next(iter(res.deltas))
    # τ_old is what plain fine-tuning on the OLD facts gives (ft editor, same loop, same settings)
    old_reqs = [dataclasses.replace(r, target_new=r.target_true) for r in REQS]
    tau_old = FTEditor(lm, make_config(FTConfig, common), seed=0).edit(old_reqs).deltas[name]
    assert torch.allclose(torch.as_tensor(res.artifacts["tau_old"][name]), tau_old, atol=1e-6)
    # the rest of the delta is fine-tuning on the NEW facts from θ' = θ0 − λ τ_old
    forget = dataclasses.replace(res, deltas={name: -lam * tau_old}, factors={})
    undo = apply_result(lm, forget)
    try:
        learn = FTEditor(lm, make_config(FTConfig, common), seed=0).edit(REQS).deltas[name]
    finally:
        undo(lm.model)
    assert _unchanged(lm, snap)
    assert torch.allclose(res.deltas[name], -lam * tau_old + learn, atol=1e-5)
    assert not torch.allclose(res.deltas[name], learn, atol=1e-5)


def test_flearning_and_geoedit_need_target_true():
    lm = tiny_model("llama")
    req = make_request(source="test_geoedit", record=2, case_id="no-old", prompt="The Louvre is in",
                       subject="The Louvre", target_new="Rome")
    for editor in (FLearningEditor(lm, make_config(FLearningConfig, {"layers": (1,), "num_steps": 1})),
                   GeoEditEditor(lm, make_config(GeoEditConfig, {**GEO_SMALL, "num_steps": 1}))):
        with pytest.raises(EditError, match="target_true"):
            editor.edit([req])
