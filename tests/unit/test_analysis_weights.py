"""Weight statistics with known answers: constructed spectra, rank-k matrices, the fast estimates vs exact SVD."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.weights import (
    DELTA_METRICS,
    W_METRICS,
    cpu_threads,
    effective_rank_from_sigma,
    matrix_stats,
    singular_values,
    spectrum_frame,
    weight_stats_frame,
)


def constructed(s, d_out, d_in, seed=0, dtype=torch.float64):
    """U diag(s) Vᵀ with random orthonormal U [d_out, k], V [d_in, k]."""
    g = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(s, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(d_out, s.numel(), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, s.numel(), generator=g, dtype=torch.float64))
    return ((U * s) @ V.T).to(dtype)


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_cond_and_norms_of_a_constructed_matrix(method):
    s = torch.linspace(10.0, 0.5, 40, dtype=torch.float64)
    W = constructed(s, 40, 90)
    st = matrix_stats(W, method=method)
    assert st["cond"] == pytest.approx(20.0, rel=1e-9)
    assert st["spectral"] == pytest.approx(10.0, rel=1e-9)
    assert st["nuclear"] == pytest.approx(float(s.sum()), rel=1e-9)
    assert st["fro"] == pytest.approx(float(s.norm()), rel=1e-9)
    # transposition does not change anything (parameter layout vs canonical)
    stT = matrix_stats(W.T, method=method)
    assert all(stT[k] == pytest.approx(st[k], rel=1e-9) for k in ("cond", "spectral", "nuclear", "effective_rank"))


def test_elementwise_stats_and_keys():
    W = torch.tensor([[1.0, -2.0, 3.0], [4.0, 0.5, -6.0]])
    st = matrix_stats(W)
    assert set(st) == set(W_METRICS)
    assert (st["max"], st["min"]) == (4.0, -6.0)
    assert st["mean"] == pytest.approx(0.0833333333, rel=1e-6)
    assert st["median"] == pytest.approx(0.75)  # numpy convention: mean of the two middle values
    st = matrix_stats(torch.arange(7.0).reshape(1, 7))
    assert st["median"] == 3.0


def test_effective_rank_of_rank_k_matrix():
    W = constructed(torch.ones(5), 30, 50, dtype=torch.float32)  # rank 5, equal singular values
    assert matrix_stats(W)["effective_rank"] == pytest.approx(5.0, rel=1e-4)
    assert effective_rank_from_sigma(np.array([3.0, 0, 0])) == pytest.approx(1.0)
    assert effective_rank_from_sigma(np.ones(7)) == pytest.approx(7.0)


def test_delta_metrics_of_a_rank_r_update():
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(48, 96, generator=g)
    D = constructed([4.0, 2.0, 1.0], 48, 96, seed=2, dtype=torch.float32)  # rank 3, cond over its rank = 4
    st = matrix_stats(W0 + D, W0)
    assert set(DELTA_METRICS) <= set(st)
    assert st["delta_rank"] == 3
    assert st["delta_cond"] == pytest.approx(4.0, rel=1e-4)  # pseudo-inverse condition number, not inf
    assert st["delta_spectral"] == pytest.approx(4.0, rel=1e-5)
    assert st["delta_fro"] == pytest.approx(math.sqrt(21.0), rel=1e-5)
    assert st["rel_change"] == pytest.approx(st["delta_fro"] / float(W0.double().norm()), rel=1e-9)
    # no update at all
    st0 = matrix_stats(W0, W0)
    assert st0["delta_fro"] == 0 and st0["delta_rank"] == 0 and math.isnan(st0["delta_cond"])


def test_gram_route_matches_svd_for_float32_weights():
    g = torch.Generator().manual_seed(3)
    W = (torch.randn(120, 300, generator=g) * 0.05).float()
    a = singular_values(W, method="gram")
    b = singular_values(W, method="svd")
    assert np.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert (np.diff(a) <= 0).all()


def test_lanczos_estimates_close_to_exact_svd_on_600x2000():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(600, 2000, generator=g) * 0.05
    W = W0 + 0.01 * torch.randn(600, 20, generator=g) @ torch.randn(20, 2000, generator=g)  # spiked, like an edit
    with cpu_threads(1):  # two OpenMP threads on a busy shared CPU are much slower than one
        s = torch.linalg.svdvals(W.double()).numpy()  # the exact reference
    fast = matrix_stats(W, W0, exact_max_dim=256)  # 600 > 256: the matrix-free route
    assert fast["spectral"] == pytest.approx(s[0], rel=1e-8)
    assert fast["cond"] == pytest.approx(s[0] / s[-1], rel=1e-3)
    assert fast["nuclear"] == pytest.approx(s.sum(), rel=0.01)
    assert fast["effective_rank"] == pytest.approx(effective_rank_from_sigma(s), rel=0.01)
    # the rank-20 update is resolved exactly (Lanczos stops on an invariant subspace)
    sd = singular_values(W.double() - W0.double(), method="gram")
    sd = sd[sd > 1e-4 * sd[0]]
    assert fast["delta_rank"] == sd.size == 20
    assert fast["delta_spectral"] == pytest.approx(sd[0], rel=1e-6)
    assert fast["delta_cond"] == pytest.approx(sd[0] / sd[-1], rel=1e-6)
    assert fast["delta_nuclear"] == pytest.approx(sd.sum(), rel=1e-6)
    assert fast["delta_effective_rank"] == pytest.approx(effective_rank_from_sigma(sd), rel=1e-6)


def test_weight_stats_frame_long_form():
    W0 = {"model.layers.3.mlp.down_proj.weight": torch.randn(16, 32), "other": torch.randn(8, 8)}
    W = {k: v + 0.1 for k, v in W0.items()}
    df = weight_stats_frame(W, W0, step=2, n_edits=20, layer_of={"model.layers.3.mlp.down_proj.weight": 3})
    assert list(df.columns) == ["n_edits", "step", "layer", "param", "metric", "value"]
    assert set(df["metric"]) == set(W_METRICS) | set(DELTA_METRICS)
    assert (df["n_edits"] == 20).all() and (df["step"] == 2).all()
    assert set(df.loc[df["param"] == "model.layers.3.mlp.down_proj.weight", "layer"]) == {3}
    assert df.loc[df["param"] == "other", "layer"].isna().all()
    assert len(df) == 2 * (len(W_METRICS) + len(DELTA_METRICS))


def test_cpu_threads_is_restored():
    old = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == old
    matrix_stats(torch.randn(5, 7), threads=1)
    assert torch.get_num_threads() == old


def test_spectrum_frame():
    W0 = torch.randn(10, 20)
    df = spectrum_frame({"p": W0 + 1.0}, {"p": W0}, n_edits=5, top=4)
    assert list(df.columns) == ["n_edits", "layer", "param", "which", "index", "sigma"]
    assert set(df["which"]) == {"W", "delta"} and df["index"].max() == 4
    delta = df[df["which"] == "delta"]["sigma"].to_numpy()
    assert delta[0] == pytest.approx(math.sqrt(200.0), rel=1e-6) and delta[1] < 1e-5  # ones(10, 20): rank 1
    assert isinstance(df, pd.DataFrame)


def test_preserved_output_change_against_explicit_keys():
    """sqrt(tr(ΔW C ΔWᵀ)/tr(W0 C W0ᵀ)) with C = K0 K0ᵀ / n equals ‖ΔW K0‖_F / ‖W0 K0‖_F. Fails on: W instead of W0
    in the denominator, no square root, C's trace instead of the W0 C W0ᵀ one, ΔW = W0 − W's sign (no: squared) ..."""
    import math

    from analysis.weights import preserved_output_change
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(5, 8, generator=g, dtype=torch.float64)
    W = W0 + 0.1 * torch.randn(5, 8, generator=g, dtype=torch.float64)
    K0 = torch.randn(8, 40, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 8, dtype=torch.float64)[:, None]
    C = K0 @ K0.T / 40
    expect = float(((W - W0) @ K0).norm() / (W0 @ K0).norm())
    assert math.isclose(preserved_output_change(W, W0, C), expect, rel_tol=1e-10)
    assert preserved_output_change(W0, W0, C) == 0.0
    # a rotation of every output by θ: 2 sin(θ/2)
    th = 0.3
    R = torch.eye(5, dtype=torch.float64)
    R[:2, :2] = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64)
    W0r = torch.zeros(5, 8, dtype=torch.float64)
    W0r[:2] = W0[:2]
    assert math.isclose(preserved_output_change(R @ W0r, W0r, C), 2 * math.sin(th / 2), rel_tol=1e-10)
    with pytest.raises(ValueError, match="shapes"):
        preserved_output_change(W, W0, C[:4, :4])


@pytest.mark.parametrize("n", [1, 2, 7, 8, 1001])
def test_median_on_device_equals_numpy_for_odd_and_even_sizes(n):
    """The GPU path of the ``median`` statistic (order statistics where the matrix lives, no host copy) equals
    numpy's median: the mean of the two middle values for an even size, with ties."""
    from analysis.weights import _median, _median_on_device
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(-5, 6, (n,), generator=gen).float() + torch.rand(n, generator=gen).round()  # many ties
    assert _median_on_device(x) == pytest.approx(float(np.median(x.numpy())), abs=0)
    assert _median(x.numpy()) == pytest.approx(float(np.median(x.numpy())), abs=0)
    y = torch.arange(n, dtype=torch.float64).flip(0)
    assert _median_on_device(y) == float(np.median(y.numpy()))
    assert math.isnan(_median_on_device(torch.zeros(0)))
