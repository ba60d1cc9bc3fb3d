"""AGRADE (Eq. 1-7) and MALMEN maths, training and checkpoints on tiny random models (editors/hypernet.py,
editors/malmen.py, editors/agrade.py, app/train.py)."""
from __future__ import annotations

import os

import pytest
import torch

from editors.agrade import AGRADEConfig, AGRADEEditor, adjustment_coefficients, orthogonalise
from editors.base import EditError, make_config
from editors.hypernet import RunningMeanStd, build_hypernet, regularised_solve_op, solve_shift
from editors.malmen import MALMENConfig, MALMENEditor
from tests.conftest import shared_path
from tests.unit.test_contract import REQUESTS

TINY = {"rank": 8, "layers": (2, 3)}


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_eq4_leaves_G_orthogonal_to_G_prev():
    G, G_prev = _rand(7, 5, seed=1), _rand(7, 5, seed=2)
    out = orthogonalise(G, G_prev)
    assert abs((out * G_prev).sum().item()) < 1e-10 * G.norm().item() * G_prev.norm().item()
    # only the G_prev component is removed
    assert torch.allclose(G - out, ((G * G_prev).sum() / (G_prev * G_prev).sum()) * G_prev)
    assert torch.equal(orthogonalise(G, torch.zeros_like(G)), G)


def test_eq1_coefficients():
    H, Ht = _rand(4, 6, seed=3), _rand(4, 6, seed=4)
    c = adjustment_coefficients(H, Ht, torch.tensor(0.5, dtype=torch.float64))
    assert torch.allclose(c[:, 0], -0.5 * torch.einsum("ij,ij->i", H, Ht))


@pytest.mark.parametrize("T,d_in", [(5, 12), (20, 6)])
def test_eq5_equals_explicit_solve(T, d_in):
    H, G, lam = _rand(T, d_in, seed=5), _rand(T, 3, seed=6), 0.3
    M = H.T @ H + torch.exp(torch.tensor(lam, dtype=torch.float64)) * torch.eye(d_in, dtype=torch.float64)  # Eq. 3
    explicit = torch.linalg.solve(M, H.T @ G)  # Eq. 5
    assert torch.allclose(solve_shift(H, G, lam), explicit, atol=1e-10)
    # Eq. 6: P = H M⁻¹ g_θ (g_θ in the [D_h, D_g] layout)
    g = _rand(d_in, 3, seed=7)
    assert torch.allclose(regularised_solve_op(H, g, lam), H @ torch.linalg.solve(M, g), atol=1e-10)


def test_malmen_solve_is_the_normal_equation_solution():
    K, D, lam = _rand(9, 16, seed=8), _rand(9, 4, seed=9), -1.0
    delta = solve_shift(K, D, torch.tensor(lam, dtype=torch.float64))
    a = torch.exp(torch.tensor(lam, dtype=torch.float64))
    # the normal equation of min ||K Δ - D||² + e^λ ||Δ||²
    assert torch.allclose((K.T @ K + a * torch.eye(16, dtype=torch.float64)) @ delta, K.T @ D, atol=1e-10)
    # without the regulariser: the minimum-norm least-squares solution
    assert torch.allclose(solve_shift(K, D, None), torch.linalg.lstsq(K, D, driver="gelsd").solution, atol=1e-8)


def test_solve_gradient_matches_malmen_decoupled_backward():
    """∂<G, Δ>/∂D = K M and ∂/∂λ = -e^λ <M, Δ> with M = (KᵀK + e^λ I)⁻¹ G (MALMEN's hand-written backward)."""
    K, G = _rand(6, 10, seed=10), _rand(10, 3, seed=11)
    D = _rand(6, 3, seed=12).requires_grad_(True)
    lam = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    delta = solve_shift(K, D, lam)
    (G * delta).sum().backward()
    M = torch.linalg.solve(K.T @ K + lam.exp() * torch.eye(10, dtype=torch.float64), G)
    assert torch.allclose(D.grad, K @ M, atol=1e-10)
    assert torch.allclose(lam.grad, -lam.exp() * (M * delta).sum(), atol=1e-10)


def test_running_mean_std_matches_batch_statistics():
    x = _rand(50, 4, seed=13).float()
    rms = RunningMeanStd(4)
    for chunk in x.split(7):
        rms.update(chunk)
    assert torch.allclose(rms.mean, x.mean(0), atol=1e-5)
    assert torch.allclose(rms.var, x.var(0, unbiased=False), atol=1e-5)


def test_agrade_artifacts_and_projection(tiny_llama, tmp_path):
    cfg = make_config(AGRADEConfig, {**TINY, "allow_untrained": True, "artifact_matrices": True}, method="agrade")
    res = AGRADEEditor(tiny_llama, cfg, cache_dir=str(tmp_path)).edit(list(REQUESTS))
    before, after = res.artifacts["HtG_before"], res.artifacts["HtG_after"]
    assert set(before) == set(after) == {"2", "3"}
    assert torch.equal(before["2"], after["2"])  # the first module has no previous module
    assert not torch.equal(before["3"], after["3"])
    assert res.info["trained"] is False and len(res.artifacts["cos_prev"]) == 1
    art = res.artifacts
    for layer in ("2", "3"):
        assert torch.allclose(art["H"][layer].T @ art["G_after"][layer], after[layer], atol=1e-6)
    # Eq. 4 inside the edit: module 3's G is orthogonal to module 2's (unprojected) G
    inner = (art["G_after"]["3"].double() * art["G_before"]["2"].double()).sum()
    assert abs(inner.item()) <= 1e-5 * art["G_after"]["3"].norm().item() * art["G_before"]["2"].norm().item()
    # Eq. 5 on the real keys: the delta's transpose solves (HᵀH + e^λ I) Δ = HᵀG_after (λ = lambda_init = 0)
    W = tiny_llama.spec.mlp_out_weight(3)
    delta = tiny_llama.spec.to_canonical(res.deltas[W]).T.double()
    H = art["H"]["3"].double()
    lhs = (H.T @ H + torch.eye(H.shape[1], dtype=torch.float64)) @ delta
    assert torch.allclose(lhs, after["3"].double(), atol=1e-6 * after["3"].abs().max().item() + 1e-12)


@pytest.mark.parametrize("cls,cfg_cls,name", [(AGRADEEditor, AGRADEConfig, "agrade"),
                                              (MALMENEditor, MALMENConfig, "malmen")])
def test_untrained_hypernetwork_is_a_clear_error(tiny_llama, tmp_path, cls, cfg_cls, name):
    ed = cls(tiny_llama, make_config(cfg_cls, TINY, method=name), cache_dir=str(tmp_path))
    with pytest.raises(EditError) as err:
        ed.edit(list(REQUESTS))
    msg = str(err.value)
    assert f"python -m app train --method {name} --data counterfact:" in msg
    assert "--set rank=8" in msg and "--set layers=2,3" in msg


@pytest.mark.parametrize("cls,cfg_cls,name,ablation", [
    (AGRADEEditor, AGRADEConfig, "agrade", {}),
    (AGRADEEditor, AGRADEConfig, "agrade", {"use_c": False, "regularise": False}),
    (AGRADEEditor, AGRADEConfig, "agrade", {"weight_projection": False, "gradient_projection": False}),
    (MALMENEditor, MALMENConfig, "malmen", {}),
], ids=["full", "no_c-no_reg", "no_wproj-no_gproj", "malmen"])
def test_training_reduces_the_training_loss(tiny_llama, tmp_path, cls, cfg_cls, name, ablation):
    cfg = make_config(cfg_cls, {**TINY, "meta_lr": 1e-2, "allow_untrained": True, **ablation}, method=name)
    ed = cls(tiny_llama, cfg, cache_dir=str(tmp_path))
    net, layers, modules, _ = build_hypernet(tiny_llama, name, cfg, cache_dir=str(tmp_path), require_trained=False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.meta_lr)
    losses = []
    for _ in range(4):
        loss, stats = ed.train_step(net, list(REQUESTS), layers, modules)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(stats["loss"])
    assert losses[-1] < losses[0] - 1e-3, losses


def test_train_job_checkpoints_resumes_and_is_found(tiny_llama, tmp_path):
    from app.train import train_hypernet
    data = "counterfact:" + shared_path("counterfact", "counterfact-train.json")
    ov = {**TINY, "n_edits": 2, "meta_lr": 1e-2}
    before = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters()}
    out = train_hypernet(tiny_llama, "agrade", ov, data, steps=2, eval_every=2, n_val=2, cache_dir=str(tmp_path),
                         progress=False)
    assert out["resumed_from"] == 0 and out["step"] == 2
    assert {"val_ES", "val_GS", "val_LS", "val_score"} <= set(out["history"][-1])
    for f in ("hypernet.safetensors", "config.json", "optimizer.pt"):
        assert os.path.exists(os.path.join(out["path"], f))
    assert os.path.basename(out["path"]).startswith("agrade-")
    again = train_hypernet(tiny_llama, "agrade", ov, data, steps=3, eval_every=5, n_val=2, cache_dir=str(tmp_path),
                           progress=False)
    assert again["resumed_from"] == 2 and again["step"] == 3 and len(again["history"]) == 3
    # a later edit with the same model and config finds the checkpoint (allow_untrained is not part of the key)
    res = AGRADEEditor(tiny_llama, make_config(AGRADEConfig, ov, method="agrade"), cache_dir=str(tmp_path)).edit(
        list(REQUESTS))
    assert res.info["trained"] is True and res.info["trained_steps"] == 3
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.model.named_parameters())


def test_cli_has_a_train_command():
    from app.cli import COMMANDS, build_parser
    args = build_parser().parse_args(["train", "--method", "malmen", "--data", "zsre:x.json", "--steps", "5",
                                      "--set", "rank=16"])
    assert args.command == "train" and args.steps == 5 and args.sets == ["rank=16"] and "train" in COMMANDS


# =================================================================================================================
# Eq. 1, 4, 6 and the λ term as the editor uses them (issue 14: each test fails on the wrong variants named)
# =================================================================================================================
def _scrambled_net(cfg, d_in, d_out, n_modules, seed=0):
    """A HyperNet whose blocks are NOT the identity (B random, normaliser fitted), so H̃ ≠ H and ∇G̃ ≠ ∇G."""
    from editors.hypernet import HyperNet
    net = HyperNet(d_in, d_out, n_modules, cfg, seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for block in net.blocks:
            block.B.copy_(torch.randn(block.B.shape, generator=gen, dtype=torch.float64) * 0.3)
            block.bias.copy_(torch.randn(block.bias.shape, generator=gen, dtype=torch.float64) * 0.1)
            block.scale.copy_(1 + 0.2 * torch.randn(block.scale.shape, generator=gen, dtype=torch.float64))
        net.norm.update(torch.randn(40, d_in + d_out, generator=gen, dtype=torch.float64) * 2 + 0.5)
        net.lr.copy_(torch.tensor([0.7, 1.3, 0.9][:n_modules], dtype=torch.float64))
        net.lamda.copy_(torch.tensor([0.3, -0.4, 0.8][:n_modules], dtype=torch.float64))
    return net


def _agrade(tiny_llama, **over):
    cfg = make_config(AGRADEConfig, {**TINY, "allow_untrained": True, "rank": 4, **over}, method="agrade")
    return AGRADEEditor(tiny_llama, cfg), cfg


def _inputs(n_modules=3, T=5, d_in=6, d_out=4, seed=20):
    K = [_rand(T, d_in, seed=seed + m) for m in range(n_modules)]
    grads = [_rand(T, d_out, seed=seed + 10 + m) for m in range(n_modules)]
    return K, grads


def test_eq1_and_eq2_as_used_inside_predict(tiny_llama):
    """predict's G (Eq. 4 off) is c ⊙ ∇G̃ with c_i = -η_m Σ_j H_ij H̃_ij of the net's OWN outputs. Fails on: c from
    H̃·H̃ or H·H, η of another module, ∇G instead of ∇G̃, c without the minus sign, c summed over tokens."""
    ed, cfg = _agrade(tiny_llama, gradient_projection=False)
    K, grads = _inputs()
    net = _scrambled_net(cfg, 6, 4, 3)
    with torch.no_grad():
        pred = ed.predict(net, K, grads)
        for m, (H, g) in enumerate(zip(K, grads)):
            H_t, g_t = net(H, g, m)
            assert (H_t - H).abs().max() > 0.1 and (g_t - g).abs().max() > 0.1  # the net is not the identity
            c = -net.lr[m] * torch.einsum("ij,ij->i", H, H_t)[:, None]
            assert torch.allclose(pred.D[m], c * g_t, rtol=1e-10, atol=1e-12)
            # wrong variants give a different G
            assert not torch.allclose(pred.D[m], -net.lr[m] * (H_t * H_t).sum(-1, keepdim=True) * g_t, rtol=1e-3)
            assert not torch.allclose(pred.D[m], c * g, rtol=1e-3)


def test_use_c_false_is_the_ablation_without_c(tiny_llama):
    ed, cfg = _agrade(tiny_llama, gradient_projection=False, use_c=False)
    K, grads = _inputs()
    net = _scrambled_net(cfg, 6, 4, 3)
    with torch.no_grad():
        pred = ed.predict(net, K, grads)
        for m, (H, g) in enumerate(zip(K, grads)):
            assert torch.allclose(pred.D[m], -net.lr[m] * net(H, g, m)[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("regularise", [True, False])
def test_predict_solves_eq5_with_or_without_the_regulariser(tiny_llama, regularise):
    """predict's ΔW_m solves Eq. 5 with M = HᵀH + e^λ I, or (regularise=False, the ablation) the minimum-norm least
    squares of M = HᵀH. Fails on: λ used in the ablation (mutant `regularise or True`), λ dropped from the method,
    another module's λ."""
    ed, cfg = _agrade(tiny_llama, gradient_projection=False, regularise=regularise)
    K, grads = _inputs(T=8)
    net = _scrambled_net(cfg, 6, 4, 3)
    with torch.no_grad():
        net.lamda.copy_(torch.tensor([0.5, 1.5, 2.5], dtype=net.lamda.dtype))
        pred = ed.predict(net, K, grads)
        for m, (H, G) in enumerate(zip(K, pred.D)):
            a = float(torch.exp(net.lamda[m])) if regularise else 0.0
            want = torch.linalg.solve(H.T @ H + a * torch.eye(6, dtype=H.dtype), H.T @ G)
            assert torch.allclose(pred.deltas[m], want, rtol=1e-8, atol=1e-10), m
            other = float(torch.exp(net.lamda[m])) if not regularise else 0.0
            wrong = torch.linalg.solve(H.T @ H + other * torch.eye(6, dtype=H.dtype), H.T @ G)
            assert not torch.allclose(pred.deltas[m], wrong, rtol=1e-3)


@pytest.mark.parametrize("reference", ["raw", "projected"])
def test_eq4_inside_predict_against_the_chosen_previous_G(tiny_llama, reference):
    """Module m's G is Eq. 2's G_m minus its projection on the previous module's raw (Eq. 2) or projected G; the
    first module is untouched. Fails on: projecting on the wrong module, on the wrong G_prev, on G_prev's norm
    instead of its square, or not projecting at all."""
    ed, cfg = _agrade(tiny_llama, projection_reference=reference)
    off, _ = _agrade(tiny_llama, gradient_projection=False)
    K, grads = _inputs()
    net = _scrambled_net(cfg, 6, 4, 3)
    with torch.no_grad():
        raw = off.predict(net, K, grads).D
        got = ed.predict(net, K, grads).D
    expect = [raw[0]]
    for m in range(1, 3):
        prev = raw[m - 1] if reference == "raw" else expect[m - 1]
        expect.append(raw[m] - ((raw[m] * prev).sum() / (prev * prev).sum()) * prev)
    for m in range(3):
        assert torch.allclose(got[m], expect[m], rtol=1e-10, atol=1e-12), m
    prev = raw[1] if reference == "raw" else expect[1]
    assert abs(float((got[2] * prev).sum())) < 1e-10 * float(got[2].norm() * prev.norm())
    # the two references differ from the third module on (the chain is not the raw projection)
    other = raw[1] if reference == "projected" else expect[1]
    assert abs(float((got[2] * other).sum())) > 1e-6 * float(got[2].norm() * other.norm())
    # and Eq. 5 solves with the projected G
    for m in range(3):
        H = K[m]
        M = H.T @ H + torch.exp(net.lamda[m].detach()) * torch.eye(6, dtype=torch.float64)
        with torch.no_grad():
            delta = ed.predict(net, K, grads).deltas[m]
        assert torch.allclose(delta, torch.linalg.solve(M, H.T @ got[m]), rtol=1e-9, atol=1e-12)


def test_projection_reference_is_validated():
    with pytest.raises(Exception) as err:
        make_config(AGRADEConfig, {"projection_reference": "previous"}, method="agrade")
    assert "projection_reference" in str(err.value) and "raw" in str(err.value)


@pytest.mark.parametrize("regularise", [True, False])
def test_eq6_is_autograds_gradient_of_the_edit_objective(tiny_llama, regularise):
    """Eq. 6's P equals ∂<g_θ, Δθ(G)>/∂G by autograd through an explicit M⁻¹HᵀG (M of Eq. 3), and hyper_loss pushes
    exactly P into G. Fails on: P = H g_θ (no M⁻¹), M without e^λ I, P from HᵀH without H in front (shape), P with
    the transposed g_θ, P = M⁻¹ g_θ, a factor 2 or a sign."""
    ed, cfg = _agrade(tiny_llama, regularise=regularise)
    net = _scrambled_net(cfg, 6, 4, 3)
    T, d_in, d_out = (5, 6, 4) if regularise else (8, 6, 4)  # without e^λ I, HᵀH must be invertible
    H = _rand(T, d_in, seed=40)
    g_theta = _rand(d_in, d_out, seed=41)
    G = _rand(T, d_out, seed=42).requires_grad_(True)
    a = torch.exp(net.lamda[1].detach()) if regularise else 0.0
    M = H.T @ H + a * torch.eye(d_in, dtype=torch.float64)  # Eq. 3
    delta = torch.linalg.solve(M, H.T @ G)  # Eq. 5
    (grad_G,) = torch.autograd.grad((g_theta * delta).sum(), G)
    P = ed.projected_gradient(net, H, g_theta, 1)
    assert torch.allclose(P, grad_G, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(H @ g_theta, grad_G, rtol=1e-2)  # the 'w/o weight projection' P is another thing
    # hyper_loss: ∂L/∂G = P for every module
    from editors.hypernet import Prediction
    Gs = [_rand(T, d_out, seed=50 + m).requires_grad_(True) for m in range(3)]
    Hs = [_rand(T, d_in, seed=60 + m) for m in range(3)]
    gs = [_rand(d_in, d_out, seed=70 + m) for m in range(3)]
    deltas = [solve_shift(h, g.detach(), net.lamda[m].detach() if regularise else None) for m, (h, g) in
              enumerate(zip(Hs, Gs))]
    loss = ed.hyper_loss(net, Prediction(K=Hs, D=Gs, deltas=deltas, extras={}), gs)
    grads = torch.autograd.grad(loss, Gs)
    for m in range(3):
        Mm = Hs[m].T @ Hs[m] + (torch.exp(net.lamda[m].detach()) if regularise else 0) * torch.eye(
            d_in, dtype=torch.float64)
        assert torch.allclose(grads[m], Hs[m] @ torch.linalg.solve(Mm, gs[m]), rtol=1e-8, atol=1e-10), m


def test_weight_projection_false_is_P_equals_H_g(tiny_llama):
    ed, cfg = _agrade(tiny_llama, weight_projection=False)
    net = _scrambled_net(cfg, 6, 4, 3)
    H, g = _rand(5, 6, seed=80), _rand(6, 4, seed=81)
    assert torch.allclose(ed.projected_gradient(net, H, g, 0), H @ g)


def test_lambda_term_is_the_derivative_of_the_edit_objective(tiny_llama):
    """λ_m's meta-gradient is ∂<g_θ, Δθ(λ)>/∂λ = -e^λ <M⁻¹ g_θ, Δθ> (G fixed), for every module, and nothing else
    reaches λ. Fails on: the λ term dropped (gradient 0), λ of another module, + instead of -, e^λ missing, G not
    detached in the λ term (G's gradient would change: checked above), the term added without regularisation."""
    from editors.hypernet import Prediction
    ed, cfg = _agrade(tiny_llama)
    net = _scrambled_net(cfg, 6, 4, 3)
    Hs = [_rand(5, 6, seed=90 + m) for m in range(3)]
    Gs = [_rand(5, 4, seed=93 + m) for m in range(3)]
    gs = [_rand(6, 4, seed=96 + m) for m in range(3)]
    deltas = [solve_shift(h, g, net.lamda[m]) for m, (h, g) in enumerate(zip(Hs, Gs))]
    loss = ed.hyper_loss(net, Prediction(K=Hs, D=Gs, deltas=deltas, extras={}), gs)
    (lam_grad,) = torch.autograd.grad(loss, net.lamda)
    for m in range(3):
        lam = net.lamda[m].detach()
        M = Hs[m].T @ Hs[m] + torch.exp(lam) * torch.eye(6, dtype=torch.float64)
        delta = torch.linalg.solve(M, Hs[m].T @ Gs[m])
        expect = -torch.exp(lam) * (torch.linalg.solve(M, gs[m]) * delta).sum()
        assert abs(float(lam_grad[m]) - float(expect)) < 1e-8 * max(1.0, abs(float(expect))), m
        assert abs(float(expect)) > 1e-3  # a dropped λ term (0) would fail
    off, _ = _agrade(tiny_llama, regularise=False)
    loss = off.hyper_loss(net, Prediction(K=Hs, D=Gs, deltas=[solve_shift(h, g, None) for h, g in zip(Hs, Gs)],
                                          extras={}), gs)
    assert not loss.requires_grad or torch.autograd.grad(loss, net.lamda, allow_unused=True)[0] is None


def test_without_gradient_projection_agrade_meta_gradient_is_malmens(tiny_llama, tmp_path):
    """The identity the docs state: AGRADE with Eq. 4 off trains exactly as MALMEN (same net, same batch). With Eq. 4
    on, the meta-gradients differ."""
    from editors.hypernet import build_hypernet
    grads = {}
    for name, cls, cfg_cls, over in [("malmen", MALMENEditor, MALMENConfig, {}),
                                     ("agrade", AGRADEEditor, AGRADEConfig, {"gradient_projection": False}),
                                     ("agrade", AGRADEEditor, AGRADEConfig, {})]:
        cfg = make_config(cfg_cls, {**TINY, "allow_untrained": True, **over}, method=name)
        ed = cls(tiny_llama, cfg, cache_dir=str(tmp_path))
        net, layers, modules, _ = build_hypernet(tiny_llama, name, cfg, cache_dir=str(tmp_path),
                                                 require_trained=False)
        with torch.no_grad():  # a non-trivial net (B = 0 would hide differences in A)
            for block in net.blocks:
                block.B.copy_(torch.randn(block.B.shape, generator=torch.Generator().manual_seed(5)) * 0.05)
        loss, _ = ed.train_step(net, list(REQUESTS), layers, modules, update_norm=False)
        grads[(name, bool(over) or name == "malmen")] = [g.clone() for g in torch.autograd.grad(
            loss, list(net.parameters()), allow_unused=True) if g is not None]
    malmen, same, full = grads[("malmen", True)], grads[("agrade", True)], grads[("agrade", False)]
    assert len(malmen) == len(same)
    assert max(float((a - b).abs().max()) for a, b in zip(malmen, same)) <= 1e-6 * max(
        float(a.abs().max()) for a in malmen)
    assert max(float((a - b).abs().max()) for a, b in zip(malmen, full)) > 1e-3 * max(
        float(a.abs().max()) for a in malmen)


def test_agrade_spectral_artifacts(tiny_llama, tmp_path):
    """M_eigvals = eig(H Hᵀ) + e^λ (the T non-trivial eigenvalues of M = HᵀH + e^λ I), M_diag = diag(HᵀH) + e^λ,
    cos_prev = cosine of G with G_prev before Eq. 4."""
    cfg = make_config(AGRADEConfig, {**TINY, "allow_untrained": True}, method="agrade")
    art = AGRADEEditor(tiny_llama, cfg, cache_dir=str(tmp_path)).edit(list(REQUESTS)).artifacts
    for layer in ("2", "3"):
        H = art["H"][layer].double()
        M = H.T @ H + torch.eye(H.shape[1], dtype=torch.float64)  # λ = lambda_init = 0
        top = torch.linalg.eigvalsh(M)[-H.shape[0]:]
        assert torch.allclose(art["M_eigvals"][layer].double().sort().values, top, rtol=1e-4)
        assert torch.allclose(art["M_diag"][layer].double(), torch.diagonal(M), rtol=1e-5)
    g2, g3 = art["G_before"]["2"].double(), art["G_before"]["3"].double()
    assert abs(art["cos_prev"][0] - float((g2 * g3).sum() / (g2.norm() * g3.norm()))) < 1e-5


def test_projection_reference_keys_checkpoints_only_when_set():
    from editors.hypernet import config_key
    base = make_config(AGRADEConfig, TINY, method="agrade")
    raw = make_config(AGRADEConfig, {**TINY, "projection_reference": "raw"}, method="agrade")
    chained = make_config(AGRADEConfig, {**TINY, "projection_reference": "projected"}, method="agrade")
    assert config_key("agrade", base) == config_key("agrade", raw) != config_key("agrade", chained)


def test_scaled_gradient_and_project_gradients_on_tensors():
    """Eq. 1-2 and Eq. 4 over modules as plain functions (fast; the mutation set's first pass). Fails on: c from
    H̃·H̃, a missing minus, η per token, projecting on the wrong module or G_prev, the first module projected, cos of
    the wrong pair."""
    from editors.agrade import project_gradients, scaled_gradient
    H, Ht, g = _rand(5, 6, seed=120), _rand(5, 6, seed=121), _rand(5, 4, seed=122)
    eta = torch.tensor(0.7, dtype=torch.float64)
    assert torch.allclose(scaled_gradient(H, Ht, g, eta), -0.7 * (H * Ht).sum(-1, keepdim=True) * g)
    assert torch.allclose(scaled_gradient(H, Ht, g, eta, use_c=False), -0.7 * g)
    raw = [_rand(5, 4, seed=130 + m) for m in range(4)]
    for ref in ("raw", "projected"):
        G, cos = project_gradients(raw, ref)
        assert torch.equal(G[0], raw[0]) and len(cos) == 3
        for m in range(1, 4):
            prev = raw[m - 1] if ref == "raw" else G[m - 1]
            expect = raw[m] - ((raw[m] * prev).sum() / (prev * prev).sum()) * prev
            assert torch.allclose(G[m], expect, atol=1e-12), (ref, m)
            assert abs(cos[m - 1] - float((raw[m] * prev).sum() / (raw[m].norm() * prev.norm()))) < 1e-12
    Gr, _ = project_gradients(raw, "raw")
    Gp, _ = project_gradients(raw, "projected")
    Gd, _ = project_gradients(raw)  # the default reference is "raw"
    assert all(torch.equal(a, b) for a, b in zip(Gd, Gr))
    # the cosine is scale-free (no clamp of the norms' product at a visible size)
    _, cos_small = project_gradients([r * 1e-3 for r in raw])
    _, cos_big = project_gradients(raw)
    assert all(abs(a - b) < 1e-9 for a, b in zip(cos_small, cos_big))
    assert torch.equal(Gr[1], Gp[1]) and not torch.allclose(Gr[2], Gp[2])
    with pytest.raises(ValueError, match="reference"):
        project_gradients(raw, "previous")


def test_batch_scores_weights_each_batch_by_its_size(monkeypatch):
    """app.train.batch_scores (AGRADE's reproduction, bench_hypernet): ES / GS / LS are means over the batches
    weighted by their sizes; the Editing Score is the harmonic mean of those means, not a mean of the batches'."""
    import app.train as train
    from analysis.evaluation import editing_score
    seen = []
    per_batch = {("a", "b"): (1.0, 0.5, 0.9), ("c",): (0.25, 1.0, 0.6)}

    def fake(lm, editor, batch):
        seen.append(tuple(batch))
        es, gs, ls = per_batch[tuple(batch)]
        return {"ES": es, "GS": gs, "LS": ls, "score": editing_score(es, gs, ls)}

    monkeypatch.setattr(train, "validate_edits", fake)
    out = train.batch_scores(None, None, ["a", "b", "c"], 2)
    assert seen == [("a", "b"), ("c",)]
    expected = {"ES": (2 * 1.0 + 0.25) / 3, "GS": (2 * 0.5 + 1.0) / 3, "LS": (2 * 0.9 + 0.6) / 3}
    assert out == pytest.approx({**expected, "score": editing_score(*expected.values())})
    assert out["ES"] != pytest.approx((1.0 + 0.25) / 2)  # wrong variant: unweighted mean of the batches
