"""Issue 20, app item 3 (the rest): hidden-state axes named by projection and component with "before" drawn under
"after"; the layer × checkpoint map has ticks at the real checkpoints and a named colour bar; the metric curves
start at the 0-edit baseline."""
from __future__ import annotations

import base64

import numpy as np

from tests.app.conftest import plotly_specs


def _arr(v):
    """A trace's x / y as a list (plotly writes numeric arrays as base64 ``bdata``)."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).tolist()
    return list(v)


def test_hidden_state_axes_and_before_under_after(synthetic_store, make_app):
    path, rome, ft = synthetic_store
    at = make_app(path, "hidden_states.py", {"runs": rome, "proj": "pca"})
    spec = plotly_specs(at)[0]
    markers = [t for t in spec["data"] if t.get("mode") == "markers"]
    assert [t["name"] for t in markers][0] == "before" and len(markers) == 2
    assert markers[0]["marker"]["size"] > markers[1]["marker"]["size"]
    titles = {k: v["title"]["text"] for k, v in spec["layout"].items() if k.startswith(("xaxis", "yaxis"))
              and v.get("title", {}).get("text")}
    assert "PCA component 1" in titles.values() and "PCA component 2" in titles.values()


def test_change_map_ticks_at_checkpoints_and_named_colour_bar(synthetic_store, make_app):
    path, rome, ft = synthetic_store
    at = make_app(path, "geometry.py", {"runs": rome})
    heat = next(s for s in plotly_specs(at) if s["data"] and s["data"][0]["type"] == "heatmap")
    assert heat["layout"]["xaxis"]["tickvals"] == [10, 20, 30]  # the run's checkpoints (every 10 edits)
    assert heat["data"][0]["colorbar"]["title"]["text"] == "relative change ‖ΔW‖_F / ‖W0‖_F"


def test_metric_curves_start_at_the_zero_edit_baseline(synthetic_store, make_app):
    path, rome, ft = synthetic_store
    from app.store import RunStore
    at = make_app(path, "metrics.py", {"runs": rome, "curves": "retention,edit"})
    spec = plotly_specs(at)[0]
    pre = RunStore(path).metrics_frame(rome)
    pre = pre[(pre["kind"] == "pre") & pre["case_id"].isna() & (pre["protocol"] == "tf_token_acc")]
    # the traces are in panel order: retention · reliability first, then the other retention metrics
    rel = spec["data"][0]
    assert _arr(rel["x"])[0] == 0
    assert _arr(rel["y"])[0] == pre[pre["metric"] == "reliability"]["value"].iloc[0]
    immediate = [t for t in spec["data"] if t.get("x") and min(_arr(t["x"])) == 0]
    assert len(immediate) == 4  # reliability, generality, locality, editing_score of retention; no edit panel


def test_angle_histogram_names_its_y_axis(synthetic_store, make_app):
    path, rome, ft = synthetic_store
    at = make_app(path, "geometry.py", {"runs": rome})
    hist = plotly_specs(at)[0]
    assert hist["data"][0]["type"] == "histogram"
    assert hist["layout"]["yaxis"]["title"]["text"] == "fraction of updates (per run)"


def test_weights_runs_of_one_method_get_distinct_colours(tmp_path, make_app):
    from app.store import RunStore
    from tests.fixtures import synthetic_run
    store = RunStore(str(tmp_path))
    a = synthetic_run(store, n_edits=10, eval_every=5, per_case=False, hidden=False)
    b = synthetic_run(store, n_edits=10, eval_every=5, per_case=False, hidden=False, seed=3)
    at = make_app(str(tmp_path), "weights.py", {"runs": f"{a},{b}"})
    traces = plotly_specs(at)[0]["data"]
    colour = {t["name"]: t["line"]["color"] for t in traces}
    by_run = {}
    for name, c in colour.items():
        by_run.setdefault(name.split(" · ")[0], set()).add(c)
    assert len(by_run) == 2 and all(len(c) == 1 for c in by_run.values())  # one colour per run, dash = layer
    assert len(set.union(*by_run.values())) == 2
