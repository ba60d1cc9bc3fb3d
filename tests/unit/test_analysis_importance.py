"""Per-neuron magnitudes, gradient×weight importance (leaves the model as it was), GeoEdit Fig. 4 frame."""
import numpy as np
import pytest
import torch

from analysis.importance import fusion_weights_frame, grad_x_weight_importance, neuron_magnitude_frame, neuron_norms


def test_neuron_magnitudes():
    D = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    assert neuron_norms(D, "out") == pytest.approx([5.0, 0.0])
    assert neuron_norms(D, "in") == pytest.approx([3.0, 4.0, 0.0])
    df = neuron_magnitude_frame({1: D, 7: 2 * D}, axis="both")
    assert list(df.columns) == ["layer", "axis", "neuron", "value"]
    assert len(df) == 2 * (2 + 3)
    out7 = df[(df["layer"] == 7) & (df["axis"] == "out")]["value"].tolist()
    assert out7 == pytest.approx([10.0, 0.0])
    norm = neuron_magnitude_frame({1: D, 7: 2 * D}, axis="out", normalise="global")
    assert norm["value"].max() == pytest.approx(1.0) and norm[norm["layer"] == 1]["value"].max() == pytest.approx(0.5)
    conv = neuron_magnitude_frame({0: D.T}, to_canonical=lambda t: t.T)
    assert conv["value"].tolist() == pytest.approx([5.0, 0.0])


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_grad_x_weight_importance_restores_the_model(fixture, request):
    lm = request.getfixturevalue(fixture)
    params = [lm.spec.mlp_out_weight(1), lm.spec.mlp_out_weight(2)]
    named = dict(lm.model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    flags = {n: p.requires_grad for n, p in named.items()}
    other = next(n for n in named if n not in params)
    named[other].requires_grad_(True)  # a flag that must survive
    try:
        df = grad_x_weight_importance(lm, ["The capital of France is", "Water is made of"],
                                      ["Paris", "hydrogen and oxygen"], params, axis="both", batch_size=1)
        assert named[other].requires_grad and named[other].grad is None
    finally:
        named[other].requires_grad_(flags[other])
    assert {n: p.requires_grad for n, p in named.items()} == flags
    assert all(named[n].grad is None for n in params)
    assert all(torch.equal(p, before[n]) for n, p in named.items())
    assert list(df.columns) == ["param", "layer", "axis", "neuron", "value"]
    d, ff = lm.spec.hidden_size, lm.spec.mlp_size
    sizes = df.groupby(["param", "axis"]).size().to_dict()
    assert sizes == {(p, "out"): d for p in params} | {(p, "in"): ff for p in params}
    assert set(df["layer"]) == {1, 2} and (df["value"] >= 0).all() and df["value"].sum() > 0


def test_grad_x_weight_importance_is_batch_invariant(tiny_llama):
    p = [tiny_llama.spec.mlp_out_weight(0)]
    args = (["A cat is an", "The sky is", "Two plus two is"], ["animal", "blue", "four"], p)
    a = grad_x_weight_importance(tiny_llama, *args, batch_size=1)["value"].to_numpy()
    b = grad_x_weight_importance(tiny_llama, *args, batch_size=3)["value"].to_numpy()
    assert np.allclose(a, b, rtol=1e-4, atol=1e-9)


def test_fusion_weights_frame():
    tau_old = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]])
    df = fusion_weights_frame(tau_old, [1.0, 2.0, 3.0], [0.2, 0.4, 0.6], [1.0, 1.0, 0.0])
    assert list(df.columns) == ["neuron", "task", "quantity", "label", "value"]
    assert set(df["label"]) == {"|τ_old|", "|τ_new|", "α", "β"}
    old = df[df["label"] == "|τ_old|"]["value"].tolist()
    assert old == pytest.approx([1.0, 0.2, 0.0])
    assert df["value"].between(0, 1).all()
    raw = fusion_weights_frame(tau_old, [1.0, 2.0, 3.0], [0.2, 0.4, 0.6], [1.0, 1.0, 0.0], normalise=False)
    assert raw[raw["label"] == "|τ_old|"]["value"].tolist() == pytest.approx([5.0, 1.0, 0.0])
    with pytest.raises(ValueError):
        fusion_weights_frame(tau_old, [1.0], [0.2, 0.4, 0.6], [1.0, 1.0, 0.0])
