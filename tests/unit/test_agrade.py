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
