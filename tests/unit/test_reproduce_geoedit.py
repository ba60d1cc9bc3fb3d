"""The GeoEdit reproduction (app/reproduce/geoedit.py) end to end on a tiny model: every table and figure is filled,
the paper's numbers stand beside the right rows, and GeoEdit variants share their fine-tunings."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

from app.reproduce.geoedit import PAPER_TABLE1, PAPER_TABLE2, TABLE1_ROWS, Row, load_dataset, reproduce_geoedit
from editors.requests import make_request
from editors.testing import tiny_model

FACTS = [make_request(source="t", record=i, case_id=f"c{i}", prompt=p, subject=s, target_new=new, target_true=old,
                      rephrase_prompts=[rp], locality_prompts=[lp], locality_answers=[la])
         for i, (p, s, new, old, rp, lp, la) in enumerate([
             ("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris",
              "Where is the Eiffel Tower? It is in", "The capital of Japan is", "Tokyo"),
             ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French",
              "Danielle Darrieux speaks natively", "The Louvre is in", "Paris")])]
TINY = {"geoedit": {"layers": (1,), "num_steps": 2, "ae_steps": 2, "ae_kl_every": 2}}
ROWS = tuple(r for r in TABLE1_ROWS if r.label in ("Original model", "GeoEdit_FT (paper: importance fusion)",
                                                 "GeoEdit_FT +MW (geoedit-mw)"))


def test_reproduction_on_a_tiny_model(tmp_path):
    lm = tiny_model("llama")
    rep = reproduce_geoedit(lm, n=2, datasets=("zsre",), rows=ROWS, requests={"zsre": FACTS}, settings=TINY)
    t1 = rep.table1
    assert list(t1["row"]) == [r.label for r in ROWS] and set(t1["dataset"]) == {"zsre"}
    for r in t1.itertuples():
        paper = PAPER_TABLE1[r.dataset][r.paper_row]
        assert r.paper_reliability == paper[0] and (math.isnan(r.paper_locality) if paper[2] is None
                                                    else r.paper_locality == paper[2])
        assert 0 <= r.reliability <= 1 and 0 <= r.locality <= 1
    assert (t1[["reliability_se", "generality_se", "locality_se"]] >= 0).all().all()
    orig = t1[t1["row"] == "Original model"]
    assert (orig["locality"] == 1.0).all()  # agreement with itself
    geo = t1[t1["row"].str.startswith("GeoEdit")]
    assert geo["variant"].str.contains("paper method").sum() == 1 and geo["variant"].str.contains(r"\+MW").sum() == 1
    assert list(rep.table2["row"]) == list(PAPER_TABLE2) and (rep.table2["edit_to_new_norm"] >= 0).all()
    s3 = rep.fig3_summary
    assert list(zip(s3["ae"], s3["space"])) == [("linear", "raw"), ("linear", "latent"), ("mlp-relu", "latent")]
    sw = rep.sweep[rep.sweep["ae"] == "linear"]
    assert np.allclose(sw.loc[sw["raw"] == 180.0, "latent"], 180.0, atol=1e-3)  # orientation kept
    assert set(rep.fig4_summary["norm"]) == {"rank", "minmax"}
    assert set(rep.fig4["label"]) == {"|τ_old|", "|τ_new|", "α", "β"}
    text = rep.markdown()
    assert "**Table 1, zsre**" in text and "| GeoEdit_FT +MW (geoedit-mw) |" in text
    assert "**Fig. 3**" in text and "**Fig. 4**" in text
    paths = rep.write(str(tmp_path))
    assert all(os.path.exists(p) for p in paths) and os.path.basename(paths[-1]) == "geoedit.md"


def test_rows_and_data_errors():
    assert all(r.paper in PAPER_TABLE1["counterfact"] for r in TABLE1_ROWS)
    assert isinstance(ROWS[0], Row) and ROWS[0].method is None
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("wiki", 2)
