"""The reference-comparison driver (benchmarks/compare_reference.py) without EasyEdit: the hyper-parameter mapping,
the agreement figures and the EasyEdit-side stand-ins."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from benchmarks import compare_reference as cr


@pytest.mark.parametrize("method", cr.METHODS)
def test_easyedit_hparams_map_the_reference_variant(method, tiny_llama, tmp_path):
    _, cfg = cr.method_config(method, "default", "reference", None)
    stats = {"stats_dir": "S", "mom2_dataset": "pydoc", "mom2_n_samples": 40000, "mom2_dtype": "float64"}
    hp = cr.easyedit_hparams(method, cfg, tiny_llama, "M", stats, str(tmp_path))
    assert hp["rewrite_module_tmp"] == "model.layers.{}.mlp.down_proj"
    assert hp["mlp_module_tmp"] == ("model.layers.{}.mlp.down_proj" if method == "pmet" else "model.layers.{}.mlp")
    assert hp["layer_module_tmp"] == "model.layers.{}" and hp["ln_f_module"] == "model.norm"
    assert hp["lm_head_module"] == "model.embed_tokens"  # tied: EasyEdit reads <module>.weight as the unembedding
    assert hp["v_loss_layer"] == tiny_llama.spec.n_layers - 1 and hp["fact_token"] == "subject_last"
    for ours, theirs in (("v_num_grad_steps", "v_num_grad_steps"), ("v_lr", "v_lr"),
                         ("v_weight_decay", "v_weight_decay"), ("clamp_norm_factor", "clamp_norm_factor"),
                         ("kl_factor", "kl_factor")):
        assert hp[theirs] == getattr(cfg, ours)
    assert {k: hp[k] for k in stats} == stats
    if method == "rome":
        assert hp["layers"] == [5] and hp["mom2_adjustment"] is False
    else:
        assert hp["layers"] == list(cfg.layers)
        assert hp["mom2_update_weight"] == getattr(cfg, "mom2_update_weight", 0.0)  # unused by AlphaEdit
    if method == "alphaedit":
        assert hp["nullspace_threshold"] == 0.02 and hp["L2"] == cfg.alpha
    if method == "pmet":
        assert hp["attn_module_tmp"] == "model.layers.{}.self_attn.o_proj" and hp["nll_loss_factor"] == 1.0
    else:
        assert hp["attn_module_tmp"] == "model.layers.{}.self_attn"


def test_agreement_figures():
    a = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    b = a * 1.1
    rows = {r["tensor"]: r for r in cr.agreement({"dW.1": a, "dW.2": a, "z.0": a[0]},
                                                 {"dW.1": a, "dW.2": b, "z.0": a[0]})}
    assert rows["dW.1"]["rel"] == 0 and abs(rows["dW.1"]["1-cos"]) < 1e-15
    assert math.isclose(rows["dW.2"]["rel"], 0.1) and math.isclose(rows["dW.2"]["ratio"], 1 / 1.1)
    assert math.isclose(rows["dW.all"]["rel"], 0.1 / math.sqrt(2))
    assert "dW.all" in rows and set(rows) == {"dW.1", "dW.2", "dW.all", "z.0"}


def test_standins_import_anything(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    for name in list(sys.modules):
        if name.split(".")[0] in cr.STANDIN_PACKAGES:
            monkeypatch.delitem(sys.modules, name)
    cr._install_standins()
    cr._install_standins()
    assert sum(isinstance(f, cr._StandinFinder) for f in sys.meta_path) == 1
    import timm.models.layers as layers  # noqa: F401  (a stand-in)

    class Block(layers.DropPath):  # a subclass of a stand-in attribute works
        pass

    Block(0.1)
    monkeypatch.delitem(sys.modules, "timm.models.layers")
    monkeypatch.delitem(sys.modules, "timm.models")
    monkeypatch.delitem(sys.modules, "timm")
