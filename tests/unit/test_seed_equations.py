"""AdaEdit's and MOSE's equations as the editors use them, each test failing on the wrong variants it names
(issue 14): the residual measurement point of AdaEdit's layer loop, the PMET spread, SRFusion's steps, MOSE's
Procrustes objective (Eq. 17-20) against a brute-force check, Eq. 22's score and the shared-target selection.
Fast (tiny models, small tensors): the first pass of ``scripts/mutation.sh adaedit|mose``."""
from __future__ import annotations

import math

import pytest
import torch

from editors.adaedit import AdaEditConfig, AdaEditEditor, hard_threshold, resolve_k, sr_factors, sr_fusion
from editors.base import make_config
from editors.keys import compute_keys, current_values
from editors.multilayer import multilayer_update, spread_residual
from editors.requests import make_request

REQ = make_request(source="test", record=0, case_id="eiffel", prompt="The Eiffel Tower is located in the city of",
                   subject="The Eiffel Tower", target_new="Rome", target_true="Paris")
REQ2 = make_request(source="test", record=1, case_id="darrieux", prompt="The mother tongue of Danielle Darrieux is",
                    subject="Danielle Darrieux", target_new="English", target_true="French")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# =================================================================================================================
# the layer loop's residual: where it is measured (AdaEdit residual_site) and how it is spread
# =================================================================================================================
@pytest.mark.parametrize("residual_site", ["mlp_out", "residual"])
def test_layer_loop_residual_is_measured_where_configured(tiny_llama, residual_site):
    """R_i = spread(Z' - current_{site'}(L) on the model with layers < i edited) with Z' = Z (same site) or
    h_L(before) + (Z - v_init) (carried to the stream). A recording solve returns fixed updates; the expected R_i is
    recomputed by hand on the model with those updates applied. Fails on: measuring at the other site, carrying δ
    with the wrong sign or without v_init, the linear spread instead of sqrt, not applying lower layers' updates."""
    lm = tiny_llama
    layers = (1, 2, 3)
    reqs = [REQ, REQ2]
    L = layers[-1]
    v_init = current_values(lm, L, reqs, site="mlp_out")
    Z = v_init + _rand(2, v_init.shape[1], seed=1).float() * 0.5
    fixed = {layer: _rand(lm.spec.hidden_size, lm.spec.mlp_size, seed=10 + layer).float() * 1e-2 for layer in layers}
    seen = {}

    def solve(K, R, state):
        seen[state.layer] = R.clone()
        return fixed[state.layer].to(R.dtype)

    multilayer_update(lm, reqs, layers, solve, site="mlp_out", spread="sqrt", Z=Z, residual_site=residual_site)
    params = dict(lm.model.named_parameters())
    target = Z if residual_site == "mlp_out" else current_values(lm, L, reqs, site="residual") + (Z - v_init)
    saved = {layer: params[lm.spec.mlp_out_weight(layer)].detach().clone() for layer in layers}
    try:
        for i, layer in enumerate(layers):
            cur = current_values(lm, L, reqs, site=residual_site)
            expect = (target - cur).T.double() / math.sqrt(len(layers) - i)
            assert torch.allclose(seen[layer], expect, rtol=1e-4, atol=1e-5), (layer, residual_site)
            with torch.no_grad():
                p = params[lm.spec.mlp_out_weight(layer)]
                p.add_(lm.spec.to_param_layout(fixed[layer]))
    finally:
        with torch.no_grad():
            for layer in layers:
                params[lm.spec.mlp_out_weight(layer)].copy_(saved[layer])


def test_spread_residual_linear_and_sqrt():
    R = _rand(4, 3, seed=2)
    assert torch.allclose(spread_residual(R, 1, 5, "linear"), R / 4)
    assert torch.allclose(spread_residual(R, 1, 5, "sqrt"), R / 2)
    assert torch.allclose(spread_residual(R, 4, 5, "sqrt"), R)
    with pytest.raises(ValueError):
        spread_residual(R, 5, 5)


def test_adaedit_residual_site_reaches_the_layer_loop(tiny_llama):
    """The config field is what the editor hands to multilayer_update (info records it) and changes the update."""
    over = {"layers": (1, 2), "mom2_n_tokens": 2000, "v_num_grad_steps": 2}
    out = {}
    for site in ("mlp_out", "residual"):
        ed = AdaEditEditor(tiny_llama, make_config(AdaEditConfig, {**over, "residual_site": site}, method="adaedit"))
        res = ed.edit([REQ])
        assert res.info["residual_site"] == site and res.info["site"] == "mlp_out"
        out[site] = res
    name = tiny_llama.spec.mlp_out_weight(2)
    assert not torch.allclose(out["mlp_out"].deltas[name], out["residual"].deltas[name])
    with pytest.raises(Exception, match="residual_site"):
        make_config(AdaEditConfig, {"residual_site": "stream"}, method="adaedit")


# =================================================================================================================
# SRFusion (adaedit.txt Eq. 2-4) against a hand-written version
# =================================================================================================================
def _manual_sr(delta, r, k):
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    out = torch.zeros_like(delta, dtype=torch.float64)
    for i in range(r):
        u, v = U[:, i], Vh[i]
        ku, kv = resolve_k(k, len(u)), resolve_k(k, len(v))
        us = torch.zeros_like(u)
        iu = torch.argsort(u.abs(), descending=True)[:ku]
        us[iu] = u[iu]
        vs = torch.zeros_like(v)
        iv = torch.argsort(v.abs(), descending=True)[:kv]
        vs[iv] = v[iv]
        us = us * u.norm() / us.norm()
        vs = vs * v.norm() / vs.norm()
        out += S[i] * torch.outer(us, vs)
    return out


@pytest.mark.parametrize("r,k", [(1, 3), (2, 0.5), (3, 4)])
def test_sr_fusion_matches_the_steps_written_out(r, k):
    """Fails on: thresholding by value instead of |value|, no renormalisation, renormalising to 1 / to the
    sparse norm, keeping k-1 entries, dropping σ_i, using the r smallest triples."""
    A = _rand(7, 3, seed=3) @ _rand(3, 9, seed=4)  # rank 3
    got = sr_fusion(A, r, k)
    assert torch.allclose(got.double(), _manual_sr(A, r, k), atol=1e-10)
    f = sr_factors(A, r, k)
    assert (f.U != 0).sum(0).tolist() == [resolve_k(k, 7)] * r
    assert (f.V != 0).sum(0).tolist() == [resolve_k(k, 9)] * r
    assert (f.k_u, f.k_v) == (resolve_k(k, 7), resolve_k(k, 9)) and f.S.shape == (r,)


def test_hard_threshold_keeps_largest_magnitudes():
    x = torch.tensor([[0.1, -3.0, 2.0, -0.5]])
    assert hard_threshold(x, 2).tolist() == [[0.0, -3.0, 2.0, 0.0]]
    assert resolve_k(0.45, 10) == 5 and resolve_k(3, 10) == 3 and resolve_k(50, 10) == 10
    assert resolve_k(1, 10) == 1 and resolve_k(1.6, 10) == 2  # k >= 1 is a count (1 is one entry, not all)
    v = torch.tensor([0.5, -2.0, 1.0, 0.1])  # a 1-D vector (the last dimension is the only one)
    assert hard_threshold(v, 2).tolist() == [0.0, -2.0, 1.0, 0.0]
    A = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    assert sr_fusion(A, 2, 3).dtype == torch.float32  # in the input's dtype


def test_compute_keys_is_what_the_loop_used(tiny_llama):
    """The loop's keys are compute_keys' (template-averaged) keys on the partly edited model (position 0: the
    unedited one)."""
    out = multilayer_update(tiny_llama, [REQ], (1, 2), lambda K, R, s: torch.zeros(
        tiny_llama.spec.hidden_size, tiny_llama.spec.mlp_size, dtype=R.dtype),
        site="mlp_out", Z=current_values(tiny_llama, 2, [REQ], site="mlp_out"))
    assert torch.allclose(out.keys[1], compute_keys(tiny_llama, 1, [REQ], [["{}"]]).T, atol=1e-6)


# =================================================================================================================
# MOSE: Procrustes (Eq. 17-20), Eq. 22, the target options
# =================================================================================================================
def test_procrustes_minimises_eq17_against_perturbed_rotations():
    """R = UVᵀ of M = λ W C Wᵀ + V (W K)ᵀ minimises λ‖RWK0 − WK0‖² + ‖RWK − V‖² over O(d): no random nearby
    rotation does better, and the objective from C equals the one from explicit K0. Fails on: M = A Bᵀ (transposed:
    R ↦ Rᵀ), M without λ or with √λ, R = V Uᵀ, C0 instead of W C0 Wᵀ, the edit term's K missing."""
    from editors.mose import procrustes_rotation
    d, p, n0, n = 5, 8, 30, 2
    W, K0, K, V = _rand(d, p, seed=5), _rand(p, n0, seed=6), _rand(p, n, seed=7), _rand(d, n, seed=8) * 3
    C = K0 @ K0.T
    for lam in (0.0, 0.05, 2.0):
        R, info = procrustes_rotation(W, C, K, V, lam)

        def objective(Q):
            return lam * ((Q @ W @ K0 - W @ K0) ** 2).sum() + ((Q @ W @ K - V) ** 2).sum()

        best = objective(R)
        gen = torch.Generator().manual_seed(9)
        for _ in range(200):
            X = torch.randn(d, d, generator=gen, dtype=torch.float64) * 0.05
            Q = torch.linalg.matrix_exp(X - X.T) @ R  # a nearby rotation (same component of O(d))
            assert objective(Q) >= best - 1e-9
        assert info["orth_error"] < 1e-10
        fit = float((R @ W @ K - V).norm() / (W @ K - V).norm())
        assert abs(info["fit_after"] - fit) < 1e-12
        change = math.sqrt(float(((R - torch.eye(d, dtype=torch.float64)) @ W @ K0).pow(2).sum())
                           / float((W @ K0).pow(2).sum()))
        assert abs(info["preserve_change"] - change) < 1e-10


def test_layer_score_is_eq22_with_the_activation_norm():
    from editors.mose import layer_score
    W, K, V = _rand(4, 6, seed=11), _rand(6, 2, seed=12), _rand(4, 2, seed=13)
    expect = float((V - W @ K).norm()) / (float(torch.linalg.matrix_norm(W, 2)) * float(K.norm()))
    assert abs(layer_score(W, K, V) - expect) < 1e-12  # fails on ‖W‖_F, no K norm, ‖V‖ alone
    # a given spectral norm is used as given; a small denominator is no reason for inf; a zero one is
    assert abs(layer_score(W, K, V, spectral_norm=2.0) - float((V - W @ K).norm()) / (2.0 * float(K.norm()))) < 1e-12
    small = layer_score(W * 1e-2, K * 1e-2, V)
    assert math.isfinite(small) and abs(small - float((V - 1e-4 * W @ K).norm()) / (
        1e-4 * float(torch.linalg.matrix_norm(W, 2)) * float(K.norm()))) < 1e-6 * small
    assert layer_score(W, torch.zeros_like(K), V) == math.inf


def _mose(tiny_llama, **over):
    from editors.mose import MOSEConfig, MOSEEditor
    base = {"candidate_layers": (1, 2), "layers": (1, 2), "mom2_n_tokens": 2000, "v_num_grad_steps": 2}
    return MOSEEditor(tiny_llama, make_config(MOSEConfig, {**base, **over}, method="mose"))


def test_mose_shared_target_makes_one_optimisation_and_scores_the_same_delta(tiny_llama):
    """selection_target='shared': one target (at the highest selectable layer), Eq. 22 with V = WK + δ for every
    candidate (so the numerator is ‖δ‖ everywhere), l* its argmin. 'per_layer' optimises one per candidate (+ top)."""
    from editors.mose import layer_score, spectral
    res = _mose(tiny_llama, selection_target="shared", neighbours=1).edit([REQ])
    info = res.info
    assert info["n_target_optimisations"] == 1 and info["target_layer"] == 3  # max over {0..3}
    ed = _mose(tiny_llama, selection_target="shared", neighbours=1)
    ed.prepare()
    Z, init, _ = ed._targets([REQ], 3)
    delta = (Z - init).T.double()
    params = dict(tiny_llama.model.named_parameters())
    for layer in (1, 2):
        K = compute_keys(tiny_llama, layer, [REQ], ed.templates).T.double()
        W = tiny_llama.spec.to_canonical(params[tiny_llama.spec.mlp_out_weight(layer)].detach()).double()
        expect = float(delta.norm()) / (spectral(W) * float(K.norm()))
        assert abs(info["scores"][str(layer)] - expect) < 1e-4 * expect
        assert abs(layer_score(W, K, W @ K + delta) - expect) < 1e-9 * expect
    assert info["l_star"] == min((1, 2), key=lambda x: (info["scores"][str(x)], x))
    per = _mose(tiny_llama, neighbours=1).edit([REQ]).info
    assert per["n_target_optimisations"] == 3  # candidates 1, 2 and the top edit layer 3 (l*=2) or 2 (l*=1)


def test_mose_residual_target_is_optimised_on_the_stream(tiny_llama):
    """target_site='residual' optimises z at the top edit layer's OUTPUT: the first layer's residual is z - h_L."""
    res = _mose(tiny_llama, layer_selection="fixed", layers=(1, 2), target_site="residual", lam=1.0).edit([REQ])
    assert res.info["target_site"] == "residual" and res.info["target_layer"] == 2
    ed = _mose(tiny_llama, layer_selection="fixed", layers=(1, 2), target_site="mlp_out", lam=1.0)
    other = ed.edit([REQ])
    name = tiny_llama.spec.mlp_out_weight(2)
    assert not torch.allclose(res.factors[name], other.factors[name])
    with pytest.raises(Exception, match="target_site"):
        _mose(tiny_llama, target_site="attn")


def test_procrustes_diagnostics_known_angle_scale_and_degenerate_cases():
    """The info of procrustes_rotation: rotation_deg of a known plane rotation, det, fit_before, and the guards:
    nothing to write (V = WK) gives fit_after 0, no preserved keys (C = 0) gives preserve_change 0, and a problem
    scaled down (fit_before < 1, tr(WCWᵀ) < 1) is scored as the unscaled one (fit_after and preserve_change are
    scale-free)."""
    from editors.mose import procrustes_rotation
    d, p = 4, 6
    W, K = _rand(d, p, seed=31), _rand(p, 6, seed=32)  # WK of full row rank: R is unique
    th = 0.7
    Rt = torch.eye(d, dtype=torch.float64)
    Rt[:2, :2] = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64)
    V = Rt @ W @ K
    R, info = procrustes_rotation(W, torch.zeros(p, p, dtype=torch.float64), K, V, 0.0)
    assert abs(info["rotation_deg"] - math.degrees(th)) < 1e-6 and abs(info["det"] - 1.0) < 1e-9
    assert abs(info["fit_before"] - float((W @ K - V).norm())) < 1e-12
    assert info["preserve_change"] == 0.0  # C = 0: nothing preserved to move
    _, same = procrustes_rotation(W, _rand(p, p, seed=33) @ _rand(p, p, seed=33).T, K, W @ K, 1.0)
    assert same["fit_after"] == 0.0 and same["fit_before"] == 0.0
    C = _rand(p, 20, seed=34) @ _rand(p, 20, seed=34).T / 20
    V2 = W @ K + _rand(d, 6, seed=35)
    _, big = procrustes_rotation(W, C, K, V2, 0.5)
    s = 1e-3
    _, small = procrustes_rotation(W * s, C, K, V2 * s, 0.5)  # the same problem in units 1000x smaller
    assert small["fit_before"] < 1 and abs(small["fit_after"] - big["fit_after"]) < 1e-8
    assert abs(small["preserve_change"] - big["preserve_change"]) < 1e-8 and small["preserve_change"] > 0


# ---- AdaEdit: the mutation-testing survivors of 2026-12-02, killed ------------------------------------------------
def test_sr_factors_and_sr_fusion_use_the_svd_they_are_given():
    """svd='exact' is the full SVD even where 'auto' would take the randomised range finder (min(m, n) > 4 q):
    fails if sr_factors / sr_fusion drop their svd argument."""
    from editors.adaedit import top_svd
    D = torch.randn(120, 100, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    f = sr_factors(D, 3, 10_000, svd="exact")  # k >= every length: nothing thresholded, the triples themselves
    assert torch.allclose(f.S, S[:3], rtol=1e-12)
    assert torch.allclose((f.U * f.S) @ f.V.T, (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-10)
    assert torch.allclose(sr_fusion(D, 3, 10_000, svd="exact"), (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-10)
    _, S_auto, _ = top_svd(D, 3, method="auto")  # here 'auto' is randomised and visibly approximate
    assert (S_auto[:3] - S[:3]).abs().max() > 1e-6
    fr = sr_factors(D, 3, 10_000, svd="randomized")  # and sr_fusion passes a non-default svd on
    assert torch.allclose(sr_fusion(D, 3, 10_000, svd="randomized"), (fr.U * fr.S) @ fr.V.T, atol=1e-12)
    assert not torch.allclose(sr_fusion(D, 3, 10_000, svd="randomized"), sr_fusion(D, 3, 10_000), atol=1e-6)


def test_sr_factors_drops_zero_singular_values():
    """A zero Δ keeps no triple (S > tol with tol = 0; fails on S >= tol), a rank-1 Δ keeps one of r = 3."""
    f = sr_factors(torch.zeros(6, 5, dtype=torch.float64), 3, 0.5)
    assert f.S.numel() == 0 and f.U.shape == (6, 0) and f.V.shape == (5, 0)
    u, v = torch.arange(1.0, 7.0, dtype=torch.float64), torch.arange(1.0, 6.0, dtype=torch.float64)
    assert sr_factors(torch.outer(u, v), 3, 10_000).S.numel() == 1
    # an empty Δ (no rows) has no singular value: nothing kept, no IndexError from S[0]
    empty = sr_factors(torch.zeros(0, 5, dtype=torch.float64), 2, 0.5)
    assert empty.S.numel() == 0 and sr_fusion(torch.zeros(0, 5), 2, 0.5).shape == (0, 5)


def test_random_drop_mask_is_the_seeded_float64_draw():
    """DR keeps exactly the entries whose float64 uniform draw (the generator's stream) is below keep_fraction;
    fails on a float32 draw (another stream) or another comparison of the draw."""
    from editors.adaedit import random_drop
    delta = torch.randn(40, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    out = random_drop(delta, 0.3, torch.Generator().manual_seed(11))
    draw = torch.rand(delta.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    assert out.dtype == delta.dtype and torch.equal(out, delta * (draw < 0.3).to(delta.dtype))
    assert torch.equal(random_drop(delta, 0.3, torch.Generator().manual_seed(11), rescale=True),
                       delta * (draw < 0.3).to(delta.dtype) / 0.3)


def test_topk_magnitude_keeps_at_least_one_and_breaks_ties_to_the_lower_index():
    from editors.adaedit import topk_magnitude
    d = torch.tensor([[0.5, -3.0, 2.0], [1.0, 0.1, -0.2]])
    assert torch.equal(topk_magnitude(d, 0.01), torch.tensor([[0.0, -3.0, 0.0], [0.0, 0.0, 0.0]]))  # n = max(1, 0)
    assert torch.equal(topk_magnitude(d, 2 / 6), torch.tensor([[0.0, -3.0, 2.0], [0.0, 0.0, 0.0]]))
    ties = torch.ones(2, 3)
    assert torch.equal(topk_magnitude(ties, 0.5), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
