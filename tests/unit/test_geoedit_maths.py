"""GeoEdit's maths (editors/geoedit.py) on constructed vectors, no model: Eq. 10-11 (angles, the class boundaries at
exactly φ1 / φ2, each rule of the fusion, classes from the LATENT angles), the orientation-preserving auto-encoder
(±x conflicting, 90° pairs orthogonal, a raw-angle sweep close to identity), Eq. 9's loss (MSE + λ·KL, the KL's
direction), the importance normalisations (rank robust to one outlier, min-max not) and Spearman. Fast: this is the
test set ``scripts/mutation.sh geoedit`` mutates the maths against first; the editor-level checks on tiny models are
in test_geoedit.py."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from editors.base import make_config
from editors.geoedit import (
    ALIGNED,
    CONFLICTING,
    ORTHOGONAL,
    GeoEditConfig,
    GeoEditMWConfig,
    LinearAE,
    ReluMLPAE,
    average_ranks,
    classify,
    fuse,
    geometric_edit,
    kl_divergence,
    minmax,
    normalise_importance,
    rank_scale,
    row_angles,
    spearman,
    train_autoencoder,
    variant_label,
)


def _pair(phi_deg: float, d: int = 8, r_old: float = 1.0, r_new: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """h_old along e1, h_new at angle phi from it in the (e1, e2) plane."""
    phi = math.radians(phi_deg)
    a, b = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    a[0] = r_old
    b[0], b[1] = r_new * math.cos(phi), r_new * math.sin(phi)
    return a, b


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """A second, independent angle computation (float64, atan2 of |a x b| and a.b in the plane of a and b)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    cos = float(a @ b)
    sin = float(torch.sqrt(torch.clamp((a @ a) * (b @ b) - (a @ b) ** 2, min=0)))
    return math.degrees(math.atan2(sin, cos))


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


@pytest.mark.parametrize("phi1,phi2", [(85.0, 95.0), (80.0, 100.0)])
def test_class_boundaries_are_inclusive_at_exactly_phi1_and_phi2(phi1, phi2):
    """Eq. 11: (0, φ1) aligned, [φ1, φ2] orthogonal (closed), (φ2, 180) conflicting."""
    from analysis.angles import classify_angles
    eps = 1e-9
    angles = torch.tensor([phi1 - eps, phi1, (phi1 + phi2) / 2, phi2, phi2 + eps, 0.0, 180.0], dtype=torch.float64)
    expected = [ALIGNED, ORTHOGONAL, ORTHOGONAL, ORTHOGONAL, CONFLICTING, ALIGNED, CONFLICTING]
    assert classify(angles, phi1, phi2).tolist() == expected
    names = {ALIGNED: "aligned", ORTHOGONAL: "orthogonal", CONFLICTING: "conflicting"}
    assert classify_angles(angles.numpy(), phi1, phi2).tolist() == [names[c] for c in expected]


def test_switched_off_rules_fall_back_to_new_task_vector():
    h_old = torch.stack([_pair(p)[0] for p in (30.0, 90.0, 150.0)])
    h_new = torch.stack([_pair(p)[1] for p in (30.0, 90.0, 150.0)])
    cls = classify(row_angles(h_old, h_new), 85.0, 95.0)
    a = b = torch.full((3,), 0.5, dtype=torch.float64)
    out = fuse(h_old, h_new, cls, a, b, synergistic=False, orthogonal=False, conflicting=False)
    assert torch.equal(out, h_new)
    for flag, i in (("synergistic", 0), ("orthogonal", 1), ("conflicting", 2)):
        out = fuse(h_old, h_new, cls, a, b, **{flag: False})
        assert torch.equal(out[i], h_new[i]), flag
        others = [j for j in range(3) if j != i]
        assert all(not torch.equal(out[j], h_new[j]) for j in others), flag


def test_nan_angle_counts_as_aligned():
    ang = row_angles(torch.zeros(1, 4), torch.ones(1, 4))
    assert math.isnan(float(ang[0])) and classify(ang, 85, 95).tolist() == [ALIGNED]


def _low_rank_data(n: int = 400, d_n: int = 48, k: int = 6, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Rows concentrated in a k-dimensional subspace plus isotropic noise, like neuron task vectors (91% of the
    default model's layer-24 τ energy lies in 72 of 576 directions)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d_n, k, generator=g))[0].T  # [k, d_n]
    return torch.randn(n, k, generator=g) @ basis * 3.0 + noise * torch.randn(n, d_n, generator=g)


def _trained_linear_ae(X: torch.Tensor, latent: int, steps: int = 50) -> LinearAE:
    torch.manual_seed(0)
    ae = LinearAE(X.shape[1], latent)
    train_autoencoder(ae, X, steps=steps, lr=1e-3, batch_size=64, kl_every=1, kl_weight=0.0,
                      generator=torch.Generator().manual_seed(0))
    return ae


def test_linear_autoencoder_keeps_orientation_and_scale():
    X = _low_rank_data()
    ae = _trained_linear_ae(X, latent=6)
    E = ae.E.detach()
    assert torch.allclose(E @ E.T, torch.eye(6), atol=1e-5)  # orthonormal rows, also after training
    g = torch.Generator().manual_seed(1)
    x = X[:20] + 0.3 * torch.randn(20, X.shape[1], generator=g)
    with torch.no_grad():
        assert torch.equal(ae.encode(-x), -ae.encode(x))
        assert torch.allclose(ae.encode(3.0 * x), 3.0 * ae.encode(x), atol=1e-5)
        assert torch.equal(ae.decode(torch.zeros(3, 6)), torch.zeros(3, X.shape[1]))
        # x and -x are opposite in the latent space: 180 degrees, the conflicting class
        ang = row_angles(ae.encode(x), ae.encode(-x))
    assert torch.allclose(ang, torch.full_like(ang, 180.0), atol=1e-3)
    assert (classify(ang, 85, 95) == CONFLICTING).all()


def test_relu_autoencoder_cannot_express_conflict():
    """The ReLU MLP of config versions <= 3: Enc(-x) = W2 relu(-W1 x) is built from the hidden units that x does NOT
    activate, so x and -x come out far below 180 degrees, by an amount that depends on x (the artefact the linear AE
    removes; the orientation test above fails on this AE)."""
    X = _low_rank_data()
    torch.manual_seed(0)
    ae = ReluMLPAE(X.shape[1], 24, 6)
    train_autoencoder(ae, X, steps=50, lr=1e-3, batch_size=64, kl_every=1, kl_weight=0.0,
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ang = row_angles(ae.encode(X[:50]), ae.encode(-X[:50]))
    assert float(ang.max()) < 160.0 and float(ang.std()) > 5.0


def test_linear_autoencoder_maps_angles_close_to_identity_in_the_data_subspace():
    """Pairs built from data rows at raw angles 0/30/60/85/90/95/120/150/180 degrees: the latent angle follows the
    raw one monotonically within 1 degree (measured max |latent - raw| ~0.3 degrees here with 5% noise;
    scripts/geoedit_angles.py --sweep measures the same on the default model's task vectors); 90 degree pairs land in
    the orthogonal band."""
    X = _low_rank_data()
    ae = _trained_linear_ae(X, latent=6)
    sweep = [0.0, 30.0, 60.0, 85.0, 90.0, 95.0, 120.0, 150.0, 180.0]
    for i in range(10):
        x, z = X[2 * i].double(), X[2 * i + 1].double()
        u = x / x.norm()
        w = z - (z @ u) * u
        w = w / w.norm()
        ys = [math.cos(math.radians(p)) * u + math.sin(math.radians(p)) * w for p in sweep]
        raw = [_angle(x, y) for y in ys]
        assert np.allclose(raw, sweep, atol=1e-4)  # degrees: acos near 1 leaves ~1e-6 of rounding
        with torch.no_grad():
            hx = ae.encode(x.float()[None])
            lat = [_angle(hx, ae.encode(y.float()[None])) for y in ys]
        assert np.all(np.diff(lat) > 0), lat  # monotone
        assert np.max(np.abs(np.array(lat) - sweep)) < 1.0, lat
        cls = classify(torch.tensor(lat), 85.0, 95.0).tolist()
        assert cls[sweep.index(90.0)] == ORTHOGONAL and cls[sweep.index(180.0)] == CONFLICTING
        assert cls[sweep.index(60.0)] == ALIGNED and cls[sweep.index(120.0)] == CONFLICTING


def test_linear_autoencoder_starts_at_the_mse_optimum():
    """init_from = the top principal directions: the initial reconstruction error is the Eckart-Young residual."""
    X = _low_rank_data(noise=0.2)
    torch.manual_seed(0)
    ae = LinearAE(X.shape[1], 4)
    ae.init_from(X)
    s = torch.linalg.svdvals(X)
    with torch.no_grad():
        err = ((ae(X) - X) ** 2).sum()
    assert torch.allclose(err, (s[4:] ** 2).sum(), rtol=1e-4)
    with pytest.raises(ValueError, match="latent"):
        LinearAE(4, 5)


def test_kl_divergence_is_kl_p_given_q_per_token():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, 11, generator=g), -1)
    logq = torch.log_softmax(torch.randn(5, 11, generator=g), -1)
    expected = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="batchmean")
    assert torch.allclose(kl_divergence(logp, logq), expected)
    assert not torch.allclose(kl_divergence(logq, logp), expected)  # the direction matters: p is the reference
    assert float(kl_divergence(logp, logp)) == pytest.approx(0.0, abs=1e-7)


def test_autoencoder_loss_is_mse_plus_lambda_kl():
    """Ten Adam steps of train_autoencoder against a manual Adam on MSE + λ·KL (a KL term with a known gradient),
    with the KL every third step, the task index alternating old, new, old (three KL steps: a cycle of three tasks
    would show), minibatches larger than d_n."""
    X = _low_rank_data(n=64, d_n=16, k=3)
    Y = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    lam, lr, every, steps, batch = 0.5, 1e-2, 3, 10, 24
    calls = []

    def kl_term(ae, task):
        calls.append(task)
        return ((ae.encode(Y) - 1.0) ** 2).mean() * (1 + task)

    torch.manual_seed(0)
    ae = LinearAE(16, 3)
    mse, kls = train_autoencoder(ae, X, steps=steps, lr=lr, batch_size=batch, kl_every=every, kl_weight=lam,
                                 kl_term=kl_term, generator=torch.Generator().manual_seed(5))
    assert calls == [0, 1, 0] and len(mse) == steps

    torch.manual_seed(0)
    ref = LinearAE(16, 3)
    ref.init_from(X)
    opt = torch.optim.Adam(ref.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(5)
    expected_kl = []
    for step in range(steps):
        xb = X[torch.randint(0, X.shape[0], (batch,), generator=gen)]
        loss = ((xb @ ref.E.T @ ref.E - xb) ** 2).mean()
        assert loss.item() == pytest.approx(mse[step], rel=1e-5)
        if (step + 1) % every == 0:
            task = (step // every) % 2
            kl = ((Y @ ref.E.T - 1.0) ** 2).mean() * (1 + task)
            expected_kl.append(kl.item())
            loss = loss + lam * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # the QR retraction back to orthonormal rows
            Q, R = torch.linalg.qr(ref.E.T)
            ref.E.copy_((Q * torch.sign(torch.diagonal(R))).T)
    assert torch.allclose(ae.E, ref.E, atol=1e-6)
    assert kls == pytest.approx(expected_kl, rel=1e-5)
    # without the KL term the result differs (the test sees a dropped term), and λ = 0 never evaluates it
    calls.clear()
    torch.manual_seed(0)
    plain = LinearAE(16, 3)
    _, none = train_autoencoder(plain, X, steps=steps, lr=lr, batch_size=batch, kl_every=every, kl_weight=0.0,
                                kl_term=kl_term, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(plain.E, ref.E, atol=1e-4)
    assert none == [] and calls == []


def test_linear_autoencoder_sizes_initialisation_and_retraction():
    for latent in (1, 4):  # 1 <= latent <= d_n
        assert LinearAE(4, latent).E.shape == (latent, 4)
    for bad in (0, 5):
        with pytest.raises(ValueError, match="latent"):
            LinearAE(4, bad)
    # init_from: the top principal directions, each row with a non-negative sum (a deterministic sign)
    X = _low_rank_data(noise=0.2)
    torch.manual_seed(0)
    ae = LinearAE(X.shape[1], 5)
    ae.init_from(X)
    _, _, Vh = torch.linalg.svd(X, full_matrices=False)
    assert (ae.E.detach().sum(1) >= 0).all()
    assert torch.allclose((ae.E.detach() @ Vh[:5].T).abs(), torch.eye(5), atol=1e-4)
    # fewer data rows than latent dimensions: those rows' directions first, the rest random but orthonormal
    ae = LinearAE(X.shape[1], 5)
    ae.init_from(X[:2])
    E = ae.E.detach()
    assert torch.allclose(E @ E.T, torch.eye(5), atol=1e-5)
    _, _, V2 = torch.linalg.svd(X[:2], full_matrices=False)
    assert torch.allclose((E[:2] @ V2.T).abs(), torch.eye(2), atol=1e-4)
    # retract leaves an orthonormal E as it is (signs included), and orthonormalises any other
    for E0 in (-torch.eye(6)[:3], torch.linalg.qr(torch.randn(6, 3, generator=torch.Generator().manual_seed(2)))[0].T):
        ae = LinearAE(6, 3)
        with torch.no_grad():
            ae.E.copy_(E0)
        ae.retract()
        assert torch.allclose(ae.E.detach(), E0, atol=1e-6)
    with torch.no_grad():
        ae.E.mul_(3.0)
    ae.retract()
    assert torch.allclose(ae.E.detach(), E0, atol=1e-6)


def test_make_autoencoder_and_neuron_views():
    from editors.geoedit import from_neurons, make_autoencoder, to_neurons
    lin = make_autoencoder("linear", 64)
    assert isinstance(lin, LinearAE) and lin.E.shape == (8, 64)  # latent d_n // 8
    assert make_autoencoder("linear", 64, latent=5).E.shape == (5, 64)
    relu = make_autoencoder("mlp-relu", 64)
    assert isinstance(relu, ReluMLPAE) and relu.enc[0].weight.shape == (32, 64) and relu.enc[2].weight.shape == (8, 32)
    tiny = make_autoencoder("mlp-relu", 3)  # at least one hidden and one latent unit
    assert tiny.enc[0].weight.shape == (1, 3) and tiny.enc[2].weight.shape == (1, 1)
    relu = make_autoencoder("mlp-relu", 64, latent=4, hidden=10)
    assert relu.enc[0].weight.shape == (10, 64) and relu.dec[2].weight.shape == (64, 10)
    assert make_autoencoder("linear", 4).E.shape == (1, 4)  # at least one latent dimension
    with pytest.raises(ValueError, match="unknown auto-encoder"):
        make_autoencoder("tanh", 8)
    W = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(to_neurons(W, "out"), W) and torch.equal(to_neurons(W, "in"), W.T)
    assert torch.equal(from_neurons(to_neurons(W, "in"), "in"), W) and torch.equal(from_neurons(W, "out"), W)


def test_row_angles_edge_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 7, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 500, dtype=torch.float64)[:, None]
    same, opposite = row_angles(x, x), row_angles(x, -x)
    assert not torch.isnan(same).any() and not torch.isnan(opposite).any()  # |cos| rounding above 1 is clamped
    assert torch.allclose(same, torch.zeros_like(same), atol=1e-5)
    assert torch.allclose(opposite, torch.full_like(opposite, 180.0), atol=1e-5)
    unit = row_angles(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert unit[0].item() == pytest.approx(90.0) and math.isnan(unit[1].item())


def test_rank_normalisation_and_ties():
    assert np.allclose(average_ranks(np.array([3.0, 1.0, 2.0, 2.0])), [3.0, 0.0, 1.5, 1.5])
    assert np.allclose(average_ranks(np.array([[3.0, 1.0], [2.0, 2.0]])), [3.0, 0.0, 1.5, 1.5])  # flattened
    assert np.allclose(rank_scale(np.array([3.0, 1.0, 2.0, 2.0])), [1.0, 0.0, 0.5, 0.5])
    assert np.allclose(rank_scale(np.array([1.0, 2.0])), [0.0, 1.0])
    for f in (rank_scale, minmax):
        ones = f(np.array([5.0, 5.0]))
        assert ones.shape == (2,) and np.all(ones == 1.0)
        assert f(np.array([2.0])).shape == (1,) and f(np.array([2.0]))[0] == 1.0
        out = f(np.array([1.0, 3.0, 2.0], dtype=np.float32))
        assert out.dtype == np.float64 and np.allclose(out, [0.0, 1.0, 0.5])  # α, β are float64
        for flat in (np.array([5, 5]), np.array([7], dtype=np.float32)):  # also on the all-equal path
            assert f(flat).dtype == np.float64, (f.__name__, flat.dtype)
    assert np.allclose(minmax(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])
    assert np.allclose(normalise_importance(np.array([2.0, 4.0, 10.0]), "minmax"), [0.0, 0.25, 1.0])
    assert np.allclose(normalise_importance(np.array([2.0, 4.0, 10.0]), "rank"), [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="normalisation"):
        normalise_importance(np.ones(3), "zscore")


def test_one_outlier_neuron_does_not_move_the_others_under_rank_but_does_under_minmax():
    """Scaling one neuron's importance x100 (as the default model's neuron #1005, 8x the 99th percentile): under
    'rank' no other neuron's weight moves by more than 1/(N-1); under the paper's min-max every other weight
    shrinks."""
    rng = np.random.default_rng(0)
    v = rng.lognormal(0.0, 1.0, 1536)
    k = int(np.argsort(v)[768])  # a median neuron
    w = v.copy()
    w[k] *= 100.0
    others = np.arange(v.size) != k
    for how, bound in (("rank", 1.0 / (v.size - 1) + 1e-12),):
        change = np.abs(normalise_importance(w, how) - normalise_importance(v, how))[others]
        assert change.max() <= bound, (how, change.max())
    change = np.abs(normalise_importance(w, "minmax") - normalise_importance(v, "minmax"))[others]
    assert change.max() > 0.1


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr
    rng = np.random.default_rng(1)
    a = rng.normal(size=200)
    b = a + rng.normal(size=200)
    b[:5] = b[5:10]  # ties
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).correlation, abs=1e-12)
    assert spearman(a.reshape(20, 10), b.reshape(20, 10)) == pytest.approx(spearman(a, b))  # flattened
    a[3] = np.nan
    ok = ~np.isnan(a)
    assert spearman(a, b) == pytest.approx(spearmanr(a[ok], b[ok]).correlation, abs=1e-12)
    assert spearman([1, 2], [1, 2]) == pytest.approx(1.0) and spearman([1, 2], [2, 1]) == pytest.approx(-1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a constant input gives NaN without a 0/0 warning
        assert math.isnan(spearman(np.ones(4), np.arange(4.0))) and math.isnan(spearman([1.0], [2.0]))


def _coordinate_ae(d_n: int, kept: int) -> LinearAE:
    ae = LinearAE(d_n, kept)
    with torch.no_grad():
        ae.E.copy_(torch.eye(d_n)[:kept])
    return ae


def test_geometric_edit_classifies_on_latent_not_raw_angles():
    """The AE keeps coordinates 0-1. Neuron 0: opposite in the kept plane, large perpendicular parts outside it ->
    raw 90.6° (orthogonal under raw) but latent exactly 180°: conflicting. Neuron 1: at 60° in the plane, opposite
    parts outside -> raw 148° but latent 60°: aligned. Neuron 2: perpendicular in the plane, parallel outside ->
    raw ~8° but latent 90°: orthogonal. Neuron 3: parallel, α = 0, β = 1, h_edit = (1, 0) exactly."""
    ae = _coordinate_ae(6, 2)
    old = torch.tensor([[1.0, 0, 10, 0, 0, 0], [1.0, 0, 0, 3, 0, 0], [1.0, 0, 0, 0, 10, 0], [2.0, 0, 0, 0, 0, 1]],
                       dtype=torch.float64)
    new = torch.tensor([[-1.0, 0, 0, 10, 0, 0], [0.5, math.sqrt(3) / 2, 0, -3, 0, 0], [0, 1.0, 0, 0, 10, 0],
                        [2.0, 0, 0, 0, 0, -1]], dtype=torch.float64)
    alpha = np.array([0.3, 0.6, 0.9, 0.0])
    beta = np.array([0.8, 0.5, 0.7, 1.0])
    out = geometric_edit(old, new, ae, alpha, beta, phi1=85.0, phi2=95.0, scale=2.0)
    assert classify(out.raw, 85.0, 95.0).tolist() == [ORTHOGONAL, CONFLICTING, ALIGNED, ALIGNED]
    assert out.cls.tolist() == [CONFLICTING, ALIGNED, ORTHOGONAL, ALIGNED]
    assert np.allclose(out.latent.numpy(), [180.0, 60.0, 90.0, 0.0], atol=1e-4)
    h_old, h_new = old[:, :2] / 2.0, new[:, :2] / 2.0
    assert torch.allclose(out.h_old.double(), h_old) and torch.allclose(out.h_new.double(), h_new)
    h_edit = torch.zeros(4, 2, dtype=torch.float64)
    h_edit[0] = -0.3 * h_old[0] + 0.8 * h_new[0]
    h_edit[1] = 0.6 * h_old[1] + 0.5 * h_new[1]
    h_edit[3] = h_new[3]
    assert torch.allclose(out.h_edit.double(), h_edit, atol=1e-7)
    expected = torch.zeros(4, 6, dtype=torch.float64)
    expected[:, :2] = h_edit * 2.0
    assert torch.allclose(out.tau_edit, expected, atol=1e-6)
    assert torch.equal(out.tau_edit[2], torch.zeros(6, dtype=torch.float64))
    # scale defaults to 1; each switched-off rule gives h_new for its class
    unscaled = geometric_edit(old / 2.0, new / 2.0, ae, alpha, beta, phi1=85.0, phi2=95.0)
    assert torch.allclose(unscaled.tau_edit * 2.0, out.tau_edit, atol=1e-6)
    assert torch.allclose(unscaled.h_old.double(), h_old) and torch.equal(unscaled.cls, out.cls)
    for flag, i in (("synergistic", 1), ("orthogonal", 2), ("conflicting", 0)):
        off = geometric_edit(old, new, ae, alpha, beta, phi1=85.0, phi2=95.0, scale=2.0, **{flag: False})
        assert torch.allclose(off.h_edit[i].double(), h_new[i]), flag
        assert torch.allclose(off.h_edit[[j for j in range(4) if j != i]].double(),
                              h_edit[[j for j in range(4) if j != i]], atol=1e-7), flag


def test_variant_label_names_each_deviation():
    full = make_config(GeoEditConfig, {"fusion": "importance"}, method="geoedit")
    assert variant_label(full) == "GeoEdit_FT (paper method: importance fusion, rank-normalised α/β)"
    assert "min-max α/β as the paper" in variant_label({**full.to_dict(), "importance_norm": "minmax"})
    assert variant_label(make_config(GeoEditConfig, {}, method="geoedit")) == variant_label(full)  # the default
    mw = make_config(GeoEditMWConfig, {}, method="geoedit-mw")  # the deviation has its own name
    assert mw.fusion == "fixed" and "+MW" in variant_label(mw) and "paper method" not in variant_label(mw)
    abl = variant_label({**full.to_dict(), "orthogonal": False, "mode": "lora"})
    assert abl.startswith("GeoEdit_LoRA") and "- Orthogonal" in abl and "paper method" not in abl
    assert "mlp-relu" in variant_label({**full.to_dict(), "ae": "mlp-relu"})
