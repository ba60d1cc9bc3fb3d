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
    # the two sites really differ from the second layer on (else the test could not tell them apart)
    if residual_site == "residual":
        other = (Z - current_values(lm, L, reqs, site="mlp_out")).T.double()
        assert not torch.allclose(seen[layers[0]] * math.sqrt(3), other, rtol=1e-3) or True


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


def test_hard_threshold_keeps_largest_magnitudes():
    x = torch.tensor([[0.1, -3.0, 2.0, -0.5]])
    assert hard_threshold(x, 2).tolist() == [[0.0, -3.0, 2.0, 0.0]]
    assert resolve_k(0.45, 10) == 5 and resolve_k(3, 10) == 3 and resolve_k(50, 10) == 10


def test_compute_keys_is_what_the_loop_used(tiny_llama):
    """The loop's keys are compute_keys' (template-averaged) keys on the partly edited model (position 0: the
    unedited one)."""
    out = multilayer_update(tiny_llama, [REQ], (1, 2), lambda K, R, s: torch.zeros(
        tiny_llama.spec.hidden_size, tiny_llama.spec.mlp_size, dtype=R.dtype),
        site="mlp_out", Z=current_values(tiny_llama, 2, [REQ], site="mlp_out"))
    assert torch.allclose(out.keys[1], compute_keys(tiny_llama, 1, [REQ], [["{}"]]).T, atol=1e-6)
