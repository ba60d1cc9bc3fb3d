"""The collapse study's lifelong additions on a tiny random model: preset variants as their own rows
(``ultraedit:no_ln``), a memory editor (GRACE: exactly flat weights), the WILD columns, and the ``lifelong`` preset."""
from __future__ import annotations

import dataclasses
import json

import pytest

from analysis import evaluation as ev
from app.runconfig import RunConfig
from app.study import STUDY_PRESETS, WILD_COLUMNS, collapse_study, split_method, study_preset
from editors.base import ConfigError
from editors.registry import collapse_study_methods
from editors.testing import tiny_model
from tests.unit.test_study import RECORDS

SMALL = {"ultraedit": {"layers": (1, 2), "chunk_size": 1, "lr": 1e-2}, "grace": {"layer": 2, "n_iter": 3}}


def test_lifelong_methods_in_the_study(tmp_path):
    assert {"ultraedit", "grace"} <= set(collapse_study_methods())
    data = tmp_path / "edits.json"
    data.write_text(json.dumps(RECORDS))
    lm = tiny_model("llama", seed=21)
    table = collapse_study(["ultraedit", "ultraedit:no_ln", "grace"], 3, str(data), str(tmp_path / "runs"),
                           eval_every=2, method_overrides=SMALL, lm=lm, protocols=(ev.TF, ev.WILD),
                           run_overrides={"wild_max_tokens": 2, "update_angles": False})
    assert list(table["method"]) == ["ultraedit", "ultraedit:no_ln", "grace"]
    assert (table["status"] == "finished").all(), table[["method", "status"]]
    assert set(WILD_COLUMNS) <= set(table.columns)
    assert table["reliability_wild"].notna().all() and table["probe_locality_wild"].notna().all()
    rows = table.set_index("method")
    assert rows.loc["grace", "fro_rel"] == 1.0 and rows.loc["grace", "cond_rel"] == 1.0  # weights never change
    assert rows.loc["ultraedit", "run_id"] != rows.loc["ultraedit:no_ln", "run_id"]
    assert rows.loc["ultraedit", "fro_rel"] != rows.loc["ultraedit:no_ln", "fro_rel"]


def test_lifelong_preset():
    assert split_method("ultraedit:no_ln") == ("ultraedit", "no_ln") and split_method("rome") == ("rome", "")
    preset = STUDY_PRESETS["lifelong"]
    assert preset["n"] >= 1000 and ev.WILD in preset["protocols"]
    assert {"ultraedit", "ultraedit:no_ln", "grace", "mose", "alphaedit", "rome", "memit"} <= set(preset["methods"])
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    if "checkpoint_schedule" in fields:
        assert study_preset("lifelong")["run"]["checkpoint_schedule"] == "geometric"
    else:  # the geometric schedule is issue 16's: until it is merged the preset says what it needs
        with pytest.raises(ConfigError, match="checkpoint_schedule"):
            study_preset("lifelong")
    with pytest.raises(ConfigError, match="lifelong"):
        study_preset("lifelnog")
