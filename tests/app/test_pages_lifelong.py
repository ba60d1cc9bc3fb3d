"""Pages with lifelong-editing rows: the WILD protocol on the Metrics page (and its probe locality) and an editor's
own state (``kind="editor"``, e.g. GRACE's codebook) on the Weights page, with no method named in the pages."""
from __future__ import annotations

import pytest

from app.store import RunStore
from tests.app.test_pages import plotly_specs, trace_names
from tests.fixtures import synthetic_run


@pytest.fixture(scope="module")
def lifelong_store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("runs-lifelong"))
    store = RunStore(path)
    run = synthetic_run(store, method="grace", n_edits=20, eval_every=10, hidden=False, seed=3, label="memory")
    rows = []
    for n in (10, 20):
        for metric, value in (("codebook_size", n), ("hit_share_probes_last", 0.0), ("radius_mean", 1.0)):
            rows.append({"n_edits": n, "step": n, "kind": "editor", "metric": metric, "value": value, "layer": 25})
        for m, v in (("reliability", 0.1), ("generality", 0.0), ("locality", 0.9)):
            rows += [{"n_edits": n, "step": n, "kind": "retention", "metric": m, "protocol": p, "value": v}
                     for p in ("wild_gen", "wild_gen_f1")]
        rows.append({"n_edits": n, "step": n, "kind": "locality", "metric": "locality", "protocol": "wild_gen",
                     "value": 0.5})
    store.add_metric_rows(run, rows)
    return path, run


def test_weights_page_shows_the_editor_state(lifelong_store, make_app):
    path, run = lifelong_store
    at = make_app(path, "weights.py", {"runs": run})
    specs = plotly_specs(at)
    # weight curves, norm / condition / drift side by side, spectrum, editor state (the last figure)
    assert len(specs) == 4
    assert trace_names(at)[-1] and all(name.endswith("· L25") for name in trace_names(at)[-1])
    titles = {a["text"] for a in specs[-1]["layout"]["annotations"]}
    assert {"codebook_size", "hit_share_probes_last", "radius_mean"} <= titles


def test_metrics_page_wild_protocol_and_its_probe_locality(lifelong_store, make_app):
    path, run = lifelong_store
    at = make_app(path, "metrics.py", {"runs": run})
    at.selectbox(key="m-protocol").set_value("wild_gen").run()
    assert not at.exception
    spec = plotly_specs(at)[0]
    titles = {a["text"] for a in spec["layout"]["annotations"]}
    assert "retention · reliability" in titles and "locality · locality" in titles
    from app import views
    curves = views.metric_curves(RunStore(path), [run], kinds=("locality",), protocol="wild_gen")
    assert sorted(curves["mean"]) == [0.5, 0.5]  # the WILD probe rows, not the teacher-forced ones
    tf = views.metric_curves(RunStore(path), [run], kinds=("locality",), protocol="prob_margin")
    assert len(tf) and not (tf["mean"] == 0.5).all()  # no probe rows under prob_margin: tf_token_acc's
