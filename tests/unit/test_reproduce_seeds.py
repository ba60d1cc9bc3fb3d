"""The AdaEdit, MOSE and AGRADE reproductions (app/reproduce/{adaedit,mose,agrade}.py) run end to end in --quick
mode on a tiny model (the methods' registry `tiny` overrides as --set) and return the interface's table with the
paper's numbers beside finite numbers of ours; a bad option is an error naming it."""
from __future__ import annotations

import math

import pytest

from app.reproduce import ReproduceError, make_args, reproduce
from editors.registry import method_info
from tests.conftest import shared_path


def _sets(*methods):
    out = []
    for m in methods:
        for k, v in method_info(m).tiny.items():
            out.append(f"{m}.{k}={','.join(map(str, v)) if isinstance(v, (tuple, list)) else v}")
    return out


def _args(paper, lm, tmp_path, sets, **options):
    shared_path("counterfact", "counterfact-edit.json")
    return make_args(paper, quick=True, out=str(tmp_path / paper), lm=lm, sets=sets, options=options)


@pytest.mark.timeout(900)
def test_adaedit_reproduction_quick(tiny_llama, tmp_path):
    args = _args("adaedit", tiny_llama, tmp_path, _sets("memit", "pmet", "adaedit"))
    table = reproduce("adaedit", args)
    t2 = table[table["table"].str.startswith("Table 2")]
    assert {"Pre-edited", "MEMIT", "AdaEdit", "AdaEdit (residual-stream)"} <= set(t2["row"])
    assert set(t2["metric"]) == {"efficacy", "generalization", "specificity"}
    pre = t2[t2["row"] == "Pre-edited"].set_index("metric")
    assert pre.loc["specificity", "paper"] == 88.7 and 0 <= pre.loc["efficacy", "ours"] <= 100
    norms = table[table["table"].str.startswith("Table 4")]
    assert len(norms) and norms["ours"].map(math.isfinite).all()
    assert set(table[table["table"].str.startswith("Fig. 4b")]["row"]) == {"vanilla", "SR"}
    assert (tmp_path / "adaedit" / "table.md").exists()


@pytest.mark.timeout(900)
def test_mose_reproduction_quick(tiny_llama, tmp_path):
    args = _args("mose", tiny_llama, tmp_path, _sets("memit", "mose"), lambda_layers="1,2")
    table = reproduce("mose", args)
    t1 = table[table["table"].str.startswith("Table 1")].set_index(["row", "metric"])
    assert t1.loc[("MOSE", "reliability"), "paper"] == 0.9887
    fig2 = table[table["table"].str.startswith("Fig. 2")].set_index(["row", "metric"])
    assert abs(fig2.loc[("MOSE @ 2", "fro_rel"), "ours"] - 1) < 1e-4  # orthogonal: the norm is kept
    lam = table[table["table"] == "λ / target size"].set_index(["row", "metric"])
    lo, hi = lam.loc[("MOSE λ=300 (layers 1,2)", "rotation_deg"), "ours"], lam.loc[
        ("MOSE λ=15000 (layers 1,2)", "rotation_deg"), "ours"]
    assert hi < lo  # a larger λ rotates less


@pytest.mark.timeout(900)
def test_agrade_reproduction_quick(tiny_llama, tmp_path):
    shared_path("counterfact", "counterfact-train.json")
    sets = [f"{m}.rank=8" for m in ("agrade", "malmen")] + [f"{m}.layers=2,3" for m in ("agrade", "malmen")]
    args = _args("agrade", tiny_llama, tmp_path, sets, cache=str(tmp_path / "cache"))
    table = reproduce("agrade", args)
    t1 = table[table["table"].str.startswith("Table 1")].set_index(["row", "metric"])
    assert t1.loc[("AGRADE", "ES"), "paper"] == 83.41 and 0 <= t1.loc[("AGRADE", "ES"), "ours"] <= 100
    eq4 = table[table["table"].str.startswith("Eq. 4")]
    assert set(eq4["metric"]) == {"cos_prev", "removed"}


def test_bad_option_names_the_key(tiny_llama, tmp_path):
    with pytest.raises(ReproduceError, match="nope"):
        reproduce("mose", make_args("mose", quick=True, out=str(tmp_path), lm=tiny_llama, options={"nope": "1"}))


@pytest.mark.timeout(900)
def test_agrade_untrained_row_never_loads_a_trained_net(tiny_llama, tmp_path, monkeypatch):
    """The 'untrained' row shares AGRADE's cache key (allow_untrained is not hashed): run after the AGRADE row with
    the same cache it must still edit (and diagnose Eq. 4) with a fresh net, and the AGRADE row with the trained one."""
    import app.reproduce.agrade as rep
    import app.train as train
    from editors.hypernet import build_hypernet

    seen = []

    def trained(editor):
        return build_hypernet(editor.lm, editor.name, editor.config, seed=editor.seed, cache_dir=editor.cache_dir,
                              require_trained=False)[3] is not None

    real_scores, real_diag = train.batch_scores, rep.eq4_diagnostics
    monkeypatch.setattr(train, "batch_scores", lambda lm, ed, *a, **k: (
        seen.append(("scores", ed.config.allow_untrained, trained(ed))), real_scores(lm, ed, *a, **k))[1])
    monkeypatch.setattr(rep, "eq4_diagnostics", lambda lm, ed, *a, **k: (
        seen.append(("eq4", ed.config.allow_untrained, trained(ed))), real_diag(lm, ed, *a, **k))[1])
    shared_path("counterfact", "counterfact-train.json")
    sets = ["agrade.rank=8", "agrade.layers=2,3"]
    args = _args("agrade", tiny_llama, tmp_path, sets, cache=str(tmp_path / "cache"), rows="agrade,untrained")
    table = reproduce("agrade", args)
    assert ("scores", False, True) in seen and ("eq4", False, True) in seen  # the AGRADE row: trained
    untrained = [s for s in seen if s[1]]
    assert [s[0] for s in untrained] == ["scores", "eq4", "eq4"] and not any(s[2] for s in untrained)
    assert "untrained hypernetwork" in set(table["row"])
    assert list((tmp_path / "cache").rglob("*"))  # the trained net is still in the shared cache


def test_check_trained_refuses_a_mislabelled_row():
    from app.reproduce.agrade import _check_trained

    class Fake:
        def __init__(self, meta):
            self.meta = meta

        def checkpoint_meta(self):
            return self.meta

    _check_trained(Fake(None), "untrained", trained=False)
    _check_trained(Fake({"step": 3}), "AGRADE", trained=True)
    with pytest.raises(ReproduceError, match="untrained.*checkpoint of step 3"):
        _check_trained(Fake({"step": 3}), "untrained", trained=False)
    with pytest.raises(ReproduceError, match="AGRADE.*a trained"):
        _check_trained(Fake(None), "AGRADE", trained=True)
