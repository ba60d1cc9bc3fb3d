"""The sweep parts of the Runs and Metrics pages (AppTest) on a store with a synthetic 2-point x 2-seed sweep, and
the band over seeds of :func:`app.sweep_views.sweep_curves` against a hand computation."""
from __future__ import annotations

import numpy as np
import pytest

from app.store import RunStore
from app.sweep import SweepStore, load_spec
from app.sweep_views import sweep_curves, sweeps_overview
from tests.app.conftest import plotly_specs
from tests.fixtures import synthetic_run


@pytest.fixture()
def sweep_store(tmp_path):
    store = RunStore(tmp_path)
    spec = load_spec({"name": "sw", "method": "rome", "seeds": [0, 1], "n_edits": 20,
                      "grid": {"v_num_grad_steps": [5, 10]}})
    sweeps = SweepStore(store)
    sweeps.register(spec, "ray")
    for t in spec.trials[:3]:  # the 4th trial never ran
        run_id = synthetic_run(store, n_edits=20, eval_every=5, hidden=False, seed=t.index,
                               collapse_at=8 + 4 * t.index, label=f"sweep sw · {t.describe()}")
        sweeps.add_run("sw", t.key, run_id)
    return store, spec


def test_band_is_mean_and_sample_std_over_the_seeds(sweep_store):
    store, spec = sweep_store
    curves = sweep_curves(store, "sw", kinds=("retention",))
    assert set(curves["point"]) == {"rome @default v_num_grad_steps=5", "rome @default v_num_grad_steps=10"}
    ids = SweepStore(store).run_ids("sw")
    df = store.metrics_frame(ids[:2], kinds=["retention"])
    df = df[df["case_id"].isna() & (df["metric"] == "reliability") & (df["protocol"] == "tf_token_acc")]
    at10 = df[df["n_edits"] == 10]["value"].to_numpy()
    assert len(at10) == 2
    row = curves[(curves["point"] == "rome @default v_num_grad_steps=5") & (curves["metric"] == "reliability")
                 & (curves["n_edits"] == 10)].iloc[0]
    assert row["n_runs"] == 2 and row["mean"] == pytest.approx(at10.mean())
    assert row["hi"] - row["mean"] == pytest.approx(at10.std(ddof=1))
    one = curves[(curves["point"] == "rome @default v_num_grad_steps=10") & (curves["metric"] == "reliability")]
    assert (one["n_runs"] == 1).all() and np.allclose(one["hi"], one["lo"])  # one seed: no band
    ov = sweeps_overview(store).iloc[0]
    assert (ov["sweep_id"], ov["trials"], ov["done"], ov["waiting"]) == ("sw", 4, 3, 1)


def test_runs_page_shows_sweep_progress_and_filters_by_sweep(make_app, sweep_store):
    store, _ = sweep_store
    store.create_run(method="memit", label="outside the sweep", status="finished")
    at = make_app(store.runs_dir, "runs.py")
    tables = [d.value for d in at.dataframe]
    overview = next(t for t in tables if "sweep_id" in t.columns)
    assert overview.iloc[0]["sweep_id"] == "sw" and overview.iloc[0]["done"] == 3
    at.selectbox(key="f-sweep").set_value("sw").run()
    runs = next(d.value for d in at.dataframe if "run_id" in d.value.columns and "status" in d.value.columns
                and "sweep_id" not in d.value.columns)
    assert sorted(runs["run_id"]) == sorted(SweepStore(store).run_ids("sw"))


def test_metrics_page_draws_one_curve_per_point_with_a_band(make_app, sweep_store):
    store, _ = sweep_store
    at = make_app(store.runs_dir, "metrics.py")
    at.radio(key="m-mode").set_value("a sweep").run()
    assert not at.exception, [e.value for e in at.exception]
    names = {t.get("name") for spec in plotly_specs(at) for t in spec["data"]}
    assert {"rome @default v_num_grad_steps=5", "rome @default v_num_grad_steps=5 band",
            "rome @default v_num_grad_steps=10"} <= names
    assert "rome @default v_num_grad_steps=10 band" not in names  # one seed
    table = next(d.value for d in at.dataframe if "point" in d.value.columns)
    assert set(table["seeds"]) == {2} and "±" in table.loc[0, "reliability"]
