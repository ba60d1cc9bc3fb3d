"""The target-value optimisation z / v* (editors/targets.py): the fast path against the plain reference."""
from __future__ import annotations

import math

import pytest
import torch

from editors import targets
from editors.requests import make_request
from editors.testing import tiny_model
from tests.unit.test_keys import REQ, REQ2, TEMPLATES


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("site", ["mlp_out", "residual"])
def test_target_values_fast_matches_reference_and_reduces_loss(arch, site):
    lm = tiny_model(arch)
    kw = dict(site=site, templates=TEMPLATES, steps=6, lr=0.5, weight_decay=1e-3, clamp_norm_factor=4.0,
              kl_factor=0.0625, early_stop_loss=0.0)
    Zf, info_f = targets.compute_target_values(lm, [REQ, REQ2], 1, fast=True, **kw)
    Zr, info_r = targets.compute_target_values(lm, [REQ, REQ2], 1, fast=False, **kw)
    assert Zf.shape == (2, lm.spec.hidden_size)
    torch.testing.assert_close(Zf, Zr, rtol=1e-4, atol=1e-5)
    for a, b in zip(info_f["loss"], info_r["loss"]):
        assert math.isclose(a, b, rel_tol=1e-4)
    # the optimisation lowers the NLL of the target (first forward: delta = 0)
    Z0, info0 = targets.compute_target_values(lm, [REQ, REQ2], 1, fast=True, **{**kw, "steps": 1})
    torch.testing.assert_close(Z0, info0["init"])
    for before, after in zip(info0["nll"], info_f["nll"]):
        assert after < before
    # clamp: ||z - init|| <= clamp * ||init||
    for z, init in zip(Zf, info_f["init"]):
        assert (z - init).norm() <= 4.0 * init.norm() * (1 + 1e-5)


def test_target_values_reach_the_target_on_a_tiny_model():
    """A random tiny model's logits are bounded by its final norm (|logit| <= ~1.3, p <= ~1e-4 for any token), so
    the unembedding is scaled up; the prompt ends with the subject so the target is read where delta is added."""
    lm = tiny_model("llama", tie=False)
    with torch.no_grad():
        lm.model.get_output_embeddings().weight.mul_(50.0)
    req = make_request(source="test_targets", record=2, case_id="bare", prompt="Danielle Darrieux",
                       subject="Danielle Darrieux", target_new="English")
    for site in ("residual", "mlp_out"):
        Z, info = targets.compute_target_values(lm, [req], 2, site=site, templates=["{}"], steps=30, lr=1.0,
                                               weight_decay=0.0, clamp_norm_factor=100.0, kl_factor=0.0)
        assert info["target_prob"][0] > 0.95
        assert info["steps"][0] < 29  # stopped early at loss < 5e-2


def test_target_values_loss_layer(tiny_gpt2):
    Z, info = targets.compute_target_values(tiny_gpt2, [REQ], 1, templates=TEMPLATES, steps=3, loss_layer=2)
    Zr, info_r = targets.compute_target_values(tiny_gpt2, [REQ], 1, templates=TEMPLATES, steps=3, loss_layer=2,
                                              fast=False)
    torch.testing.assert_close(Z, Zr, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="loss layer"):
        targets.compute_target_values(tiny_gpt2, [REQ], 2, templates=TEMPLATES, loss_layer=1)


def test_target_values_leave_the_model_alone(tiny_llama):
    before = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in tiny_llama.model.named_parameters()}
    targets.compute_target_values(tiny_llama, [REQ], 1, templates=TEMPLATES, steps=2)
    for n, p in tiny_llama.model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None
    assert not tiny_llama.model.training
