"""Issue 20, app item 4: run comparison like W&B. The Runs table has method, label, status and the final metrics as
columns; clicking rows selects runs; a run's config is shown as labelled fields; the analysis pages open on the
newest run that has data."""
from __future__ import annotations

import pytest

from tests.app.conftest import plotly_specs


@pytest.fixture()
def two_runs_and_a_queued_one(tmp_path):
    from app.store import RunStore
    from tests.fixtures import synthetic_run
    store = RunStore(str(tmp_path))
    a = synthetic_run(store, method="rome", n_edits=12, eval_every=6, hidden=False, per_case=False, label="first")
    b = synthetic_run(store, method="ft", n_edits=12, eval_every=6, hidden=False, per_case=False, seed=2)
    q = store.create_run(status="queued", method="memit", model="tiny-llama", data_source="builtin",
                         config={"model": "tiny-llama"}, method_config={}, n_edits_planned=5)
    return str(tmp_path), store, a, b, q


def test_runs_table_has_method_label_status_and_final_metrics(two_runs_and_a_queued_one, make_app):
    path, store, a, b, q = two_runs_and_a_queued_one
    at = make_app(path)
    table = at.dataframe(key="runs-table").value.set_index("run_id")
    for col in ("method", "label", "status", "reliability", "generality", "locality", "editing_score"):
        assert col in table.columns, col
    assert table.loc[a, "label"] == "first" and table.loc[q, "status"] == "queued"
    # the final metric is the retention value at the last checkpoint (12 edits), as the Metrics page computes it
    from app.views import metric_curves
    c = metric_curves(store, [a], kinds=("retention",))
    want = c[(c["metric"] == "reliability") & (c["n_edits"] == 12)]["mean"].iloc[0]
    assert table.loc[a, "reliability"] == pytest.approx(want)
    assert c["n_edits"].max() == 12 and (c[c["metric"] == "reliability"]["mean"].nunique() > 1)
    assert table.loc[q, ["reliability", "editing_score"]].isna().all()


def test_clicking_rows_selects_runs_and_shows_config_fields(two_runs_and_a_queued_one, make_app):
    path, store, a, b, q = two_runs_and_a_queued_one
    at = make_app(path)
    ids = list(at.dataframe(key="runs-table").value["run_id"])
    at.session_state["runs-table"] = {"selection": {"rows": [ids.index(b)], "columns": [], "cells": []}}
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.multiselect(key="picked").value == [b]
    assert at.query_params["runs"] in (b, [b])
    cfg, mcfg = at.dataframe[1].value, at.dataframe[2].value  # the expander: run config, method config
    assert list(cfg.columns) == ["field", "value"]
    assert dict(zip(cfg["field"], cfg["value"]))["n_edits"] == "12"
    assert dict(zip(mcfg["field"], mcfg["value"]))["layers"] == "4, 5"


def test_analysis_pages_open_on_the_newest_run_with_data(two_runs_and_a_queued_one, make_app):
    path, store, a, b, q = two_runs_and_a_queued_one
    at = make_app(path, "metrics.py")  # no ?runs=: the queued run is the newest but has no rows
    assert at.multiselect(key="runs").value == [b]
    assert plotly_specs(at)
