"""editors.presets.build_config: defaults, then the (method, model) preset, then the caller's overrides."""
from __future__ import annotations

import os

import pytest

from editors import presets
from editors.base import ConfigError, make_config
from editors.presets import build_config, load_preset
from editors.registry import UnknownMethodError, get_editor_class


@pytest.fixture()
def rome_preset(monkeypatch):
    """A preset of rome for the models "tiny-preset" and "tiny-llama" (the tiny test model's name) whose values differ
    from the defaults (the shipped ones equal them)."""
    real = presets.load_preset

    def load(method, model_name="default"):
        if method == "rome" and os.path.basename(model_name) in ("tiny-preset", "tiny-llama"):
            return presets.Preset(method="rome", model="tiny-preset", version=7,
                                  config={"layer": 2, "v_lr": 0.1, "context_templates": "memit"})
        return real(method, model_name)
    monkeypatch.setattr(presets, "load_preset", load)


def test_preset_then_overrides_on_top_of_the_defaults(rome_preset):
    defaults = make_config(get_editor_class("rome").config_cls)
    cfg, version = build_config("rome", "tiny-preset")
    assert version == 7 and (cfg.layer, cfg.v_lr, cfg.context_templates) == (2, 0.1, "memit")
    assert cfg.v_num_grad_steps == defaults.v_num_grad_steps  # not in the preset: the default
    # overrides win over the preset (strings coerced); the preset's other fields stay
    cfg2, _ = build_config("ROME", "/models/tiny-preset", {"layer": "3"})
    assert (cfg2.layer, cfg2.v_lr, cfg2.context_templates) == (3, 0.1, "memit")
    # use_preset=False: defaults and overrides only
    cfg3, version3 = build_config("rome", "tiny-preset", {"layer": "3"}, use_preset=False)
    assert version3 is None and cfg3 == make_config(get_editor_class("rome").config_cls, {"layer": 3})


def test_the_shipped_preset_of_the_default_model():
    preset = load_preset("rome", "default")
    cfg, version = build_config("rome", "default")
    assert version == preset.version >= 1
    assert cfg == make_config(get_editor_class("rome").config_cls, preset.config, method="rome")


def test_without_a_preset_the_defaults():
    cls = get_editor_class("rome")
    cfg, version = build_config("rome", "default", {"layer": 2}, use_preset=False)
    assert version is None and cfg == make_config(cls.config_cls, {"layer": 2})
    # a model without a preset entry: the defaults too (version None)
    cfg, version = build_config("rome", "/no/such/model-dir")
    assert version is None and cfg == make_config(cls.config_cls)


def test_preset_found_by_the_path_basename(tmp_path):
    preset = load_preset("rome", "default")
    path = os.path.join(str(tmp_path), "default")  # a model directory named like a preset entry
    cfg, version = build_config("rome", path)
    assert version == preset.version and cfg.layer == preset.config["layer"]


def test_errors_name_the_method_and_field():
    with pytest.raises(UnknownMethodError, match="Did you mean rome"):
        build_config("rmoe")
    with pytest.raises(ConfigError, match="unknown config field 'layr' for method rome"):
        build_config("rome", "default", {"layr": 3})
    with pytest.raises(ConfigError, match="config field 'layer' of rome"):
        build_config("rome", "default", {"layer": "five"})


def test_a_run_and_the_playground_edit_with_the_same_config(rome_preset, tiny_llama):
    """The Playground's edit (app.playground.compute_result) and a run of the same method on the same model use one
    config: preset, then the same overrides."""
    from app.playground import compute_result
    from app.runconfig import RunConfig
    overrides = {"v_num_grad_steps": "2"}
    run_cfg, version = RunConfig(model=tiny_llama.name, method="rome", method_overrides=overrides).method_config()
    request = {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
               "target_new": "Rome", "target_true": "Paris"}
    result = compute_result(tiny_llama, {"method": "rome", "overrides": overrides, "request": request})
    assert version == 7 and (run_cfg.layer, run_cfg.v_num_grad_steps) == (2, 2)
    assert result.config == run_cfg.to_dict()
    assert list(result.deltas) == [tiny_llama.spec.mlp_out_weight(2)]  # the preset's layer, not the default
