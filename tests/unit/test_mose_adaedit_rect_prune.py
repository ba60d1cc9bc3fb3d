"""Own invariants of MOSE, AdaEdit, RECT and PRUNE, on constructed matrices and tiny random models.

* MOSE: the Procrustes solve recovers a known rotation, R is orthogonal, and 50 sequential rotations (applied in fp32
  exactly as :func:`editors.base.apply_result` does) keep the Frobenius norm and the condition number of the edited
  matrix to 1e-4 relative -- on a constructed matrix and on a tiny model's MLP output projection through the
  editor's own layer loop; Eq. 22's layer selection and neighbour clipping.
* AdaEdit: SRFusion's sparsified singular vectors have exactly k non-zeros and their original norms; the fused update
  is rank <= r with the implied row/column support; the DR and top-k% strategies keep the configured amount.
* RECT: the delta keeps exactly the configured fraction of entries, the ones of largest |ΔW / W|.
* PRUNE: no singular value of the accumulated ΔW = W - W0 exceeds the restrained bound, also over sequential edits.
"""
from __future__ import annotations

import math

import pytest
import torch

from editors.adaedit import (
    AdaEditConfig,
    AdaEditEditor,
    hard_threshold,
    random_drop,
    resolve_k,
    sr_factors,
    sr_fusion,
    topk_magnitude,
)
from editors.base import EditResult, apply_result, make_config
from editors.mose import MOSEConfig, MOSEEditor, edit_layers_around, layer_score, procrustes_rotation, spectral
from editors.prune import PRUNEConfig, PRUNEEditor, restrain, restrain_values, restrained_bound
from editors.rect import RECTConfig, RECTEditor, rect_delta, rect_mask
from editors.requests import make_request
from editors.testing import tiny_model

REQ = make_request(source="test", record=0, case_id="eiffel", prompt="The Eiffel Tower is located in the city of",
                   subject="The Eiffel Tower", target_new="Rome", target_true="Paris")
REQ2 = make_request(source="test", record=1, case_id="darrieux", prompt="The mother tongue of Danielle Darrieux is",
                    subject="Danielle Darrieux", target_new="English", target_true="French")


def _orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    Q, Rr = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(Rr))  # a uniformly random orthogonal matrix


def _matrix_with_spectrum(d_out: int, d_in: int, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    U = _orthogonal(d_out, gen)[:, :len(s)]
    V = _orthogonal(d_in, gen)[:, :len(s)]
    return (U * s) @ V.T


def _fro_cond(W: torch.Tensor) -> tuple[float, float]:
    s = torch.linalg.svdvals(W.double())
    return float(W.double().norm()), float(s[0] / s[-1])


# =================================================================================================================
# MOSE
# =================================================================================================================
def test_procrustes_recovers_a_known_rotation():
    gen = torch.Generator().manual_seed(0)
    d, d_ff, n = 12, 30, 40  # n >= d: B Aᵀ determines the rotation
    W = torch.randn(d, d_ff, generator=gen, dtype=torch.float64)
    K = torch.randn(d_ff, n, generator=gen, dtype=torch.float64)
    Q = _orthogonal(d, gen)
    R, info = procrustes_rotation(W, torch.zeros(d_ff, d_ff, dtype=torch.float64), K, Q @ W @ K, lam=0.0)
    assert torch.allclose(R, Q, atol=1e-10)
    assert info["fit_after"] < 1e-10 and info["orth_error"] < 1e-12
    # with a preservation term, R is still the exact minimiser of Eq. 18: no other orthogonal matrix does better
    C = torch.randn(d_ff, d_ff, generator=gen, dtype=torch.float64)
    C = C @ C.T / d_ff
    lam = 3.0
    R2, _ = procrustes_rotation(W, C, K[:, :2], (Q @ W @ K)[:, :2], lam=lam)
    L = torch.linalg.cholesky(C)
    A = torch.cat([math.sqrt(lam) * W @ L, W @ K[:, :2]], 1)
    B = torch.cat([math.sqrt(lam) * W @ L, (Q @ W @ K)[:, :2]], 1)
    best = float((R2 @ A - B).norm())
    for _ in range(20):
        P = R2 @ torch.linalg.matrix_exp(0.01 * (lambda S: S - S.T)(torch.randn(d, d, generator=gen,
                                                                                dtype=torch.float64)))
        assert float((P @ A - B).norm()) >= best - 1e-9


def test_rotation_is_orthogonal_and_identity_for_huge_lambda():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(16, 40, generator=gen, dtype=torch.float64)
    C = torch.eye(40, dtype=torch.float64)
    K = torch.randn(40, 1, generator=gen, dtype=torch.float64)
    V = W @ K + torch.randn(16, 1, generator=gen, dtype=torch.float64)
    R, info = procrustes_rotation(W, C, K, V, lam=1.0)
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.allclose(R.T @ R, eye, atol=1e-12) and torch.allclose(R @ R.T, eye, atol=1e-12)
    assert info["fit_after"] < 1.0  # the edit moved W k toward V
    R_big, info_big = procrustes_rotation(W, C, K, V, lam=1e12)
    assert torch.allclose(R_big, eye, atol=1e-6) and info_big["r_minus_i"] < 1e-6


def test_fifty_sequential_rotations_keep_norm_and_condition_number():
    """W <- R W fifty times in fp32 (as apply_result does): ||W||_F and cond(W) unchanged to 1e-4 relative."""
    gen = torch.Generator().manual_seed(2)
    d, d_ff = 48, 96
    W = _matrix_with_spectrum(d, d_ff, torch.linspace(3.0, 0.5, d, dtype=torch.float64), gen).float()
    C = torch.eye(d_ff, dtype=torch.float64) * 0.1
    fro0, cond0 = _fro_cond(W)
    moved = 0.0
    for _ in range(50):
        K = torch.randn(d_ff, 1, generator=gen, dtype=torch.float64)
        V = W.double() @ K + 0.5 * torch.randn(d, 1, generator=gen, dtype=torch.float64)
        R, info = procrustes_rotation(W.double(), C, K, V, lam=10.0)
        moved += info["r_minus_i"]
        W = R.float() @ W
    fro, cond = _fro_cond(W)
    assert moved > 1.0  # the rotations were not trivial
    assert abs(fro - fro0) / fro0 < 1e-4
    assert abs(cond - cond0) / cond0 < 1e-4


def test_editor_layer_loop_keeps_norm_and_condition_of_tiny_model_over_50_edits():
    """The editor's own rotation loop (keys, residual spread, Procrustes) on a tiny model, 50 small sequential
    edits applied with apply_result: every edited matrix keeps its Frobenius norm and condition number."""
    lm = tiny_model("llama", seed=3)
    cfg = make_config(MOSEConfig, {"layer_selection": "fixed", "layers": (1, 2), "mom2_n_tokens": 2000, "lam": 1.0})
    ed = MOSEEditor(lm, cfg, seed=0)
    ed.prepare()
    spec = lm.spec
    names = [spec.mlp_out_weight(i) for i in (1, 2)]
    params = dict(lm.model.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    start = {n: _fro_cond(spec.to_canonical(before[n])) for n in names}
    gen = torch.Generator().manual_seed(4)
    try:
        for step in range(50):
            delta = 0.05 * torch.randn(1, spec.hidden_size, generator=gen)  # a small residual-stream target change
            factors, per_layer = ed._rotate([REQ if step % 2 else REQ2], (1, 2), delta)
            assert set(factors) == set(names)
            for R in factors.values():
                assert torch.allclose(R.double().T @ R.double(), torch.eye(R.shape[0], dtype=torch.float64),
                                      atol=1e-5)
            apply_result(lm, EditResult(method="mose", factors=factors))
        for n in names:
            W = spec.to_canonical(params[n].detach())
            fro, cond = _fro_cond(W)
            fro0, cond0 = start[n]
            assert not torch.equal(params[n], before[n])
            assert abs(fro - fro0) / fro0 < 1e-4, n
            assert abs(cond - cond0) / cond0 < 1e-4, n
    finally:
        with torch.no_grad():
            for n in names:
                params[n].copy_(before[n])


def test_layer_score_and_neighbours():
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(8, 20, generator=gen, dtype=torch.float64)
    K = torch.randn(20, 1, generator=gen, dtype=torch.float64)
    assert layer_score(W, K, W @ K) == 0.0
    V = W @ K + 1.0
    expected = float((V - W @ K).norm()) / (float(torch.linalg.matrix_norm(W, 2)) * float(K.norm()))
    assert layer_score(W, K, V) == pytest.approx(expected, rel=1e-10)
    assert spectral(W) == pytest.approx(float(torch.linalg.matrix_norm(W, 2)), rel=1e-10)
    assert edit_layers_around(5, 1, 30) == (4, 5, 6)
    assert edit_layers_around(0, 1, 30) == (0, 1)
    assert edit_layers_around(29, 1, 30) == (28, 29)
    assert edit_layers_around(7, 0, 30) == (7,)


def test_mose_scored_edit_on_tiny_model_picks_argmin_and_neighbours():
    lm = tiny_model("llama", seed=6)
    cfg = make_config(MOSEConfig, {"candidate_layers": (1, 2), "mom2_n_tokens": 2000, "v_num_grad_steps": 2})
    res = MOSEEditor(lm, cfg, seed=0).edit([REQ])
    info = res.info
    scores = {int(k): v for k, v in info["scores"].items()}
    assert info["l_star"] == min(scores, key=scores.get)
    assert info["edit_layers"] == list(edit_layers_around(info["l_star"], 1, 4))
    assert sorted(res.factors) == sorted(lm.spec.mlp_out_weight(i) for i in info["edit_layers"])
    assert not res.deltas and info["max_orth_error"] < 1e-4
    # the time split the bench reports: target optimisation (candidates included) + rotations, within the edit
    assert info["seconds_z"] > 0 and info["seconds_layers"] > 0
    assert info["seconds_z"] + info["seconds_layers"] <= res.seconds


# =================================================================================================================
# AdaEdit
# =================================================================================================================
def test_resolve_k_counts_and_fractions():
    assert resolve_k(0.5, 10) == 5 and resolve_k(0.45, 576) == math.ceil(0.45 * 576)
    assert resolve_k(7, 100) == 7 and resolve_k(500, 100) == 100 and resolve_k(1e-9, 100) == 1
    with pytest.raises(ValueError):
        resolve_k(0, 10)


@pytest.mark.parametrize("k", [0.3, 5])
def test_sr_fusion_vectors_have_exactly_k_nonzeros_and_original_norms(k):
    gen = torch.Generator().manual_seed(7)
    m, n, rank = 40, 90, 3
    delta = torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, n, generator=gen,
                                                                                  dtype=torch.float64)
    f = sr_factors(delta, r=2, k=k)
    assert f.U.shape == (m, 2) and f.V.shape == (n, 2)
    assert f.k_u == resolve_k(k, m) and f.k_v == resolve_k(k, n)
    assert ((f.U != 0).sum(0) == f.k_u).all() and ((f.V != 0).sum(0) == f.k_v).all()
    assert torch.allclose(f.U.norm(dim=0), torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(f.V.norm(dim=0), torch.ones(2, dtype=torch.float64), atol=1e-12)
    # the kept entries are the largest |u_i|: every zeroed entry is no larger than every kept one
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    for i in range(2):
        kept = f.U[:, i] != 0
        assert U[kept, i].abs().min() >= U[~kept, i].abs().max() - 1e-12
        assert torch.allclose(S[:2], f.S)
    fused = sr_fusion(delta, r=2, k=k)
    assert torch.allclose(fused, (f.U * f.S) @ f.V.T)
    assert torch.linalg.matrix_rank(fused).item() <= 2
    assert int((fused.abs().sum(1) != 0).sum()) <= 2 * f.k_u and int((fused.abs().sum(0) != 0).sum()) <= 2 * f.k_v


def test_sr_fusion_without_thresholding_is_the_truncated_svd():
    gen = torch.Generator().manual_seed(8)
    delta = torch.randn(20, 30, generator=gen, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    assert torch.allclose(sr_fusion(delta, r=3, k=1000), (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-12)
    # numerically zero singular values are not kept (a rank-1 delta gives one triple whatever r is)
    one = torch.outer(torch.randn(20, generator=gen, dtype=torch.float64), torch.randn(30, generator=gen,
                                                                                        dtype=torch.float64))
    assert sr_factors(one, r=4, k=0.5).S.numel() == 1


def test_hard_threshold_dr_and_topk():
    x = torch.tensor([[0.1, -3.0, 2.0, 0.5], [1.0, 1.0, -1.0, 0.0]])
    assert torch.equal(hard_threshold(x, 2), torch.tensor([[0.0, -3.0, 2.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))
    gen = torch.Generator().manual_seed(9)
    d = torch.randn(200, 300, generator=gen)
    kept = topk_magnitude(d, 0.2)
    assert int((kept != 0).sum()) == round(0.2 * d.numel())
    assert kept[kept != 0].abs().min() >= d[kept == 0].abs().max()
    dr = random_drop(d, 0.2, torch.Generator().manual_seed(0))
    assert abs(float((dr != 0).double().mean()) - 0.2) < 0.01
    assert torch.equal(dr[dr != 0], d[dr != 0])
    dr2 = random_drop(d, 0.2, torch.Generator().manual_seed(0), rescale=True)
    assert torch.allclose(dr2, dr / 0.2)


def test_adaedit_editor_deltas_are_srfusion_sparse():
    lm = tiny_model("llama", seed=10)
    cfg = make_config(AdaEditConfig, {"layers": (1, 2), "mom2_n_tokens": 2000, "v_num_grad_steps": 2, "r": 1,
                                      "k": 0.25})
    res = AdaEditEditor(lm, cfg, seed=0).edit([REQ])
    spec = lm.spec
    k_u, k_v = resolve_k(0.25, spec.hidden_size), resolve_k(0.25, spec.mlp_size)
    assert sorted(res.deltas) == sorted(spec.mlp_out_weight(i) for i in (1, 2))
    for name, d in res.deltas.items():
        D = spec.to_canonical(d).double()
        assert torch.linalg.matrix_rank(D, rtol=1e-5).item() == 1  # rank one up to fp32 rounding
        assert int((D.abs().sum(1) != 0).sum()) == k_u and int((D.abs().sum(0) != 0).sum()) == k_v
        layer = str(spec.layer_of(name))
        assert res.info["layers"][layer]["density"] == pytest.approx(k_u * k_v / D.numel())
    for strategy in ("topk_magnitude", "random_drop", "none"):
        cfg2 = make_config(AdaEditConfig, {"layers": (1,), "mom2_n_tokens": 2000, "v_num_grad_steps": 2,
                                           "sparsify": strategy, "keep_fraction": 0.3})
        res2 = AdaEditEditor(lm, cfg2, seed=0).edit([REQ])
        (d,) = res2.deltas.values()
        density = float((d != 0).double().mean())
        if strategy == "none":
            assert density > 0.9
        elif strategy == "topk_magnitude":
            assert int((d != 0).sum()) == round(0.3 * d.numel())
        else:
            assert abs(density - 0.3) < 0.03


# =================================================================================================================
# RECT
# =================================================================================================================
def test_rect_keeps_exactly_the_configured_fraction_by_relative_change():
    gen = torch.Generator().manual_seed(11)
    W = torch.randn(64, 128, generator=gen)
    D = 0.01 * torch.randn(64, 128, generator=gen)
    for frac in (0.2, 0.4, 1.0):
        out = rect_delta(D, W, frac)
        assert int((out != 0).sum()) == round(frac * D.numel())
        kept = out != 0
        rel = D.abs() / (W.abs() + 1e-8)
        if frac < 1:
            assert rel[kept].min() >= rel[~kept].max()
        assert torch.equal(out[kept], D[kept])
    # a zero weight entry gets the largest relative change (eps keeps it finite)
    W0 = W.clone()
    W0[3, 5] = 0.0
    assert rect_mask(D, W0, 0.001)[3, 5]


def test_rect_editor_on_memit_base_has_configured_density():
    lm = tiny_model("llama", seed=12)
    base = {"layers": (1, 2), "mom2_n_tokens": 2000, "v_num_grad_steps": 2}
    cfg = make_config(RECTConfig, {"base": "memit", "base_overrides": base, "keep_fraction": 0.25})
    res = RECTEditor(lm, cfg, seed=0).edit([REQ])
    assert sorted(res.deltas) == sorted(lm.spec.mlp_out_weight(i) for i in (1, 2))
    for name, d in res.deltas.items():
        assert int((d != 0).sum()) == round(0.25 * d.numel())
        assert res.info["params"][name]["density"] == pytest.approx(0.25, abs=1e-6)
    assert "layers" in res.info["base"]
    # the base's fields can be given as a JSON string (the CLI's --set)
    cfg2 = make_config(RECTConfig, {"base": "memit", "base_overrides": '{"layers": [1], "mom2_n_tokens": 2000}'})
    assert cfg2.base_overrides == {"layers": [1], "mom2_n_tokens": 2000}


# =================================================================================================================
# PRUNE
# =================================================================================================================
def test_restrain_values_functions():
    S = torch.tensor([50.0, 10.0, 3.0, 0.5], dtype=torch.float64)
    out = restrain_values(S, 5.0, "log", 1.2)
    assert out[0] == pytest.approx(math.log(50) / math.log(1.2) + 5 - math.log(5) / math.log(1.2))
    assert torch.equal(out[2:], S[2:])  # below σ_max: unchanged
    assert torch.all(out <= S)
    lin = restrain_values(S, 5.0, "linear")
    assert lin[0] == pytest.approx(27.5) and lin[1] == pytest.approx(7.5)
    ln = restrain_values(S, 5.0, "ln")
    assert ln[0] == pytest.approx(math.log(50) + 5 - math.log(5))
    # a log restraint with a small σ_max would raise values just above it: never allowed
    assert torch.all(restrain_values(torch.tensor([1.1, 1.0], dtype=torch.float64), 1.0, "log", 1.2)
                     <= torch.tensor([1.1, 1.0], dtype=torch.float64))


def test_restrain_bounds_every_singular_value():
    gen = torch.Generator().manual_seed(13)
    A = _matrix_with_spectrum(30, 60, torch.tensor([40.0, 20.0, 8.0, 2.0, 0.1], dtype=torch.float64), gen)
    out, info = restrain(A, 5.0, "log", 1.2)
    s = torch.linalg.svdvals(out)
    bound = restrained_bound(40.0, 5.0, "log", 1.2)
    assert info["n_restrained"] == 3 and float(s[0]) <= bound + 1e-9
    assert torch.allclose(s[:5], restrain_values(torch.tensor([40.0, 20.0, 8.0, 2.0, 0.1], dtype=torch.float64),
                                                 5.0), atol=1e-9)
    same, info2 = restrain(A, 100.0)
    assert info2["n_restrained"] == 0 and torch.equal(same, A)


def test_restrain_skips_the_full_svd_only_when_the_frobenius_bound_excludes_any_restraint(monkeypatch):
    """σ_1 <= ‖A‖_F: below σ_max nothing is restrained and the singular vectors are never computed; at or above
    it the full SVD runs, even when σ_1 itself is below σ_max (the bound is not tight)."""
    gen = torch.Generator().manual_seed(5)
    A = _matrix_with_spectrum(20, 40, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), gen)  # ‖A‖_F = √14
    fro = float(torch.linalg.vector_norm(A))
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    out, info = restrain(A, fro + 1e-6)
    assert calls == [] and torch.equal(out, A)
    assert info == {"n_restrained": 0, "sigma_1_before": pytest.approx(3.0), "sigma_1_after": pytest.approx(3.0)}
    out2, info2 = restrain(A, fro - 1e-6)  # σ_1 = 3 < σ_max: nothing restrained, but the bound cannot say so
    assert calls == [1] and torch.equal(out2, A) and info2["n_restrained"] == 0
    assert info2["sigma_1_before"] == pytest.approx(info["sigma_1_before"], rel=1e-12)
    out3, info3 = restrain(A, 2.5, "linear")  # σ_1 = 3 >= 2.5: restrained to 2.75 (not swallowed)
    assert info3["n_restrained"] == 1 and float(torch.linalg.svdvals(out3)[0]) < 3.0


def test_prune_editor_restrains_the_accumulated_edit_over_sequential_edits():
    lm = tiny_model("llama", seed=14)
    base = {"layers": (1,), "mom2_n_tokens": 2000, "v_num_grad_steps": 3}
    # "linear": a tiny model's update is too small for the log restraint to bite (log_b(σ/σ_max) > σ for σ < ~5)
    ed = PRUNEEditor(lm, make_config(PRUNEConfig, {"base": "memit", "base_overrides": base,
                                                   "restraint": "linear"}), seed=0)
    ed.prepare()
    spec = lm.spec
    name = spec.mlp_out_weight(1)
    params = dict(lm.model.named_parameters())
    W0 = params[name].detach().clone()
    # a tiny model's edits never reach σ_max(W0); pretend σ_max is small so that the restraint is active
    ed.W0[name] = W0.clone()
    ed.sigma_max[name] = 1e-3
    try:
        for step, req in enumerate([REQ, REQ2, REQ]):
            res = ed.edit([req])
            info = res.info["params"][name]
            assert info["n_restrained"] >= 1
            bound = restrained_bound(info["sigma_1_before"], 1e-3, "linear")
            apply_result(lm, res)
            ed.after_apply([req], res)
            s = torch.linalg.svdvals((params[name].detach() - W0).double())
            assert float(s[0]) <= bound + 1e-5, (step, float(s[0]), bound)
            assert float(s[0]) == pytest.approx(info["sigma_1_after"], rel=1e-3, abs=1e-5)
    finally:
        with torch.no_grad():
            params[name].copy_(W0)


def test_prune_editor_returns_base_delta_when_nothing_exceeds_sigma_max():
    lm = tiny_model("llama", seed=15)
    base = {"layers": (1,), "mom2_n_tokens": 2000, "v_num_grad_steps": 2}
    ed = PRUNEEditor(lm, make_config(PRUNEConfig, {"base": "memit", "base_overrides": base}), seed=0)
    res = ed.edit([REQ])
    name = lm.spec.mlp_out_weight(1)
    assert res.info["params"][name]["n_restrained"] == 0
    plain = ed.base.edit([REQ])
    assert torch.equal(res.deltas[name], plain.deltas[name])
