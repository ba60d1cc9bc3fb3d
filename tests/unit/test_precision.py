"""Half-precision models (issue 16): editors do their maths in fp32 and round ONCE when an update is applied.

The bf16 tiny model and its fp32 twin hold the same weights (the fp32 one is the bf16 one cast up), so any difference
between their edits comes from the precision of the computation alone.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from analysis.evaluation import teacher_forced
from editors.base import EditResult, add_update_, apply_result, math_dtype
from editors.keys import current_values
from editors.models import resolve_dtype, wrap_model
from editors.multilayer import multilayer_update
from editors.presets import build_config
from editors.registry import get_editor_class, method_info
from editors.testing import tiny_model
from tests.unit.test_contract import REQUESTS

#: one method per editor family, with enough optimisation steps for the edit to move the tiny model
FAMILY_ROWS = {
    "rome": {"v_num_grad_steps": 20},  # locate-then-edit
    "memit": {"v_num_grad_steps": 10},  # locate-then-edit, the multi-layer loop
    "alphaedit": {"v_num_grad_steps": 10},  # constrained
    "mose": {"v_num_grad_steps": 10},  # multiplicative
    "ft": {"num_steps": 10},  # fine-tuning (fp32 master weights)
    "lora": {"num_steps": 3},  # fine-tuning, adapter
    "malmen": {},  # hypernetwork
}
#: methods whose tiny edit measurably raises log p(target) (the others' tiny-model edits stay below 1e-3 nats)
MOVES_TARGET = ("rome", "ft")


@pytest.fixture(scope="module")
def twins():
    base = tiny_model("llama")
    m16 = copy.deepcopy(base.model).to(torch.bfloat16)
    m32 = copy.deepcopy(m16).to(torch.float32)
    return wrap_model(m16, base.tokenizer, name="tiny-bf16"), wrap_model(m32, base.tokenizer, name="tiny-fp32")


def _target_logprob(lm, req) -> float:
    return teacher_forced(lm, [req.prompt], [req.target_new])[0].logprob


def _edit(lm, method: str, overrides: dict, reqs):
    cfg, _ = build_config(method, "tiny", {**method_info(method).tiny, **overrides}, use_preset=False)
    editor = get_editor_class(method)(lm, cfg, seed=0)
    editor.prepare()
    return editor.edit(reqs)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def test_math_dtype_and_one_rounding():
    assert math_dtype(torch.bfloat16) == torch.float32 and math_dtype(torch.float16) == torch.float32
    assert math_dtype(torch.float32) == torch.float32 and math_dtype(torch.float64) == torch.float64
    torch.manual_seed(0)
    w = torch.randn(64, 64).to(torch.bfloat16)
    d = torch.randn(64, 64) * 3e-3  # below bf16's resolution of most entries of w: rounding d first loses it
    p = w.clone()
    add_update_(p, d)
    assert torch.equal(p, (w.float() + d).to(torch.bfloat16))
    assert not torch.equal(p, w + d.to(torch.bfloat16))  # the two-rounding variant differs
    p32 = torch.randn(8, 8)
    w32 = p32.clone()
    add_update_(p32, d[:8, :8])
    assert torch.equal(p32, w32 + d[:8, :8])  # fp32: exactly add_


def test_resolve_dtype():
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype(torch.float16, torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="auto, float32, bfloat16, float16"):
        resolve_dtype("half-ish", torch.device("cpu"))


@pytest.mark.parametrize("method", list(FAMILY_ROWS))
def test_bf16_edit_per_family(twins, method):
    """On a bf16 model: the edit runs, leaves the model as it was, returns fp32 updates, applying them rounds once,
    and it agrees with the same edit of the fp32 twin (same weights)."""
    lm16, lm32 = twins
    reqs = list(REQUESTS[:1])
    params = dict(lm16.model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    lp0 = {"bf16": _target_logprob(lm16, reqs[0]), "fp32": _target_logprob(lm32, reqs[0])}
    r16 = _edit(lm16, method, FAMILY_ROWS[method], reqs)
    assert all(torch.equal(p, before[n]) for n, p in params.items()), "edit() changed the bf16 model"
    assert r16.deltas or r16.factors
    assert all(d.dtype == torch.float32 for d in r16.deltas.values())
    undo = apply_result(lm16, r16)
    for n, d in r16.deltas.items():  # one rounding of the fp32 sum
        assert torch.equal(params[n], (before[n].float() + d).to(torch.bfloat16)), n
    lp1_16 = _target_logprob(lm16, reqs[0])
    undo(lm16.model)
    r32 = _edit(lm32, method, FAMILY_ROWS[method], reqs)
    u32 = apply_result(lm32, r32)
    lp1_32 = _target_logprob(lm32, reqs[0])
    u32(lm32.model)
    for n in r32.deltas:
        assert _cos(r16.deltas[n], r32.deltas[n]) > 0.9, (n, _cos(r16.deltas[n], r32.deltas[n]))
    if r32.factors:
        # MOSE: the Procrustes rotation is ill-determined in the near-null directions of λ W C0 Wᵀ (a random tiny
        # model has many), so R itself is not compared; what it does is: the share of the requested change it did
        # not write and how much it moved the preserved keys' outputs, per layer
        assert set(r16.factors) == set(r32.factors)
        for layer, i32 in r32.info["layers"].items():
            i16 = r16.info["layers"][layer]
            assert abs(i16["fit_after"] - i32["fit_after"]) < 0.05, (layer, i16["fit_after"], i32["fit_after"])
            assert abs(i16["preserve_change"] - i32["preserve_change"]) < 0.25 * i32["preserve_change"], layer
    if method in MOVES_TARGET:
        gain16, gain32 = lp1_16 - lp0["bf16"], lp1_32 - lp0["fp32"]
        assert gain32 > 1e-2 and gain16 > 0.5 * gain32, (gain16, gain32)


def test_multilayer_rounds_like_apply_result(twins):
    """The MEMIT loop writes each layer's update into the bf16 model while it computes the next layer's keys; the
    residual it measures at the end must be exactly the one the applied result gives (same rounding)."""
    lm16, _ = twins
    reqs = list(REQUESTS)
    L = 2
    Z = current_values(lm16, L, reqs, site="residual").float() + 0.5

    def solve(K, R, state):  # least squares ΔW K = R, fp64
        return (R @ torch.linalg.pinv(K)).to(state.W.dtype)

    out = multilayer_update(lm16, reqs, [1, 2], solve, site="residual", spread="linear", Z=Z, solve_dtype=torch.float64)
    res = EditResult(method="test", deltas=out.deltas, factors={}, info={}, artifacts={}, config={}, config_version=1,
                     seconds=0.0)
    undo = apply_result(lm16, res)
    try:
        cur = current_values(lm16, L, reqs, site="residual").T
        after = float((Z.T - cur).double().norm(dim=0).mean())
    finally:
        undo(lm16.model)
    assert after == out.info["residual_final"]


# ---------------------------------------------------------------------------------------------------------------
# no needless per-edit work: cheaper decompositions, checked against the exact ones
# ---------------------------------------------------------------------------------------------------------------
def test_randomized_top_svd_matches_exact():
    from editors.adaedit import sr_fusion, top_svd
    g = torch.Generator().manual_seed(0)
    # a MEMIT-like update: rank 5 (a batch of 5 edits), 96 x 400
    D = torch.randn(96, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 400, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    Ur, Sr, Vhr = top_svd(D, 4, method="randomized")
    assert Sr.shape[0] == 12  # r + oversample columns
    assert torch.allclose(Sr[:5], S[:5], rtol=1e-10) and float(Sr[5:].max()) < 1e-10 * float(S[0])
    for i in range(4):  # the same singular vectors up to sign
        assert abs(abs(float(Ur[:, i] @ U[:, i])) - 1) < 1e-9 and abs(abs(float(Vhr[i] @ Vh[i])) - 1) < 1e-9
    # so SRFusion gives the same fused update (sign-invariant) either way
    exact = sr_fusion(D, 4, 0.45, svd="exact")
    assert torch.allclose(sr_fusion(D, 4, 0.45, svd="randomized"), exact, rtol=0, atol=1e-10 * float(exact.abs().max()))
    # a full-rank matrix with a decaying spectrum: the top-4 values to 1e-6 with 2 power iterations
    Q1, _ = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(400, 96, generator=g, dtype=torch.float64))
    s = 0.5 ** torch.arange(96, dtype=torch.float64)
    F = Q1 @ torch.diag(s) @ Q2.T
    _, Sf, _ = top_svd(F, 4, method="randomized")
    assert torch.allclose(Sf[:4], s[:4], rtol=1e-6)
    # auto: exact on small matrices (min dim <= 4 (r + 8))
    assert top_svd(D[:40], 4, method="auto")[1].shape[0] == 40
    with pytest.raises(ValueError, match="auto, exact, randomized"):
        top_svd(D, 4, method="lanczos")


def test_top_svd_shapes_auto_boundary_and_seeded_determinism():
    """Mutation-testing survivors of top_svd, killed: the thin shapes of both paths (U [m, q], S [q], Vh [q, n];
    full_matrices=True would give square factors), 'auto' switching to the randomised path exactly when
    min(m, n) > 4 q (not >=, not 5 q, not always exact), the default method being 'auto' and the default seed 0,
    and a seeded range finder (the same call twice is bit-identical, another seed is not)."""
    from editors.adaedit import top_svd
    g = torch.Generator().manual_seed(1)
    r, q = 2, 10  # q = r + 8
    for m in (4 * q, 4 * q + 1):
        D = torch.randn(m, 3 * m, generator=g, dtype=torch.float64)
        exact = torch.linalg.svd(D, full_matrices=False)
        rand = top_svd(D, r, method="randomized")
        auto = top_svd(D, r, method="auto")
        assert [tuple(t.shape) for t in rand] == [(m, q), (q,), (q, 3 * m)]
        assert [tuple(t.shape) for t in top_svd(D, r, method="exact")] == [(m, m), (m,), (m, 3 * m)]
        want = exact if m <= 4 * q else rand
        assert all(torch.equal(a, b) for a, b in zip(auto, want)), m
        assert all(torch.equal(a, b) for a, b in zip(top_svd(D, r), auto))  # the default method is auto
    D = torch.randn(60, 200, generator=g, dtype=torch.float64)  # full rank: the range finder's draw matters
    a, b = top_svd(D, r, method="randomized"), top_svd(D, r, method="randomized", seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # seeded, default seed 0
    c = top_svd(D, r, method="randomized", seed=1)
    assert not torch.equal(a[1], c[1])


def test_max_rotation_angle_matches_eigvals():
    from editors.mose import max_rotation_angle
    g = torch.Generator().manual_seed(1)
    for d in (2, 7, 30):
        A = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.3
        R = torch.linalg.matrix_exp(A - A.T)  # a rotation (det +1)
        expect = float(torch.linalg.eigvals(R).angle().abs().max())
        assert abs(max_rotation_angle(R) - expect) < 1e-6, d
    assert max_rotation_angle(torch.eye(5)) == 0.0
    assert max_rotation_angle(torch.zeros(0, 0)) == 0.0  # no matrix: no rotation
    # rounding: an orthogonal R computed in floating point can put λ just outside [0, 4]; the clamp keeps acos's
    # domain (a clamp at 2 or -2 instead of ±1 raises "math domain error" here)
    eye = torch.eye(4, dtype=torch.float64)
    assert max_rotation_angle(eye * (1 + 1e-12)) == 0.0
    assert max_rotation_angle(-eye * (1 + 1e-12)) == pytest.approx(math.pi)
    refl = torch.diag(torch.tensor([-1.0, 1.0, 1.0]))  # an eigenvalue -1: angle pi
    assert abs(max_rotation_angle(refl) - torch.pi) < 1e-6


@pytest.mark.parametrize("precision, expect", [("auto", torch.float64), ("float32", torch.float32)])
def test_solve_precision_is_a_choice(twins, precision, expect):
    """MultiLayerConfig.solve_precision: the closed form gets K, R and C in that dtype ('auto' = the method's own)."""
    _, lm32 = twins
    cfg, _ = build_config("memit", "tiny", {**method_info("memit").tiny, "solve_precision": precision},
                          use_preset=False)
    editor = get_editor_class("memit")(lm32, cfg, seed=0)
    seen = []
    solve = editor.solve
    editor.solve = lambda K, R, state: (seen.append((K.dtype, R.dtype, state.C.dtype)), solve(K, R, state))[1]
    res = editor.edit(list(REQUESTS[:1]))
    assert seen and all(d == (expect, expect, expect) for d in seen)
    assert all(d.dtype == torch.float32 for d in res.deltas.values())
