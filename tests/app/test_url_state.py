"""Issue 20, app item 5: the whole view is in the URL. Each page opened with the query parameters of a shared link
shows the same choices (protocol, curves, projection, weight metric, angle, the Playground's fact), and a change of
choice is written back into the URL."""
from __future__ import annotations


def _qp(at, name):
    v = at.query_params.get(name)
    return v[0] if isinstance(v, list) and len(v) == 1 else v


def test_metrics_reopens_protocol_and_curves(synthetic_store, make_app):
    path, rome, ft = synthetic_store
    at = make_app(path, "metrics.py", {"runs": rome, "protocol": "prob_margin", "curves": "edit,locality"})
    assert at.selectbox(key="m-protocol").value == "prob_margin"
    assert at.multiselect(key="m-kinds").value == ["edit", "locality"]
    at.selectbox(key="m-protocol").set_value("gen_exact").run()
    assert _qp(at, "protocol") == "gen_exact"
    assert _qp(at, "curves") == "edit,locality"


def test_metrics_ignores_unknown_url_values(synthetic_store, make_app):
    path, rome, ft = synthetic_store
    at = make_app(path, "metrics.py", {"runs": rome, "protocol": "nonsense", "curves": "bogus"})
    assert at.selectbox(key="m-protocol").value == "tf_token_acc"
    assert at.multiselect(key="m-kinds").value == ["retention", "edit", "locality"]


def test_hidden_states_reopens_projection(synthetic_store, make_app):
    path, rome, ft = synthetic_store
    at = make_app(path, "hidden_states.py", {"runs": rome, "proj": "tsne"})
    assert at.radio(key="h-method").value == "tsne"
    assert _qp(at, "proj") == "tsne"


def test_weights_reopens_metric(synthetic_store, make_app):
    path, rome, ft = synthetic_store
    at = make_app(path, "weights.py", {"runs": rome, "metric": "rel_change"})
    assert at.selectbox(key="w-metric").value == "rel_change"


def test_geometry_reopens_angle(synthetic_store, make_app):
    path, rome, ft = synthetic_store
    at = make_app(path, "geometry.py", {"runs": rome, "angle": "angle_accumulated"})
    assert at.radio(key="g-which").value == "angle_accumulated"


def test_playground_reopens_selected_fact(tmp_path, make_app):
    from app.backend import builtin_requests
    n = len(builtin_requests())
    assert n >= 3
    at = make_app(str(tmp_path), "playground.py", {"fact": "3"})
    assert at.selectbox(key="pg-fact").value == 2  # counted from 1 in the URL
    at.selectbox(key="pg-fact").set_value(1).run()
    assert _qp(at, "fact") == "2"
    at = make_app(str(tmp_path), "playground.py", {"fact": "own"})
    assert at.radio(key="pg-mode").value == "type your own"
