"""Figures from the analysis frames: the expected traces, colours per method, markers."""
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from analysis.angles import neuron_angle_frame
from analysis.collapse import detect_collapse
from analysis.curves import metric_curves
from analysis.hidden import project
from analysis.importance import neuron_magnitude_frame
from analysis.plots import (
    PALETTE,
    curve_figure,
    heatmap_figure,
    histogram_figure,
    method_color,
    method_order,
    scatter_with_marginals,
    spectrum_figure,
    weights_figure,
)
from analysis.weights import spectrum_frame, weight_stats_frame


def curves():
    rows = []
    for method, slope in (("memit", 0.01), ("mose", 0.0)):
        for seed in (0, 1):
            for n in (10, 20, 30, 40):
                for metric in ("reliability", "locality"):
                    rows.append({"run_id": f"{method}{seed}", "method": method, "seed": seed, "n_edits": n,
                                 "kind": "retention", "metric": metric, "protocol": "tf_token_acc",
                                 "value": 1 - slope * n - 0.05 * seed})
    return metric_curves(rows)


def test_method_colours_are_stable():
    assert method_color("memit") == method_color("MEMIT") != method_color("rome")
    assert method_color("some-new-method") == method_color("some-new-method")


def test_method_colours_follow_the_registry_order():
    from editors.registry import methods_in_order
    order = method_order()
    assert order == methods_in_order() and order[0] == "rome"
    n = min(len(order), len(PALETTE))
    assert [method_color(m) for m in order[:n]] == list(PALETTE[:n])  # one palette colour each, in order


def test_curve_figure_lines_bands_and_markers():
    c = curves()
    one = c[c["metric"] == "reliability"]
    fig = curve_figure(one, collapse={"memit collapse": 30})
    assert isinstance(fig, go.Figure)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    bands = [t for t in fig.data if t.fill == "toself"]
    assert sorted(t.name for t in lines) == ["memit", "mose"]
    assert len(bands) == 2  # both methods have two seeds that differ
    assert {t.line.color for t in lines} == {method_color("memit"), method_color("mose")}
    assert any(s.x0 == 30 for s in fig.layout.shapes)
    faceted = curve_figure(c, facet="metric", band=False)
    assert len([t for t in faceted.data if t.mode == "lines+markers"]) == 4
    assert sorted(a.text for a in faceted.layout.annotations) == ["locality", "reliability"]


def test_curve_figure_markers_from_detect_collapse():
    rows = [{"n_edits": n, "kind": "retention", "metric": "reliability", "protocol": "tf_token_acc",
             "value": 1.0 if n < 30 else 0.2} for n in (10, 20, 30, 40)]
    markers = detect_collapse(rows)
    fig = curve_figure(metric_curves(rows), collapse=markers)
    assert [s.x0 for s in fig.layout.shapes] == [30.0]


def test_weight_and_spectrum_figures():
    W0 = torch.randn(12, 24)
    weights = {f"model.layers.{i}.mlp.down_proj.weight": W0 + 0.1 * i for i in (1, 2)}
    frames = [weight_stats_frame(weights, {k: W0 for k in weights}, n_edits=n, layer_of=lambda k: int(k.split(".")[2]))
              for n in (5, 10)]
    df = pd.concat(frames)
    fig = weights_figure(df, metrics=["fro", "cond", "rel_change"])
    assert len(fig.data) == 3 * 2  # one line per layer in each panel
    assert fig.layout.yaxis2.type == "log" and fig.layout.yaxis.type != "log"
    sp = spectrum_frame(weights, {k: W0 for k in weights}, n_edits=10)
    fig = spectrum_figure(sp, color="param")
    assert len(fig.data) == 4 and fig.layout.yaxis.type == "log"


def test_histogram_heatmap_and_projection_figures():
    rng = np.random.default_rng(0)
    na = neuron_angle_frame(rng.uniform(85, 95, 40), rng.uniform(0, 180, 40))
    fig = histogram_figure(na, x="angle", color="space", vlines=(85, 95))
    assert [t.type for t in fig.data] == ["histogram", "histogram"] and len(fig.layout.shapes) == 2
    nm = neuron_magnitude_frame({1: torch.randn(6, 10), 3: torch.randn(6, 10)})
    fig = heatmap_figure(nm)
    assert fig.data[0].type == "heatmap" and np.asarray(fig.data[0].z).shape == (2, 6)
    pr = project(rng.normal(size=(20, 5)), rng.normal(size=(20, 5)) + 2)
    fig = scatter_with_marginals(pr)
    kinds = [(t.type, t.mode) for t in fig.data]
    assert kinds.count(("scatter", "markers")) == 2 and kinds.count(("scatter", "lines")) == 4
    fig = scatter_with_marginals(pr, marginal="histogram")
    assert [t.type for t in fig.data].count("histogram") == 4
    with pytest.raises(ValueError, match="marginal"):
        scatter_with_marginals(pr, marginal="violin")
