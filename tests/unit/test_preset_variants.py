"""Preset variants (editors/presets): 'reference' per method, on top of the model's entry; the run field and the CLI."""
from __future__ import annotations

import json

import pytest

from app.cli import main
from app.runconfig import RunConfig
from editors.base import ConfigError
from editors.presets import PresetError, build_config, load_preset, preset_variants, variant_config

#: what each method's reference variant must set (docs/reference_agreement.md)
REFERENCE = {
    "rome": {"early_stop_prob": 0.0},
    "memit": {},
    "alphaedit": {"nullspace_rule": "absolute", "nullspace_threshold": 0.02},
    "emmet": {},
    "pmet": {"z_attention": True, "adaptive_nll": True},
}


@pytest.mark.parametrize("method", sorted(REFERENCE))
def test_reference_variant_is_the_preset_plus_its_fields(method):
    base = load_preset(method, "default")
    ref = load_preset(method, "default", "reference")
    assert variant_config(method, "reference") == REFERENCE[method]
    assert ref.config == {**base.config, **REFERENCE[method]} and ref.variant == "reference"
    assert ref.version == base.version and ref.model == base.model
    text = preset_variants(method)["reference"]
    assert "EasyEdit 14cea82" in text and "docs/reference_agreement.md" in text


def test_variant_without_a_model_entry_applies_to_the_defaults():
    p = load_preset("alphaedit", "/some/other/model", "reference")
    assert p.model == "" and p.config == REFERENCE["alphaedit"]
    assert load_preset("alphaedit", "/some/other/model") is None


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(PresetError, match=r"no preset variant 'referenc'.*variants: reference"):
        load_preset("rome", "default", "referenc")
    with pytest.raises(PresetError, match=r"variants: none"):
        variant_config("ft", "reference")


def test_run_config_uses_the_variant_and_checks_it():
    cfg, version = RunConfig(method="alphaedit", preset_variant="reference").method_config()
    assert cfg.nullspace_rule == "absolute" and cfg.nullspace_threshold == 0.02 and version is not None
    assert build_config("alphaedit", variant="reference") == (cfg, version)  # the run uses the one builder
    plain, _ = build_config("alphaedit")
    assert plain.nullspace_rule != "absolute"  # the variant changed something
    cfg, _ = RunConfig(method="rome", preset_variant="reference",
                       method_overrides={"early_stop_prob": "0.5"}).method_config()
    assert cfg.early_stop_prob == 0.5  # overrides still win
    with pytest.raises(ConfigError, match="variants: reference"):
        RunConfig(method="rome", preset_variant="paper").validate()
    with pytest.raises(ConfigError, match="needs the preset"):
        RunConfig(method="rome", preset_variant="reference", use_preset=False).validate()


def test_methods_command_shows_the_variants(capsys):
    assert main(["methods", "rome"]) == 0
    out = capsys.readouterr().out
    assert "preset variants (run --preset VARIANT):" in out and "Sets: early_stop_prob=0.0." in out
    assert "0.955" in out and "1.18" in out and "1.31" in out  # what the templates and the old early stop change
    assert main(["methods", "pmet", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "z_attention=True" in info[0]["preset_variants"]["reference"]


def test_run_preset_flag_reaches_the_run_config(tmp_path, capsys):
    """`python -m app run --preset VARIANT` is checked before anything runs (a method without the variant: exit 2)."""
    code = main(["run", "--method", "ft", "--preset", "reference", "--runs-dir", str(tmp_path / "runs"),
                 "--no-progress"])
    assert code == 2 and "has no preset variant 'reference'" in capsys.readouterr().err
