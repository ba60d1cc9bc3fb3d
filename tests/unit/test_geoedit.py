"""GeoEdit end to end on tiny random models (editors/geoedit.py, the importance EMA of editors/lora.py), LoRA's merged
delta (editors/lora.py) and F-Learning's arithmetic (editors/flearning.py); the maths on constructed vectors is in
test_geoedit_maths.py.

Each step is pinned against a manual computation that a plausible wrong variant fails: the KL the editor feeds Eq. 9
(model with τ vs with its reconstruction, per task), Eq. 12-13 (|w · ∂L/∂w| per neuron, EMA over steps, the LoRA EMA
starting at the first informative step, α from the old-fact run, β from the new-fact run), and the whole of Sec. 4.3
recomputed by hand from the editor's own task vectors and auto-encoder (latent classes, each rule of Eq. 11).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import editors.finetune as finetune_mod
import editors.geoedit as geo_mod
from editors.base import EditError, apply_result, make_config
from editors.finetune import finetune
from editors.flearning import FLearningConfig, FLearningEditor
from editors.ft import FTConfig, FTEditor
from editors.geoedit import (
    ORTHOGONAL,
    GeoEditConfig,
    GeoEditEditor,
    from_neurons,
    minmax,
    rank_scale,
    spearman,
    to_neurons,
    train_autoencoder,
    variant_label,
)
from editors.lora import LoRAConfig, LoRAEditor
from editors.requests import make_request
from editors.testing import tiny_model

REQS = [
    make_request(source="test_geoedit", record=0, case_id="eiffel",
                 prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
                 target_new="Rome", target_true="Paris"),
    make_request(source="test_geoedit", record=1, case_id="darrieux",
                 prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                 target_new="English", target_true="French"),
]


def _snapshot(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _unchanged(lm, snap) -> bool:
    return all(torch.equal(p, snap[n]) for n, p in lm.model.named_parameters())


# ---------------------------------------------------------------------------------------------------------------
# Eq. 9 in the editor: the KL compares the model with τ and with its reconstruction
# ---------------------------------------------------------------------------------------------------------------


class _Capture:
    """Wraps a function of editors.geoedit and records (args, kwargs, result) of every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


def _captured_edit(monkeypatch, lm, overrides, reqs=REQS):
    """Run a GeoEdit edit, capturing both fine-tunings, the AE training (its kl_term) and the geometric step."""
    ft, ae_train = _Capture(finetune), _Capture(train_autoencoder)
    monkeypatch.setattr(finetune_mod, "finetune", ft)
    monkeypatch.setattr(geo_mod, "train_autoencoder", ae_train)
    editor = GeoEditEditor(lm, make_config(GeoEditConfig, overrides, method="geoedit"), seed=0)
    res = editor.edit(reqs)
    (old_args, old_kw, old_run), (new_args, new_kw, new_run) = [c for c in ft.calls]
    (ae_args, ae_kw, _), = ae_train.calls
    return res, editor, {"old": old_run, "new": new_run, "old_examples": old_args[2], "new_examples": new_args[2],
                         "ae": ae_args[0], "kl_term": ae_kw["kl_term"], "X": ae_args[1]}


def test_editor_kl_term_compares_the_model_with_tau_and_with_its_reconstruction(monkeypatch):
    """The KL the editor adds (Eq. 9) is KL(f_{θ0+τ}(x) ‖ f_{θ0+Dec(Enc(τ))}(x)) at the answer positions of the
    task's own prompts, τ_old for task 0 and τ_new for task 1: recomputed here with the deltas applied to the model."""
    lm = tiny_model("llama")
    snap = _snapshot(lm)
    ov = {"layers": (1,), "num_steps": 3, "lr": 5e-2, "ae_steps": 4, "ae_kl_every": 2, "latent_dim": 4}
    res, editor, cap = _captured_edit(monkeypatch, lm, ov)
    assert len(res.artifacts["ae_kl"]) == 2 and (res.artifacts["ae_kl"] > 0).all()
    name = lm.spec.mlp_out_weight(1)
    ae = cap["ae"]

    def answer_logprobs(delta, examples):
        undo = apply_result(lm, dataclasses.replace(res, deltas={name: delta.float()}))
        try:
            out = []
            with torch.no_grad():
                for e in examples:
                    logits = lm.model(input_ids=torch.tensor([e.input_ids])).logits[0]
                    out.append(torch.log_softmax(logits[list(e.positions)].float(), -1))
        finally:
            undo(lm.model)
        return torch.cat(out)

    # the trained AE reconstructs τ so well that the KL is ~7e-5, where float32 rounding of the two computations
    # (the editor's batched forward, this test's per-example one) differs by ~1% on some CPUs; a perturbed AE makes
    # the KL large enough to compare at rtol 1e-3 (the comparison is of the formula, not of the trained AE)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for prm in ae.parameters():
            prm.add_(0.5 * prm.std() * torch.randn(prm.shape, generator=gen, dtype=prm.dtype))
    for task, t in ((0, "old"), (1, "new")):
        tau = cap[t].deltas[name]
        cols = lm.spec.to_canonical(tau).T  # neuron_axis 'in': columns
        scale = float(torch.cat([lm.spec.to_canonical(cap[s].deltas[name]).T for s in ("old", "new")])
                      .double().pow(2).mean().sqrt())
        with torch.no_grad():
            recon = lm.spec.to_param_layout((ae(cols / scale) * scale).T)
        p = answer_logprobs(tau, cap[f"{t}_examples"])
        q = answer_logprobs(recon, cap[f"{t}_examples"])
        expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean")
        with torch.no_grad():
            got = cap["kl_term"](ae, task)
        assert expected > 1e-3 and torch.allclose(got, expected, rtol=1e-3, atol=1e-7), (t, got, expected)
    assert _unchanged(lm, snap)


def test_kl_weight_changes_the_trained_autoencoder(monkeypatch):
    lm = tiny_model("llama")
    ov = {"layers": (1,), "num_steps": 3, "ae_steps": 6, "ae_kl_every": 1, "latent_dim": 4, "ae_lr": 1e-2}
    E = {}
    for lam in (0.0, 0.5):
        _, _, cap = _captured_edit(monkeypatch, lm, {**ov, "ae_kl_weight": lam})
        E[lam] = cap["ae"].E.detach().clone()
    assert not torch.allclose(E[0.0], E[0.5], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Eq. 12-13: importance = EMA over steps of the per-neuron mean of |w · ∂L/∂w|
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("axis", ["in", "out"])
def test_full_finetuning_importance_matches_a_manual_ema(arch, axis):
    lm = tiny_model(arch)
    cfg = make_config(GeoEditConfig, {"layers": (1,), "num_steps": 2, "batch_size": 1, "early_stop_loss": 0.0,
                                      "lr": 1e-2}, method="geoedit")
    editor = GeoEditEditor(lm, cfg, seed=0)
    name = lm.spec.mlp_out_weight(1)
    examples = [editor.encode(r) for r in REQS]
    decay = 0.7
    out = finetune(editor, [name], examples, importance_decay=decay, importance_axis=axis)
    assert out.stats["opt_steps"] == 4
    # manual: Adam on the weight, s = |W ⊙ ∂L/∂W| (canonical), mean over the neuron's d_n parameters, EMA
    params = dict(lm.model.named_parameters())
    W = params[name]
    W0 = W.detach().clone()
    flags = {n: p.requires_grad for n, p in params.items()}
    scores = []
    try:
        for p in params.values():
            p.requires_grad_(False)
        W.requires_grad_(True)
        opt = torch.optim.Adam([W], lr=1e-2)
        for _ in range(2):
            for e in examples:
                opt.zero_grad()
                editor.loss([e]).backward()
                s = lm.spec.to_canonical((W.detach() * W.grad).abs())
                scores.append(s.mean(dim=0 if axis == "in" else 1))
                opt.step()
    finally:
        with torch.no_grad():
            W.copy_(W0)
        W.grad = None
        for n, p in params.items():
            p.requires_grad_(flags[n])
    ema = scores[0]
    for s in scores[1:]:
        ema = decay * ema + (1 - decay) * s
    got = torch.as_tensor(out.importance[name])
    assert got.shape == ema.shape
    assert torch.allclose(got, ema.double(), rtol=1e-4, atol=1e-12)
    # the EMA differs from the last step's score and from the plain mean: the test sees a missing EMA
    assert not torch.allclose(got, scores[-1].double(), rtol=1e-2)
    assert not torch.allclose(got, torch.stack(scores).mean(0).double(), rtol=1e-2)


@pytest.mark.parametrize("axis", ["in", "out"])
def test_lora_importance_ema_starts_at_the_first_informative_step(axis):
    """LoRA starts with B = 0, so step 1's |w · ∂L/∂w| is exactly 0 (A: ∂L/∂A = s·Bᵀ∂L/∂W = 0; B: w = 0). The EMA
    starts at step 2: after 2 steps it IS step 2's score (not (1-d) times it), after 3 steps d·s2 + (1-d)·s3, with
    s_k computed by hand from the adapter after step k-1: ∂L/∂A = s·Bᵀ G, ∂L/∂B = s·G Aᵀ, G = ∂L/∂W at
    W0 + s·B A."""
    lm = tiny_model("llama")
    cfg = make_config(GeoEditConfig, {"layers": (1,), "batch_size": 2, "early_stop_loss": 0.0, "mode": "lora",
                                      "dropout": 0.0}, method="geoedit")
    editor = GeoEditEditor(lm, cfg, seed=0)
    name = lm.spec.mlp_out_weight(1)
    examples = [editor.encode(r) for r in REQS]
    decay = 0.85
    runs = {k: seed_run(editor, finetune, editor, [name], examples, lora=cfg.lora_settings(), lr=cfg.lora_lr,
                        importance_decay=decay, importance_axis=axis, num_steps=k) for k in (1, 2, 3)}
    assert np.all(runs[1].importance[name] == 0)  # nothing informative yet

    W = dict(lm.model.named_parameters())[name]
    W0 = W.detach().clone()

    def score(run) -> torch.Tensor:
        A, B, s = run.lora[name]
        try:
            with torch.no_grad():
                W.copy_(W0 + lm.spec.to_param_layout(s * B @ A))
            W.requires_grad_(True)
            W.grad = None
            editor.loss(examples).backward()
            G = lm.spec.to_canonical(W.grad)
        finally:
            W.requires_grad_(False)
            W.grad = None
            with torch.no_grad():
                W.copy_(W0)
        if axis == "in":
            return (A * (s * B.T @ G)).abs().mean(dim=0)
        return (B * (s * G @ A.T)).abs().mean(dim=1)

    s2, s3 = score(runs[1]), score(runs[2])
    assert float(s2.abs().sum()) > 0
    assert torch.allclose(torch.as_tensor(runs[2].importance[name]), s2.double(), rtol=1e-3, atol=1e-12)
    assert torch.allclose(torch.as_tensor(runs[3].importance[name]), (decay * s2 + (1 - decay) * s3).double(),
                          rtol=1e-3, atol=1e-12)


def seed_run(editor, fn, *args, **kwargs):
    return editor.seeded(fn, *args, **kwargs)


def test_alpha_from_the_old_run_beta_from_the_new_run(monkeypatch):
    lm = tiny_model("llama")
    for norm, f in (("rank", rank_scale), ("minmax", minmax)):
        ov = {"layers": (1,), "num_steps": 3, "ae_steps": 4, "ae_kl_every": 2, "fusion": "importance",
              "importance_norm": norm}
        res, editor, cap = _captured_edit(monkeypatch, lm, ov)
        name = lm.spec.mlp_out_weight(1)
        # the old run was trained on the OLD facts (target_true), the new one on target_new
        tok = lm.tokenizer
        assert [e.labels for e in cap["old_examples"]] == [
            tuple(tok(" " + r.target_true, add_special_tokens=False)["input_ids"]) for r in REQS]
        assert [e.labels for e in cap["new_examples"]] == [
            tuple(tok(" " + r.target_new, add_special_tokens=False)["input_ids"]) for r in REQS]
        I_old, I_new = cap["old"].importance[name], cap["new"].importance[name]
        assert not np.allclose(f(I_old), f(I_new))  # so swapping them would be seen
        assert np.array_equal(res.artifacts["importance_old"], I_old)
        assert np.array_equal(res.artifacts["importance_new"], I_new)
        assert np.allclose(res.artifacts["alpha"], f(I_old))
        assert np.allclose(res.artifacts["beta"], f(I_new))
        assert res.info["alpha_median"] == pytest.approx(float(np.median(f(I_old))))
        assert res.info["beta_mean"] == pytest.approx(float(np.mean(f(I_new))))


# ---------------------------------------------------------------------------------------------------------------
# GeoEdit end to end on a tiny model
# ---------------------------------------------------------------------------------------------------------------
# the paper's importance fusion (Eq. 11-13), geoedit's default; 'geoedit-mw' uses the fixed '+MW' weights
GEO_SMALL = {"layers": (1,), "num_steps": 3, "ae_steps": 20, "ae_kl_every": 10, "fusion": "importance"}


@pytest.mark.parametrize("overrides", [{}, {"fusion": "fixed"}, {"synergistic": False}, {"conflicting": False},
                                       {"importance_norm": "minmax", "phi1": 80.0, "phi2": 100.0}])
def test_editor_delta_matches_a_manual_recomputation(monkeypatch, overrides):
    """From the editor's own τ_old, τ_new (captured fine-tunings) and its trained AE, recompute Sec. 4.3 by hand:
    h = E τ / s, latent angles, Eq. 11's three cases with α, β from the old / new importance, τ_edit = Eᵀ h_edit · s;
    every class is populated so every rule is exercised."""
    lm = tiny_model("llama")
    ov = {**GEO_SMALL, "ae_steps": 20, "ae_kl_every": 10, **overrides}
    res, editor, cap = _captured_edit(monkeypatch, lm, ov)
    cfg = editor.config
    name = lm.spec.mlp_out_weight(1)
    cols = {t: lm.spec.to_canonical(cap[t].deltas[name]).T.double() for t in ("old", "new")}
    scale = float(torch.cat([cols["old"], cols["new"]]).pow(2).mean().sqrt())
    E = cap["ae"].E.detach().double()
    h = {t: (cols[t] / scale).float().double() @ E.T for t in cols}
    cos = (h["old"] * h["new"]).sum(1) / (h["old"].norm(dim=1) * h["new"].norm(dim=1))
    latent = torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))
    assert np.allclose(res.artifacts["latent_angle"], latent.numpy(), atol=1e-3)
    cls = np.where(latent.numpy() < cfg.phi1, 0, np.where(latent.numpy() > cfg.phi2, 2, 1))
    assert np.array_equal(res.artifacts["neuron_class"], cls)
    assert all((cls == c).sum() > 0 for c in (0, 1, 2)), np.bincount(cls)
    if cfg.fusion == "importance":
        f = rank_scale if cfg.importance_norm == "rank" else minmax
        a, b = f(cap["old"].importance[name]), f(cap["new"].importance[name])
    else:
        a, b = np.full(cls.size, 0.3), np.full(cls.size, 1.0)
    a, b = torch.as_tensor(a)[:, None], torch.as_tensor(b)[:, None]
    h_edit = torch.zeros_like(h["new"])
    aligned, conflicting = torch.as_tensor(cls == 0), torch.as_tensor(cls == 2)
    h_edit[aligned] = (a * h["old"] + b * h["new"])[aligned] if cfg.synergistic else h["new"][aligned]
    h_edit[conflicting] = ((-a * h["old"] + b * h["new"])[conflicting] if cfg.conflicting
                           else h["new"][conflicting])
    expected = (h_edit @ E * scale).T
    got = lm.spec.to_canonical(res.deltas[name]).double()
    assert torch.allclose(got, expected, atol=1e-6 * float(expected.abs().max())), (got - expected).abs().max()
    assert res.info["class_counts"] == {"aligned": int((cls == 0).sum()), "orthogonal": int((cls == 1).sum()),
                                        "conflicting": int((cls == 2).sum())}


def test_orthogonal_neurons_get_no_update():
    lm = tiny_model("llama")
    snap = _snapshot(lm)
    # every latent angle is in [0, 180] = [phi1, phi2]: every neuron is 'orthogonal' -> no update at all
    cfg = make_config(GeoEditConfig, {**GEO_SMALL, "phi1": 0.0, "phi2": 180.0}, method="geoedit")
    res = GeoEditEditor(lm, cfg, seed=0).edit(REQS)
    assert _unchanged(lm, snap)
    assert (res.artifacts["neuron_class"] == ORTHOGONAL).all()
    assert all(torch.equal(d, torch.zeros_like(d)) for d in res.deltas.values())
    assert res.info["tau_new_norm"] > 0 and res.info["edit_to_new_norm"] == 0.0
    # the default thresholds: orthogonal neurons (columns of down_proj, neuron_axis 'auto') are exactly zero although
    # their τ_new is not; switching the rule off ('- Orthogonal') gives them an update
    res = GeoEditEditor(lm, make_config(GeoEditConfig, GEO_SMALL, method="geoedit"), seed=0).edit(REQS)
    art = res.artifacts
    assert art["neuron_axis"] == "in"
    D = to_neurons(lm.spec.to_canonical(next(iter(res.deltas.values()))), "in")
    ortho = torch.as_tensor(art["neuron_class"] == ORTHOGONAL)
    assert 0 < int(ortho.sum()) < ortho.numel()
    assert (torch.as_tensor(art["tau_new_norm"])[ortho] > 0).all() and (torch.as_tensor(art["beta"])[ortho] > 0).any()
    weighted = torch.as_tensor((art["alpha"] > 0) | (art["beta"] > 0))  # rank / min-max give the last neuron 0
    assert (D[ortho] == 0).all() and (D[~ortho & weighted].abs().sum(1) > 0).all()
    assert (art["tau_edit_norm"][ortho.numpy()] == 0).all()
    off = GeoEditEditor(lm, make_config(GeoEditConfig, {**GEO_SMALL, "orthogonal": False}, method="geoedit"),
                        seed=0).edit(REQS)
    D_off = to_neurons(lm.spec.to_canonical(next(iter(off.deltas.values()))), "in")
    assert np.array_equal(off.artifacts["neuron_class"], art["neuron_class"])
    assert (D_off[ortho].abs().sum(1) > 0).all()
    assert torch.equal(D_off[~ortho], D[~ortho])


def test_info_and_artifacts_describe_the_edit():
    lm = tiny_model("gpt2")
    res = GeoEditEditor(lm, make_config(GeoEditConfig, {**GEO_SMALL, "ae_steps": 10}, method="geoedit"),
                        seed=0).edit(REQS)
    info, art = res.info, res.artifacts
    n = info["n_neurons"]
    for key in ("raw_angle", "latent_angle", "neuron_class", "tau_old_norm", "tau_new_norm", "tau_edit_norm",
                "importance_old", "importance_new", "alpha", "beta"):
        assert art[key].shape == (n,), key
    assert sum(info["class_counts"].values()) == n
    assert info["class_shares"]["orthogonal"] == pytest.approx(info["class_counts"]["orthogonal"] / n)
    assert info["tau_old_norm"] == pytest.approx(float(np.linalg.norm(art["tau_old_norm"])), rel=1e-6)
    assert info["tau_edit_norm"] == pytest.approx(float(np.linalg.norm(art["tau_edit_norm"])), rel=1e-6)
    delta_norm = float(np.sqrt(sum(float(d.double().pow(2).sum()) for d in res.deltas.values())))
    assert info["edit_to_new_norm"] == pytest.approx(delta_norm / info["tau_new_norm"], rel=1e-5)
    assert info["angle_spearman"] == pytest.approx(spearman(art["latent_angle"], art["raw_angle"]))
    shares = info["tau_new_energy_shares"]
    assert sum(shares.values()) == pytest.approx(1.0)
    ortho = art["neuron_class"] == ORTHOGONAL
    assert shares["orthogonal"] == pytest.approx(float((art["tau_new_norm"][ortho] ** 2).sum()) /
                                                 info["tau_new_norm"] ** 2, rel=1e-6)
    assert info["variant"] == variant_label(res.config) and "paper method" in info["variant"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("module,axis,expected", [("mlp_out", "auto", "in"), ("mlp_in", "auto", "out"),
                                                  ("mlp_out", "out", "out")])
def test_neuron_axis_sets_neurons_importance_and_delta_layout(arch, module, axis, expected):
    """'auto' = the FFN neuron (d_n = hidden size): columns of the MLP output projection, rows of the input ones;
    the neuron count, d_n, importance length and the zero pattern of the delta all follow the resolved axis."""
    lm = tiny_model(arch)
    ov = {**GEO_SMALL, "ae_steps": 10, "module": module, "neuron_axis": axis}
    res = GeoEditEditor(lm, make_config(GeoEditConfig, ov, method="geoedit"), seed=0).edit(REQS)
    art, spec = res.artifacts, lm.spec
    assert art["neuron_axis"] == res.info["neuron_axis"] == expected
    mats = [to_neurons(spec.to_canonical(res.deltas[p]), expected) for p in art["param_names"]]
    assert res.info["n_neurons"] == sum(m.shape[0] for m in mats) == art["alpha"].shape[0] == art["beta"].shape[0]
    assert {m.shape[1] for m in mats} == {res.info["d_n"]}
    if axis == "auto":
        assert res.info["d_n"] == spec.hidden_size and mats[0].shape[0] == spec.mlp_size
    ortho = torch.as_tensor(art["neuron_class"] == ORTHOGONAL)
    assert (torch.cat(mats)[ortho] == 0).all()


def test_neuron_helpers_and_column_importance_in_lora_mode():
    W = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(to_neurons(W, "out"), W) and torch.equal(to_neurons(W, "in"), W.T)
    assert torch.equal(from_neurons(to_neurons(W, "in"), "in"), W)
    lm = tiny_model("llama")
    ov = {**GEO_SMALL, "ae_steps": 10, "mode": "lora"}
    res = GeoEditEditor(lm, make_config(GeoEditConfig, ov, method="geoedit"), seed=0).edit(REQS)
    # column neurons of down_proj [hidden, mlp]: importance from the columns of A, one per MLP neuron
    assert res.info["n_neurons"] == lm.spec.mlp_size and res.artifacts["importance_new"].shape == (lm.spec.mlp_size,)
    assert (res.artifacts["importance_new"] > 0).all()
    with pytest.raises(ValueError, match="neuron_axis"):
        make_config(GeoEditConfig, {"neuron_axis": "rows"}, method="geoedit")
    for bad in ({"ae": "tanh"}, {"importance_norm": "zscore"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_config(GeoEditConfig, bad, method="geoedit")


def test_relu_autoencoder_option_still_trains():
    lm = tiny_model("llama")
    cfg = make_config(GeoEditConfig, {**GEO_SMALL, "ae": "mlp-relu", "ae_steps": 100, "ae_kl_every": 50,
                                      "ae_lr": 3e-3}, method="geoedit")
    res = GeoEditEditor(lm, cfg, seed=0).edit(REQS)
    curve = res.artifacts["ae_mse_curve"]
    assert curve.shape == (100,)
    assert curve[-20:].mean() < 0.7 * curve[:5].mean(), (curve[:5], curve[-20:])
    assert len(res.artifacts["ae_kl"]) == 2 and np.isfinite(res.artifacts["ae_kl"]).all()


def test_linear_latent_dim_larger_than_d_n_is_refused():
    lm = tiny_model("llama")
    cfg = make_config(GeoEditConfig, {**GEO_SMALL, "latent_dim": lm.spec.hidden_size + 1}, method="geoedit")
    with pytest.raises(EditError, match="latent_dim"):
        GeoEditEditor(lm, cfg, seed=0).edit(REQS)


def test_fixed_weights_ablation_uses_fixed_alpha_beta():
    lm = tiny_model("gpt2")
    cfg = make_config(GeoEditConfig, {**GEO_SMALL, "ae_steps": 10, "fusion": "fixed"}, method="geoedit")
    res = GeoEditEditor(lm, cfg, seed=0).edit(REQS)
    assert (res.artifacts["alpha"] == 0.3).all() and (res.artifacts["beta"] == 1.0).all()


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_delta_is_b_a_scale_and_model_unchanged(arch):
    lm = tiny_model(arch)
    snap = _snapshot(lm)
    modules = [(n, type(m)) for n, m in lm.model.named_modules()]
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    cfg = make_config(LoRAConfig, {"layers": (1, 2), "num_steps": 3, "rank": 4, "alpha": 8.0}, method="lora")
    res = LoRAEditor(lm, cfg, seed=0).edit(REQS)
    assert _unchanged(lm, snap)
    assert [(n, type(m)) for n, m in lm.model.named_modules()] == modules, "the adapter was not removed"
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == flags
    assert not hasattr(lm.model, "peft_config")
    for name, d in res.deltas.items():
        A = torch.as_tensor(res.artifacts["lora_A"][name])
        B = torch.as_tensor(res.artifacts["lora_B"][name])
        assert A.shape[0] == 4 and B.shape[1] == 4
        assert res.artifacts["lora_scale"][name] == 2.0
        assert torch.equal(d, lm.spec.to_param_layout(B @ A * 2.0).contiguous())
        assert d.abs().max() > 0
    # applying the delta reproduces the adapted model's function: the edit lowered the loss
    assert res.info["loss_final"] < res.info["loss_initial"]


# ---------------------------------------------------------------------------------------------------------------
# F-Learning
# ---------------------------------------------------------------------------------------------------------------
def test_flearning_subtracts_lambda_tau_old_then_learns():
    lm = tiny_model("llama")
    snap = _snapshot(lm)
    common = {"layers": (1,), "num_steps": 3, "batch_size": 2}
    lam = 0.5
    res = FLearningEditor(lm, make_config(FLearningConfig, {**common, "forget_lambda": lam}), seed=0).edit(REQS)
    assert _unchanged(lm, snap)
    name = next(iter(res.deltas))
    # τ_old is what plain fine-tuning on the OLD facts gives (ft editor, same loop, same settings)
    old_reqs = [dataclasses.replace(r, target_new=r.target_true) for r in REQS]
    tau_old = FTEditor(lm, make_config(FTConfig, common), seed=0).edit(old_reqs).deltas[name]
    assert torch.allclose(torch.as_tensor(res.artifacts["tau_old"][name]), tau_old, atol=1e-6)
    # the rest of the delta is fine-tuning on the NEW facts from θ' = θ0 − λ τ_old
    forget = dataclasses.replace(res, deltas={name: -lam * tau_old}, factors={})
    undo = apply_result(lm, forget)
    try:
        learn = FTEditor(lm, make_config(FTConfig, common), seed=0).edit(REQS).deltas[name]
    finally:
        undo(lm.model)
    assert _unchanged(lm, snap)
    assert torch.allclose(res.deltas[name], -lam * tau_old + learn, atol=1e-5)
    assert not torch.allclose(res.deltas[name], learn, atol=1e-5)


def test_flearning_and_geoedit_need_target_true():
    lm = tiny_model("llama")
    req = make_request(source="test_geoedit", record=2, case_id="no-old", prompt="The Louvre is in",
                       subject="The Louvre", target_new="Rome")
    for editor in (FLearningEditor(lm, make_config(FLearningConfig, {"layers": (1,), "num_steps": 1})),
                   GeoEditEditor(lm, make_config(GeoEditConfig, {**GEO_SMALL, "num_steps": 1}))):
        with pytest.raises(EditError, match="target_true"):
            editor.edit([req])


def test_edit_with_details_reuses_given_fine_tunings():
    """Variants compared on the same task vectors: reusing ``details.runs`` gives the same edit as fine-tuning again
    (CPU fine-tuning is deterministic), and mismatched runs are refused."""
    lm = tiny_model("llama")
    cfg = make_config(GeoEditConfig, {**GEO_SMALL, "ae_steps": 10}, method="geoedit")
    res, details = GeoEditEditor(lm, cfg, seed=0).edit_with_details(REQS)
    again, _ = GeoEditEditor(lm, cfg, seed=0).edit_with_details(REQS, runs=details.runs)
    assert all(torch.equal(again.deltas[n], res.deltas[n]) for n in res.deltas)
    assert torch.equal(details.fusion.tau_edit, _.fusion.tau_edit)
    other = make_config(GeoEditConfig, {**GEO_SMALL, "ae_steps": 10, "neuron_axis": "out"}, method="geoedit")
    with pytest.raises(EditError, match="do not match"):
        GeoEditEditor(lm, other, seed=0).edit_with_details(REQS, runs=details.runs)


def test_geoedit_is_the_paper_method_and_geoedit_mw_names_the_deviation():
    from editors.geoedit import GeoEditMWConfig, GeoEditMWEditor
    from editors.presets import build_config
    from editors.registry import get_editor_class
    paper, _ = build_config("geoedit", "default", use_preset=False)
    mw, _ = build_config("geoedit-mw", "default", use_preset=False)
    assert paper.fusion == "importance" and paper.importance_norm == "rank" and type(paper) is GeoEditConfig
    assert isinstance(mw, GeoEditMWConfig) and mw.fusion == "fixed" and (mw.fixed_alpha, mw.fixed_beta) == (0.3, 1.0)
    cls = get_editor_class("geoedit-mw")
    assert cls is GeoEditMWEditor and issubclass(cls, GeoEditEditor) and "+MW" in cls.summary
    assert "paper" in get_editor_class("geoedit").summary
    # both share every field but fusion's default
    assert {f for f in paper.to_dict()} == {f for f in mw.to_dict()}
    assert {k for k, v in paper.to_dict().items() if mw.to_dict()[k] != v} == {"fusion"}
