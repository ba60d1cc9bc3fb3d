"""UltraEdit (editors/ultraedit.py): each test names the wrong variant it fails on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from editors.base import apply_result, make_config
from editors.hooks import Trace
from editors.requests import make_request
from editors.ultraedit import (
    FLOAT32_EPS,
    RunningStats,
    UltraEditConfig,
    UltraEditEditor,
    chunk_features,
    chunks_of,
    pseudo_values,
    ridge_delta,
    whiten_values,
)

REQS = [
    make_request(source="test", record=0, case_id="eiffel", prompt="The Eiffel Tower is located in the city of",
                 subject="The Eiffel Tower", target_new="Rome", target_true="Paris"),
    make_request(source="test", record=1, case_id="darrieux", prompt="The mother tongue of Danielle Darrieux is",
                 subject="Danielle Darrieux", target_new="English", target_true="French"),
    make_request(source="test", record=2, case_id="jordan", prompt="Michael Jordan plays the sport of",
                 subject="Michael Jordan", target_new="baseball and cricket", target_true="basketball"),
]


def _editor(lm, **over) -> UltraEditEditor:
    base = {"layers": (1, 2), "chunk_size": 2, "lr": 1e-2}
    return UltraEditEditor(lm, make_config(UltraEditConfig, {**base, **over}, method="ultraedit"), seed=0)


def _explicit_delta(H, V, lam):
    """ΔW = Vᵀ H inv(HᵀH + λI), explicit inverse, float64."""
    H, V = H.double(), V.double()
    return V.T @ H @ torch.linalg.inv(H.T @ H + lam * torch.eye(H.shape[1], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# 1. running statistics
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [(1, 3, 7), (50, 1, 3), (7, 50, 1, 1, 3)])
def test_merge_equals_statistics_of_all_rows(sizes):
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(m, 6, generator=gen, dtype=torch.float64) * 3 + 1.5 for m in sizes]
    s = RunningStats.empty(4, 2)
    for c in chunks:  # one step at a time
        s = s.merged(c)
    X = torch.cat(chunks)
    assert s.n == X.shape[0]
    assert torch.allclose(s.mean, X.mean(0), atol=1e-12, rtol=0)
    assert torch.allclose(s.std(), X.std(0, correction=1), atol=1e-12, rtol=0)
    # two steps: the first two chunks together, then the rest together
    two = RunningStats.empty(4, 2).merged(torch.cat(chunks[:2])).merged(torch.cat(chunks[2:]))
    assert torch.allclose(two.mean, s.mean, atol=1e-12) and torch.allclose(two.M2, s.M2, atol=1e-10)


def test_authors_inflated_merge_is_their_formula_and_not_the_statistics():
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(m, 3, generator=gen, dtype=torch.float64) for m in (5, 4))
    s = RunningStats.empty(2, 1).merged(a, "ultraedit").merged(b, "ultraedit")
    # by hand: M2 = 5·var_u(a) + 4·var_u(b) + δ²·5·4/9 with δ = mean(b) − mean(a)
    delta = b.mean(0) - a.mean(0)
    M2 = 5 * a.var(0, correction=1) + 4 * b.var(0, correction=1) + delta ** 2 * 5 * 4 / 9
    assert torch.allclose(s.M2, M2, atol=1e-12)
    X = torch.cat([a, b])
    assert not torch.allclose(s.std(), X.std(0, correction=1), atol=1e-6)  # it inflates the spread
    assert torch.allclose(s.mean, X.mean(0), atol=1e-12)


def test_normalize_uses_float32_eps_and_sample_std():
    X = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)
    s = RunningStats.empty(1, 1).merged(X)
    sd = torch.tensor([2 ** 0.5, 8 ** 0.5], dtype=torch.float64)
    assert torch.allclose(s.normalize(X), (X - X.mean(0)) / (sd + FLOAT32_EPS), atol=1e-14)
    one = RunningStats.empty(1, 1).merged(X[:1])
    assert torch.equal(one.normalize(X[:1]), torch.zeros(1, 2, dtype=torch.float64))  # n = 1: σ = 0, ẑ = 0


def test_comoment_merge_equals_population_covariance_times_n():
    gen = torch.Generator().manual_seed(2)
    chunks = [torch.randn(m, 5, generator=gen, dtype=torch.float64) for m in (1, 4, 9)]
    s = RunningStats.empty(2, 3, comoment=True)
    for c in chunks:
        s = s.merged(c)
    G = torch.cat(chunks)[:, 2:]
    assert torch.allclose(s.C, torch.cov(G.T, correction=0) * G.shape[0], atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 2-4. pseudo-values and the solve
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["primal", "dual", "auto"])
def test_ridge_delta_equals_explicit_formula(form):
    gen = torch.Generator().manual_seed(3)
    H = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    V = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    D = ridge_delta(H, V, 0.7, form=form)
    assert D.shape == (4, 5)
    assert torch.allclose(D, _explicit_delta(H, V, 0.7), atol=1e-12)
    # it minimises ‖H ΔWᵀ − V‖² + λ‖ΔW‖²: the gradient vanishes there
    Dv = D.clone().requires_grad_(True)
    obj = ((H @ Dv.T - V) ** 2).sum() + 0.7 * (Dv ** 2).sum()
    (grad,) = torch.autograd.grad(obj, Dv)
    assert grad.abs().max() < 1e-10


def test_update_norm_bound():
    gen = torch.Generator().manual_seed(4)
    for lam in (0.1, 1.0, 10.0):
        H = torch.randn(7, 9, generator=gen, dtype=torch.float64) * 2
        V = torch.randn(7, 4, generator=gen, dtype=torch.float64)
        assert ridge_delta(H, V, lam).norm() <= V.norm() / (2 * lam ** 0.5) * (1 + 1e-12)


def test_pseudo_values_by_hand():
    K = torch.tensor([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]], dtype=torch.float64)  # ‖k̂‖² = 9, 25
    G = torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=torch.float64)
    V = pseudo_values(K, G, 0.1)
    assert torch.allclose(V, torch.tensor([[-0.9, 0.9], [-5.0, -1.25]], dtype=torch.float64), atol=1e-14)


def _turn_features(lm, editor, requests):
    layers = list(editor.config.layers)
    modules = [lm.spec.mlp_out_module(i) for i in layers]
    feats = [chunk_features(lm, modules, c) for c in chunks_of(lm.tokenizer, requests, editor.config.chunk_size)]
    H = {m: torch.cat([f.H[m] for f in feats]).double() for m in modules}
    G = {m: torch.cat([f.G[m] for f in feats]).double() for m in modules}
    return layers, modules, H, G


def test_edit_with_and_without_normalisation_follows_the_formula(tiny_llama):
    lm = tiny_llama
    on, off = _editor(lm), _editor(lm, normalization="off")
    r_on, r_off = on.edit(REQS), off.edit(REQS)
    layers, modules, H, G = _turn_features(lm, on, REQS)
    # the shared statistics of this turn: every layer's rows, chunk by chunk (order does not change them)
    Z_all = torch.cat([torch.cat([H[m], G[m]], 1) for m in modules])
    mu, sd = Z_all.mean(0), Z_all.std(0, correction=1)
    lam, eta = on.config.ridge, on.config.lr
    for layer, m in zip(layers, modules):
        name = lm.spec.mlp_out_weight(layer)
        d_ff = H[m].shape[1]
        Zh = (torch.cat([H[m], G[m]], 1) - mu) / (sd + FLOAT32_EPS)
        V_on = -eta * (Zh[:, :d_ff] ** 2).sum(1, keepdim=True) * Zh[:, d_ff:]
        V_off = -eta * (H[m] ** 2).sum(1, keepdim=True) * G[m]
        A_inv = torch.linalg.inv(H[m].T @ H[m] + lam * torch.eye(d_ff, dtype=torch.float64))
        D_on = lm.spec.to_canonical(r_on.deltas[name]).double()
        D_off = lm.spec.to_canonical(r_off.deltas[name]).double()
        assert torch.allclose(D_on, V_on.T @ H[m] @ A_inv, atol=1e-6 * D_on.abs().max().item())
        assert torch.allclose(D_off, V_off.T @ H[m] @ A_inv, atol=1e-6 * D_off.abs().max().item())
        diff = (V_on - V_off).T @ H[m] @ A_inv
        assert torch.allclose(D_on - D_off, diff, atol=1e-6 * diff.abs().max().item())
        # wrong variant: the normalised keys in the solve
        wrong = V_on.T @ Zh[:, :d_ff] @ torch.linalg.inv(Zh[:, :d_ff].T @ Zh[:, :d_ff] + lam * torch.eye(d_ff,
                                                                                                        dtype=torch.float64))
        assert not torch.allclose(D_on, wrong, atol=1e-3 * D_on.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# 5. features
# ---------------------------------------------------------------------------------------------------------------
def test_features_are_inputs_and_output_gradients_at_answer_positions(tiny_llama):
    lm = tiny_llama
    tok = lm.tokenizer
    m = lm.spec.mlp_out_module(2)
    r = REQS[2]  # a multi-token target
    f = chunk_features(lm, [m], [r])
    p = tok(r.prompt)["input_ids"]
    t = tok(" " + r.target_new, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + t])
    eps = torch.zeros(1, len(p) + len(t), lm.spec.hidden_size, requires_grad=True)
    with torch.enable_grad(), Trace(lm.model, [m], retain_input=True,
                                    edit_output=lambda name, out: out + eps) as tr:
        logits = lm.model(input_ids=ids).logits[0]
        pos = list(range(len(p) - 1, len(p) + len(t) - 1))  # position P-1+j predicts target token j
        loss = torch.nn.functional.cross_entropy(logits[pos], torch.tensor(t))
        (g,) = torch.autograd.grad(loss, eps)
    assert f.n_tokens == len(t)
    assert torch.allclose(f.H[m], tr.inputs[m][0, pos], atol=1e-5)
    assert torch.allclose(f.G[m], g[0, pos], atol=1e-5 * g.abs().max().item())  # float32, two forward paths
    # wrong variant: positions shifted by one
    shifted = [x + 1 for x in pos]
    assert not torch.allclose(f.H[m], tr.inputs[m][0, shifted], atol=1e-3)


def test_gradient_is_of_the_chunk_mean(tiny_llama):
    lm = tiny_llama
    m = lm.spec.mlp_out_module(1)
    alone = chunk_features(lm, [m], [REQS[0]])  # 1 answer token (" Rome")
    both = chunk_features(lm, [m], [REQS[0], REQS[2]])
    n_both = both.n_tokens
    assert n_both > alone.n_tokens
    # the first request's token: its gradient in the chunk = alone × (its tokens / the chunk's tokens)
    assert torch.allclose(both.G[m][:alone.n_tokens], alone.G[m] * alone.n_tokens / n_both,
                          atol=1e-5 * alone.G[m].abs().max().item())


def test_chunks_sorted_longest_first(tiny_llama):
    tok = tiny_llama.tokenizer
    chunks = chunks_of(tok, REQS, 2)
    assert [len(c) for c in chunks] == [2, 1]
    lengths = [len(tok(r.prompt)["input_ids"]) + len(tok(" " + r.target_new, add_special_tokens=False)["input_ids"])
               for c in chunks for r in c]
    assert lengths == sorted(lengths, reverse=True)


# ---------------------------------------------------------------------------------------------------------------
# 6. StableEdit whitening
# ---------------------------------------------------------------------------------------------------------------
def test_whitening_of_a_diagonal_covariance_is_scaled_standardisation():
    gen = torch.Generator().manual_seed(5)
    d, n = 3, 40
    # rows with a diagonal co-moment: ± pairs around the mean on each axis separately
    G = torch.zeros(n, d, dtype=torch.float64)
    scales = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    for j in range(d):
        k = torch.rand(1, generator=gen).item() + 1
        G[2 * j, j], G[2 * j + 1, j] = k * scales[j], -k * scales[j]
    G = G + 3.0
    s = RunningStats.empty(1, d, comoment=True).merged(torch.cat([torch.zeros(n, 1, dtype=torch.float64), G], 1))
    assert torch.allclose(s.C - torch.diag(torch.diagonal(s.C)), torch.zeros(d, d, dtype=torch.float64), atol=1e-12)
    W = whiten_values(G, s, floor=1e-12)
    sd = s.std()[1:]
    expected = (G - s.mean[1:]) / sd * ((n - d - 1) / (n - 1)) ** 0.5
    assert torch.allclose(W, expected, atol=1e-10)


def test_whitening_floor_and_fallback():
    gen = torch.Generator().manual_seed(6)
    G = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    G[:, 2] = 5.0  # a constant coordinate: eigenvalue 0 of Σ̂
    s = RunningStats.empty(1, 3, comoment=True).merged(torch.cat([torch.zeros(10, 1, dtype=torch.float64), G], 1))
    W = whiten_values(G, s, floor=1e-4)
    assert torch.isfinite(W).all()
    probe = s.mean[1:].clone()[None]
    probe[0, 2] += 1e-3  # along the eigenvector of eigenvalue 0: scaled by 1/sqrt(floor)
    assert abs(whiten_values(probe, s, floor=1e-4)[0, 2].item() - 1e-3 / 1e-2) < 1e-9
    few = RunningStats.empty(1, 3, comoment=True).merged(torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than d"):
        whiten_values(G, few)


def test_stable_mode_whitens_only_after_d_plus_one_samples(tiny_llama):
    lm = tiny_llama
    ed = _editor(lm, normalization="stable", layers=(1,), chunk_size=3)
    r = ed.edit(REQS)  # a few tokens: n ≤ d + 1 = 65, diagonal normalisation
    assert r.info["layer"]["1"]["whitened"] == 0.0
    diag = _editor(lm, layers=(1,), chunk_size=3).edit(REQS)
    name = lm.spec.mlp_out_weight(1)
    assert torch.equal(r.deltas[name], diag.deltas[name])


# ---------------------------------------------------------------------------------------------------------------
# 7. warm-up
# ---------------------------------------------------------------------------------------------------------------
def test_warmup_is_applied_sequentially_and_returned_with_the_first_turn(tiny_llama):
    from editors.data import load_requests
    lm = tiny_llama
    snap = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    ed = _editor(lm, warmup_edits=4, warmup_turn=2, warmup_data="builtin", layers=(1,))
    r = ed.edit(REQS)
    assert all(torch.equal(p, snap[n]) for n, p in lm.model.named_parameters()), "edit() left the model changed"
    assert r.info["warmup_edits"] == 4
    # by hand: two warm-up turns applied one after the other, then the turn
    warm = load_requests("builtin", 4)
    plain = _editor(lm, layers=(1,))
    name = lm.spec.mlp_out_weight(1)
    total = torch.zeros_like(r.deltas[name], dtype=torch.float64)
    undos = []
    try:
        for turn in (warm[:2], warm[2:], REQS):
            step = plain.edit(turn)
            total += step.deltas[name].double()
            undos.append(apply_result(lm, step))
            plain.after_apply(turn, step)
    finally:
        for u in reversed(undos):
            u(lm.model)
    assert torch.allclose(r.deltas[name].double(), total, atol=1e-6 * total.abs().max().item())
    # wrong variant: the warm-up ΔW not returned
    assert not torch.allclose(r.deltas[name].double(), step.deltas[name].double(), atol=1e-3 * total.abs().max().item())
    # the warm-up's statistics are committed with the first result, and the warm-up runs once
    ed.after_apply(REQS, r)
    assert ed.stats["shared"].n == plain.stats["shared"].n
    r2 = ed.edit(REQS[:1])
    assert "warmup_edits" not in r2.info


# ---------------------------------------------------------------------------------------------------------------
# 8. state: per instance, committed in after_apply, saved and restored
# ---------------------------------------------------------------------------------------------------------------
def test_statistics_per_instance_and_committed_in_after_apply(tiny_llama):
    lm = tiny_llama
    a, b = _editor(lm), _editor(lm)
    r = a.edit(REQS[:2])
    assert a.stats == {} and b.stats == {}, "edit() must not commit statistics"
    a.after_apply(REQS[:2], b.edit(REQS[:2]))  # a result of ANOTHER editor: nothing to commit
    assert a.stats == {}
    a.after_apply(REQS[:2], r)
    assert a.stats["shared"].n == 2 * r.info["n_tokens"]  # tokens x layers (shared normaliser)
    assert b.stats == {}
    per_layer = _editor(lm, share_stats=False)
    rr = per_layer.edit(REQS[:2])
    per_layer.after_apply(REQS[:2], rr)
    assert set(per_layer.stats) == {"layer1", "layer2"} and per_layer.stats["layer1"].n == rr.info["n_tokens"]


def test_state_dict_round_trip_reproduces_the_next_edit(tiny_llama):
    lm = tiny_llama
    a = _editor(lm, normalization="stable")
    r = a.edit(REQS[:2])
    a.after_apply(REQS[:2], r)
    state = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    b = _editor(lm, normalization="stable")
    b.load_state_dict({k: np.array(v) for k, v in state.items()})
    ra, rb = a.edit(REQS[2:]), b.edit(REQS[2:])
    for name in ra.deltas:
        assert torch.equal(ra.deltas[name], rb.deltas[name])
    fresh = _editor(lm, normalization="stable").edit(REQS[2:])
    assert any(not torch.equal(ra.deltas[n], fresh.deltas[n]) for n in ra.deltas)  # the state matters
    with pytest.raises(ValueError, match="format"):
        b.load_state_dict({**state, "format": np.asarray(99)})


def test_config_validation():
    from editors.base import ConfigError
    for bad in ({"normalization": "layer"}, {"chunk_var": "biased"}, {"ridge": 0}, {"lr": -1}, {"layers": (1, 1)}):
        with pytest.raises(ConfigError):
            make_config(UltraEditConfig, bad, method="ultraedit")
