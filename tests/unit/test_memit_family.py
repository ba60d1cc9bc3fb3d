"""The MEMIT family's closed forms and shared multi-layer machinery (editors/multilayer.py, memit, pmet, emmet,
alphaedit): solves checked on constructed K, R, C; the multi-layer loop and editor state on tiny random models."""
from __future__ import annotations

import math

import pytest
import torch

from editors.alphaedit import AlphaEditEditor, alphaedit_solve, null_space
from editors.base import EditError, apply_result, make_config
from editors.emmet import EMMETEditor, emmet_solve
from editors.keys import compute_keys, current_values
from editors.memit import MEMITEditor, memit_solve
from editors.multilayer import LayerState, check_layers, key_second_moments, multilayer_update, spread_residual
from editors.pmet import PMETEditor
from editors.requests import make_request

D_FF, D = 24, 10


def _spd(d: int, seed: int, eigs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric positive (semi-)definite matrix with eigenvectors Q and eigenvalues ``eigs`` (random if None)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    if eigs is None:
        eigs = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    return Q @ torch.diag(eigs) @ Q.T, Q


def _rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rome_closed_form(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """ROME with mom2 adjustment (METHODS.md 1): ΔW = (v - W k) (C⁻¹k)ᵀ / ((C⁻¹k)ᵀ k)."""
    Cik = torch.linalg.solve(C, k)
    return torch.outer(v - W @ k, Cik) / (Cik @ k)


# ---------------------------------------------------------------------------------------------------------------
# MEMIT
# ---------------------------------------------------------------------------------------------------------------
def test_memit_single_request_single_layer_is_rome_closed_form():
    C, _ = _spd(D_FF, 0)
    W, k, v = _rand(D, D_FF, seed=1), _rand(D_FF, seed=2), _rand(D, seed=3)
    rome = rome_closed_form(W, k, v, C)
    R = (v - W @ k)[:, None]
    # λ -> 0: MEMIT's least squares becomes ROME's exact insertion (the same rank-one direction C⁻¹k)
    tiny = memit_solve(k[:, None], R, C, mom2_update_weight=1e-6)
    assert torch.allclose(tiny, rome, rtol=1e-5, atol=1e-8)
    # any λ: Sherman-Morrison gives ΔW_MEMIT = s / (λ + s) · ΔW_ROME with s = kᵀC⁻¹k
    lam = 3.0
    s = k @ torch.linalg.solve(C, k)
    memit = memit_solve(k[:, None], R, C, mom2_update_weight=lam)
    assert torch.allclose(memit, rome * s / (lam + s), rtol=1e-9, atol=1e-12)
    assert torch.linalg.matrix_rank(memit).item() == 1


def test_memit_seq_adds_previous_keys_to_the_solve():
    C, _ = _spd(D_FF, 4)
    K, R = _rand(D_FF, 3, seed=5), _rand(D, 3, seed=6)
    Kp = _rand(D_FF, 5, seed=7)
    with_prev = memit_solve(K, R, C, mom2_update_weight=2.0, KpKp=Kp @ Kp.T)
    expected = R @ K.T @ torch.linalg.inv(2.0 * C + Kp @ Kp.T + K @ K.T)
    assert torch.allclose(with_prev, expected, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(with_prev, memit_solve(K, R, C, mom2_update_weight=2.0))


# ---------------------------------------------------------------------------------------------------------------
# EMMET
# ---------------------------------------------------------------------------------------------------------------
def test_emmet_meets_the_equality_constraint_for_a_batch():
    C, _ = _spd(D_FF, 8)
    W, K, V = _rand(D, D_FF, seed=9), _rand(D_FF, 5, seed=10), _rand(D, 5, seed=11)
    info: dict = {}
    dW = emmet_solve(K, V - W @ K, C, mom2_update_weight=7.0, emmet_lambda=0.0, info=info)
    assert torch.allclose((W + dW) @ K, V, rtol=1e-8, atol=1e-8)
    assert info["pseudo_inverse"] is False
    # the ridge on D relaxes the constraint only slightly
    relaxed = emmet_solve(K, V - W @ K, C, mom2_update_weight=7.0, emmet_lambda=1e-3)
    assert ((W + relaxed) @ K - V).norm() / (V - W @ K).norm() < 1e-2
    # and among all exact solutions it is the one with the least C-weighted change (min ||ΔW C^½||)
    other = dW + _rand(D, D_FF, seed=12) @ (torch.eye(D_FF, dtype=torch.float64) - K @ torch.linalg.pinv(K))
    assert torch.allclose((W + other) @ K, V, atol=1e-8)
    assert torch.trace(dW @ C @ dW.T) < torch.trace(other @ C @ other.T)


def test_emmet_single_request_is_rome_and_pinv_fallback():
    C, _ = _spd(D_FF, 13)
    W, k, v = _rand(D, D_FF, seed=14), _rand(D_FF, seed=15), _rand(D, seed=16)
    dW = emmet_solve(k[:, None], (v - W @ k)[:, None], C, mom2_update_weight=1.0, emmet_lambda=0.1)
    assert torch.allclose(dW, rome_closed_form(W, k, v, C), rtol=1e-8, atol=1e-10)
    # a repeated key with emmet_lambda 0 makes D singular: pseudo-inverse, still finite
    K = torch.stack([k, k], dim=1)
    info: dict = {}
    out = emmet_solve(K, _rand(D, 2, seed=17), C, emmet_lambda=0.0, info=info)
    assert torch.isfinite(out).all()
    assert info["pseudo_inverse"] is True or info["cond_D"] > 1e12


# ---------------------------------------------------------------------------------------------------------------
# AlphaEdit
# ---------------------------------------------------------------------------------------------------------------
def _known_null_space(m: int = 6):
    """C with eigenvalues 1..2 on d_ff - m directions and 1e-6 on the remaining m (the known null space)."""
    eigs = torch.cat([torch.linspace(1.0, 2.0, D_FF - m, dtype=torch.float64), torch.full((m,), 1e-6,
                                                                                              dtype=torch.float64)])
    C, Q = _spd(D_FF, 18, eigs)
    return C, Q[:, :D_FF - m], Q[:, D_FF - m:]


def test_null_space_absolute_and_relative_rules_find_the_known_dimension():
    C, _, U_null = _known_null_space(6)
    for rule, thr in (("absolute", 1e-3), ("relative", 1e-3), ("energy", 1e-3)):
        ns = null_space(C, thr, rule, dtype=torch.float64)
        assert ns.dim == 6
        assert torch.allclose(ns.P, U_null @ U_null.T, atol=1e-8)
    # the relative and energy rules are scale-free; the absolute one is not
    assert null_space(1e6 * C, 1e-3, "relative").dim == 6
    assert null_space(1e6 * C, 1e-3, "energy").dim == 6
    # energy: the smallest directions holding at most that share of trace(C)
    ns = null_space(C, 0.1, "energy", dtype=torch.float64)
    s = ns.eigenvalues
    assert s[:ns.dim].sum() <= 0.1 * s.sum() < s[:ns.dim + 1].sum()
    assert null_space(1e6 * C, 1e-3, "absolute").dim == 0


def test_alphaedit_update_is_blind_to_preserved_keys():
    C, U_pres, _ = _known_null_space(6)
    ns = null_space(C, 1e-3, "absolute", dtype=torch.float64)
    K, R = _rand(D_FF, 3, seed=19), _rand(D, 3, seed=20)
    Kp = _rand(D_FF, 4, seed=21)
    dW = alphaedit_solve(K, R, ns.P, alpha=0.5, KpKp=Kp @ Kp.T)
    assert dW.shape == (D, D_FF) and dW.norm() > 1e-3
    k0 = U_pres @ _rand(U_pres.shape[1], 50, seed=22)  # keys in the preserved span
    rel = (dW @ k0).norm(dim=0) / (dW.norm() * k0.norm(dim=0))
    assert rel.max() < 1e-8
    # against the paper's form Δ = R Kᵀ P (K_pK_pᵀP + KKᵀP + αI)⁻¹
    P = ns.P
    paper = R @ K.T @ P @ torch.linalg.inv(Kp @ Kp.T @ P + K @ K.T @ P + 0.5 * torch.eye(D_FF, dtype=torch.float64))
    assert torch.allclose(dW, paper, rtol=1e-6, atol=1e-9)


def test_alphaedit_float32_solve_stays_in_null_space():
    C, U_pres, _ = _known_null_space(6)
    ns = null_space(C, 1e-3, "absolute", dtype=torch.float32)
    dW = alphaedit_solve(_rand(D_FF, 2, seed=23).float(), _rand(D, 2, seed=24).float(), ns.P, alpha=10.0)
    assert ((dW.double() @ U_pres).norm() / dW.double().norm()).item() < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# multi-layer loop and editors on tiny models
# ---------------------------------------------------------------------------------------------------------------
REQS = [
    make_request(source="test", record=0, case_id="eiffel", prompt="The Eiffel Tower is located in the city of",
                 subject="The Eiffel Tower", target_new="Rome", target_true="Paris"),
    make_request(source="test", record=1, case_id="darrieux", prompt="The mother tongue of Danielle Darrieux is",
                 subject="Danielle Darrieux", target_new="English", target_true="French"),
]
TINY = {"layers": (1, 2), "mom2_n_tokens": 2000, "v_num_grad_steps": 2}


def test_check_layers():
    assert check_layers([1, 3]) == (1, 3)
    for bad in ([], [2, 1], [1, 1], [-1]):
        with pytest.raises(ValueError):
            check_layers(bad)
    with pytest.raises(ValueError, match="out of range"):
        check_layers([1, 4], 4)


@pytest.mark.parametrize("spread", ["linear", "sqrt"])
def test_spread_hands_each_layer_its_share(tiny_llama, spread):
    """With a solve that changes nothing, layer i receives (Z - current) / (n - i) ("linear", MEMIT) or
    / sqrt(n - i) ("sqrt", PMET)."""
    lm = tiny_llama
    layers = (0, 1, 3)
    cur = current_values(lm, 3, REQS, site="mlp_out").T
    Z = (cur.T + 1.0).detach()  # residual = 1 everywhere
    seen = {}

    def record(K, R, state: LayerState):
        seen[state.position] = R.clone()
        return torch.zeros_like(state.W, dtype=R.dtype)

    out = multilayer_update(lm, REQS, layers, record, site="mlp_out", spread=spread, Z=Z)
    for i in range(3):
        div = (3 - i) if spread == "linear" else math.sqrt(3 - i)
        assert torch.allclose(seen[i], torch.full_like(seen[i], 1.0 / div), atol=1e-5)
    assert set(out.canonical) == set(layers)
    assert PMETEditor.spread == "sqrt" and PMETEditor.site == "mlp_out"
    assert MEMITEditor.spread == "linear" and MEMITEditor.site == "residual"


def test_multilayer_update_applies_in_call_and_restores_on_error(tiny_llama):
    lm = tiny_llama
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    Z = current_values(lm, 2, REQS).detach() + 0.5
    seen_w = {}

    def solve(K, R, state):
        seen_w[state.layer] = state.W.clone()
        if state.position == 2:
            raise RuntimeError("boom")
        return torch.ones_like(state.W, dtype=R.dtype)

    with pytest.raises(RuntimeError, match="boom"):
        multilayer_update(lm, REQS, (0, 1, 2), solve, Z=Z)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    # the first layer's update was in place while the second layer was solved
    w0 = lm.spec.to_canonical(before[lm.spec.mlp_out_weight(0)])
    assert torch.equal(seen_w[0], w0)

    out = multilayer_update(lm, REQS, (0, 1), lambda K, R, s: torch.full_like(s.W, 1e-3, dtype=R.dtype), Z=Z)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    name = lm.spec.mlp_out_weight(1)
    assert torch.equal(out.deltas[name], lm.spec.to_param_layout(torch.full_like(w0, 1e-3)))
    info = out.info["layers"]["1"]
    assert info["delta_norm"] > 0 and info["rel_delta_norm"] > 0 and "fit_error" in info


def test_bad_solve_shape_is_an_edit_error(tiny_llama):
    Z = current_values(tiny_llama, 1, REQS[:1]).detach()
    with pytest.raises(EditError, match="shape"):
        multilayer_update(tiny_llama, REQS[:1], (1,), lambda K, R, s: R @ K.T[:, :3], Z=Z)


def _editor(cls, lm, **over):
    cfg = make_config(cls.config_cls, {**TINY, **over}, method=cls.name)
    ed = cls(lm, cfg, seed=1)
    ed.prepare()
    return ed


def test_memit_seq_state_lives_on_the_instance(tiny_llama):
    lm = tiny_llama
    a = _editor(MEMITEditor, lm, sequential=True)
    b = _editor(MEMITEditor, lm, sequential=True)
    first_a = a.edit(REQS[:1])
    undo = apply_result(lm, first_a)
    try:
        a.after_apply(REQS[:1], first_a)
    finally:
        undo(lm.model)
    assert set(a.KpKp) == {1, 2} and a.n_accumulated == 1
    assert b.KpKp == {} and b.n_accumulated == 0
    # the accumulated keys change a's next solve, not b's
    second_a, second_b = a.edit(REQS[1:]), b.edit(REQS[1:])
    name = lm.spec.mlp_out_weight(2)
    assert not torch.equal(second_a.deltas[name], second_b.deltas[name])
    plain = _editor(MEMITEditor, lm)
    assert torch.equal(plain.edit(REQS[1:]).deltas[name], second_b.deltas[name])
    # a plain MEMIT editor keeps no state
    plain.after_apply(REQS[1:], second_b)
    assert plain.KpKp == {}


def test_key_second_moments_match_keys(tiny_llama):
    M = key_second_moments(tiny_llama, [1], REQS, [["{}"]])
    K = compute_keys(tiny_llama, 1, REQS).T.double()
    assert torch.allclose(M[1], K @ K.T, rtol=1e-6)


def test_alphaedit_refuses_an_empty_null_space(tiny_llama):
    cfg = make_config(AlphaEditEditor.config_cls, {**TINY, "nullspace_rule": "absolute",
                                                   "nullspace_threshold": 1e-30}, method="alphaedit")
    ed = AlphaEditEditor(tiny_llama, cfg)
    with pytest.raises(EditError, match="null space .* is empty"):
        ed.prepare()


def test_alphaedit_editor_logs_null_dims_and_accumulates(tiny_llama):
    lm = tiny_llama
    ed = _editor(AlphaEditEditor, lm, nullspace_threshold=0.05)
    assert set(ed.null_dims) == {1, 2} and all(d > 0 for d in ed.null_dims.values())
    res = ed.edit(REQS)
    assert res.info["null_dims"] == {str(k): v for k, v in ed.null_dims.items()}
    assert res.artifacts["null_dims"] == [ed.null_dims[1], ed.null_dims[2]]
    assert set(res.artifacts["null_basis"]) == {"1", "2"}
    assert max(res.artifacts["preserved_share"]) < 1e-3
    undo = apply_result(lm, res)
    try:
        ed.after_apply(REQS, res)
    finally:
        undo(lm.model)
    assert set(ed.KpKp) == {1, 2} and ed.n_accumulated == 2
    other = _editor(AlphaEditEditor, lm, nullspace_threshold=0.05)
    assert other.KpKp == {}
    again = ed.edit(REQS[:1])
    assert "null_basis" not in again.artifacts  # the basis goes with the first result only


def test_emmet_editor_meets_its_targets_on_one_layer(tiny_llama):
    """One layer, emmet_lambda 0, keys from the bare prompt only: the residual at the target site is ~0 after the
    update for every request."""
    ed = _editor(EMMETEditor, tiny_llama, layers=(2,), emmet_lambda=0.0, context_templates="10:0")
    res = ed.edit(REQS)
    assert res.info["residual_final"] < 1e-3 * res.info["residual_initial"]
    assert res.info["layers"]["2"]["fit_error"] < 1e-6


def test_spread_residual():
    R = torch.ones(3, 4)
    torch.testing.assert_close(spread_residual(R, 0, 5), R / 5)
    torch.testing.assert_close(spread_residual(R, 4, 5), R)
    torch.testing.assert_close(spread_residual(R, 1, 5, mode="sqrt"), R / 2)
    # linear spreading with the residual recomputed after each layer adds up to the whole residual
    left, total = R.clone(), torch.zeros_like(R)
    for i in range(5):
        part = spread_residual(left, i, 5)
        total += part
        left = left - part
    torch.testing.assert_close(total, R)
    with pytest.raises(ValueError):
        spread_residual(R, 5, 5)
    with pytest.raises(ValueError, match="unknown spread mode"):
        spread_residual(R, 0, 5, mode="cube")
