"""The editor contract's shared pieces: config validation, apply / exact undo, NaN refusal."""
from dataclasses import dataclass, field

import pytest
import torch

from editors.base import ConfigError, EditError, EditorConfig, EditResult, apply_result, make_config
from editors.registry import UnknownMethodError, get_editor_class


@dataclass
class _Cfg(EditorConfig):
    layers: tuple[int, ...] = field(default=(4, 5), metadata={"help": "layers"})
    lr: float = field(default=0.5, metadata={"help": "learning rate"})
    steps: int = field(default=10, metadata={"help": "steps"})
    adjust: bool = field(default=True, metadata={"help": "flag"})

    def validate(self):
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


def test_make_config_coerces_cli_strings():
    cfg = make_config(_Cfg, {"layers": "3,4,5", "lr": "0.1", "steps": "7", "adjust": "false"})
    assert cfg.layers == (3, 4, 5) and cfg.lr == 0.1 and cfg.steps == 7 and cfg.adjust is False
    assert make_config(_Cfg, {"layers": "[6]"}).layers == (6,)


def test_make_config_unknown_key_lists_valid_fields():
    with pytest.raises(ConfigError) as e:
        make_config(_Cfg, {"lrr": 1}, method="demo")
    msg = str(e.value)
    assert "lrr" in msg and "did you mean lr" in msg and "adjust, layers, lr, steps" in msg


def test_make_config_validation_error_is_config_error():
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        make_config(_Cfg, {"steps": "0"})


def test_field_help_lists_every_field():
    names = [f["name"] for f in _Cfg.field_help()]
    assert names == ["layers", "lr", "steps", "adjust"]
    assert all(f["help"] for f in _Cfg.field_help())


def test_apply_and_exact_undo(tiny_llama):
    lm = tiny_llama
    name = lm.spec.mlp_out_weight(1)
    p = dict(lm.model.named_parameters())[name]
    before = p.detach().clone()
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(p.shape, generator=g) * 1e-3
    R = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
    name2 = lm.spec.mlp_out_weight(2)
    p2 = dict(lm.model.named_parameters())[name2]
    before2 = p2.detach().clone()
    undo = apply_result(lm, EditResult("demo", deltas={name: delta}, factors={name2: R}))
    assert not torch.equal(p, before)
    assert torch.allclose(p2, R @ before2, atol=1e-6)
    undo(lm.model)
    assert torch.equal(p, before) and torch.equal(p2, before2)


def test_apply_factor_on_conv1d_acts_on_output_dim(tiny_gpt2):
    lm = tiny_gpt2
    name = lm.spec.mlp_out_weight(0)
    p = dict(lm.model.named_parameters())[name]
    W = lm.spec.to_canonical(p.detach().clone())  # [64, 128]
    R = torch.linalg.qr(torch.randn(64, 64))[0]
    undo = apply_result(lm, EditResult("demo", factors={name: R}))
    assert torch.allclose(lm.spec.to_canonical(p), R @ W, atol=1e-6)
    undo(lm.model)
    assert torch.equal(lm.spec.to_canonical(p), W)


def test_apply_refuses_nan_and_bad_shapes_without_changing_the_model(tiny_llama):
    lm = tiny_llama
    name = lm.spec.mlp_out_weight(0)
    p = dict(lm.model.named_parameters())[name]
    before = p.detach().clone()
    bad = torch.zeros_like(p)
    bad[0, 0] = float("nan")
    with pytest.raises(EditError, match="NaN"):
        apply_result(lm, EditResult("demo", deltas={name: bad}))
    with pytest.raises(EditError, match="shape"):
        apply_result(lm, EditResult("demo", deltas={name: torch.zeros(3, 3)}))
    with pytest.raises(EditError, match="unknown parameter"):
        apply_result(lm, EditResult("demo", deltas={"nope.weight": torch.zeros(3)}))
    assert torch.equal(p, before)


def test_unknown_method_lists_valid_and_suggests():
    with pytest.raises(UnknownMethodError) as e:
        get_editor_class("romee")
    assert "unknown method 'romee'" in str(e.value)
    assert "Valid methods:" in str(e.value)
