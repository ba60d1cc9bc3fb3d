"""Angles with known answers: orthogonal / parallel / opposite updates, subspaces, GeoEdit per-neuron angles."""
import math

import numpy as np
import pytest
import torch

from analysis.angles import (
    angle_summary,
    classify_angles,
    factor_delta,
    flat_angle,
    key_angle_frame,
    neuron_angle_frame,
    preserved_basis,
    principal_angle,
    row_angles,
    subspace_angle,
    subspace_share,
    top_singular_vectors,
    update_angles,
)
from editors.base import EditResult


def rank_one(u, v):
    return torch.outer(torch.as_tensor(u, dtype=torch.float64), torch.as_tensor(v, dtype=torch.float64))


def test_flat_angles():
    A = torch.randn(6, 9, dtype=torch.float64)
    assert flat_angle(A, 2 * A) == pytest.approx(0.0, abs=1e-5)
    assert flat_angle(A, -A) == pytest.approx(180.0, abs=1e-5)
    B = torch.randn(6, 9, dtype=torch.float64)
    B = B - (B * A).sum() / (A * A).sum() * A  # orthogonal to A as a flat vector
    assert flat_angle(A, B) == pytest.approx(90.0, abs=1e-9)
    assert math.isnan(flat_angle(A, torch.zeros_like(A)))


def test_update_angles_of_orthogonal_updates_is_90():
    e = torch.eye(8, dtype=torch.float64)
    f = torch.eye(12, dtype=torch.float64)
    name = "model.layers.2.mlp.down_proj.weight"
    steps = {1: {name: rank_one(e[0], f[0])}, 2: {name: rank_one(e[1], f[1])}, 3: {name: -rank_one(e[1], f[0])}}
    df = update_angles(steps, layer_of=lambda n: 2)
    assert list(df.columns) == ["n_edits", "prev_n_edits", "layer", "param", "metric", "value"]
    at = {(r.n_edits, r.metric): r.value for r in df.itertuples()}
    assert at[(2, "angle_flat")] == pytest.approx(90.0)
    assert at[(2, "angle_top_out")] == pytest.approx(90.0) and at[(2, "angle_top_in")] == pytest.approx(90.0)
    # step 3 shares the output direction with step 2 (sign does not matter for lines) and not the input one
    assert at[(3, "angle_top_out")] == pytest.approx(0.0, abs=1e-5)
    assert at[(3, "angle_top_in")] == pytest.approx(90.0)
    assert at[(3, "angle_flat")] == pytest.approx(90.0)
    assert set(df["prev_n_edits"]) == {1, 2} and set(df["layer"]) == {2}


def test_update_angles_accepts_edit_results_and_conv1d_layout():
    e = torch.eye(4, dtype=torch.float64)
    r1 = EditResult(method="x", deltas={"w": rank_one(e[0], e[1])})
    r2 = EditResult(method="x", deltas={"w": rank_one(e[0], e[2])})
    df = update_angles([(5, r1), (10, r2)], to_canonical=lambda t: t.T)
    at = {r.metric: r.value for r in df.itertuples()}
    # after the transpose the shared direction e0 is the INPUT side
    assert at["angle_top_in"] == pytest.approx(0.0, abs=1e-5) and at["angle_top_out"] == pytest.approx(90.0)


def test_top_singular_vectors_exact_and_randomised_agree():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 3, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(500, 3, generator=g, dtype=torch.float64))
    D = (U * torch.tensor([9.0, 4.0, 1.0], dtype=torch.float64)) @ V.T
    for kw in ({}, {"exact_max_dim": 100}):
        u, v = top_singular_vectors(D, 2, **kw)
        assert principal_angle(u, U[:, :2]) < 1e-4 and principal_angle(v, V[:, :2]) < 1e-4


def test_preserved_subspace_angle():
    g = torch.Generator().manual_seed(0)
    K0 = torch.zeros(10, 50, dtype=torch.float64)
    K0[:3] = torch.randn(3, 50, generator=g, dtype=torch.float64)  # keys live in the first 3 input dims
    basis = preserved_basis(K0=K0)
    assert basis.shape == (10, 3)
    inside = torch.zeros(4, 10, dtype=torch.float64)
    inside[:, :3] = 1.0
    outside = torch.zeros(4, 10, dtype=torch.float64)
    outside[:, 5:] = 1.0
    assert subspace_angle(inside, basis) == pytest.approx(0.0, abs=1e-5)
    assert subspace_angle(outside, basis) == pytest.approx(90.0)
    mixed = inside / inside.norm() + outside / outside.norm()
    assert subspace_share(mixed, basis) == pytest.approx(0.5)
    assert subspace_angle(mixed, basis) == pytest.approx(45.0)
    # from the covariance, same answer
    basis_c = preserved_basis(C=K0 @ K0.T)
    assert principal_angle(basis, basis_c) < 1e-5
    df = key_angle_frame({"p": outside}, {"p": basis}, n_edits=3)
    assert set(df["metric"]) == {"key_share", "key_angle"}
    assert df.set_index("metric").loc["key_angle", "value"] == pytest.approx(90.0)


def test_factor_delta():
    R = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    assert torch.allclose(factor_delta(R, W), R @ W - W)


def test_geoedit_neuron_angles():
    A = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    B = torch.tensor([[1.0, 1.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])
    a = row_angles(A, B)
    assert a[:3] == pytest.approx([45.0, 90.0, 180.0]) and math.isnan(a[3])
    assert list(classify_angles([10.0, 85.0, 90.0, 95.0, 100.0])) == ["aligned", "orthogonal", "orthogonal",
                                                                   "orthogonal", "conflicting"]
    raw = np.array([88.0, 91.0, 92.0])
    latent = np.array([30.0, 90.0, 150.0])
    df = neuron_angle_frame(raw, latent, layer=4, param="p")
    assert list(df.columns) == ["layer", "param", "neuron", "space", "angle", "class"]
    assert len(df) == 6 and set(df["space"]) == {"raw", "latent"}
    # classes follow the latent angles in both spaces
    assert list(df[df["space"] == "raw"]["class"]) == ["aligned", "orthogonal", "conflicting"]
    df2 = neuron_angle_frame(raw, classes=[2, 1, 0])
    assert list(df2["class"]) == ["conflicting", "orthogonal", "aligned"] and set(df2["space"]) == {"raw"}
    s = angle_summary([80.0, 90.0, 94.0, 100.0, np.nan])
    assert s["mean"] == pytest.approx(91.0) and s["share_85_95"] == pytest.approx(0.5)
    assert s["share_below_85"] == pytest.approx(0.25) and s["n"] == 4
    assert s["std"] == pytest.approx(np.std([80.0, 90.0, 94.0, 100.0]))


def test_latent_angle_sweep_builds_exact_raw_angles_and_reports_the_encoder():
    from analysis.angles import latent_angle_sweep
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 12, generator=g, dtype=torch.float64)
    sweep = (0.0, 45.0, 90.0, 135.0, 180.0)
    # identity encoder: latent == raw exactly (the pairs are built at those raw angles)
    df = latent_angle_sweep(lambda x: x, X, sweep, n_pairs=5)
    assert len(df) == 25 and list(df.columns) == ["pair", "raw", "latent"]
    assert np.allclose(df["latent"], df["raw"], atol=1e-3)
    # an elementwise |x| encoder folds angles: x and -x have the same code (0 degrees, not 180)
    folded = latent_angle_sweep(torch.abs, X, sweep, n_pairs=5)
    assert np.allclose(folded[folded["raw"] == 180.0]["latent"], 0.0, atol=1e-3)
    with pytest.raises(ValueError, match="X must be"):
        latent_angle_sweep(lambda x: x, X[:1])
