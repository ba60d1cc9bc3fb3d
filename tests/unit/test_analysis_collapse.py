"""Collapse detection on synthetic runs with a known collapse step and known indicator departures."""
import math

import numpy as np
import pandas as pd
import pytest

from analysis.collapse import Signal, collapse_summary_text, departure, detect_collapse, first_drop

STEPS = np.arange(0, 1001, 50)


def synthetic(seed=0):
    """Reliability holds at 1.0 until 500 edits, then falls (below 0.5 first at 600); general accuracy falls at
    800; the condition number of layer 5 grows slowly, then exponentially from 300 edits; layer 6's stays on its
    slow trend; the Frobenius norm drifts linearly throughout."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in STEPS:
        rel = 1.0 if n < 500 else max(0.1, 1 - (n - 450) / 200)
        rows.append({"n_edits": n, "kind": "retention", "metric": "reliability", "protocol": "tf_token_acc",
                     "value": rel, "case_id": None, "layer": None, "param": None})
        rows.append({"n_edits": n, "kind": "retention", "metric": "reliability", "protocol": "tf_token_acc",
                     "value": 0.0, "case_id": "c0", "layer": None, "param": None})  # per-case: ignored
        rows.append({"n_edits": n, "kind": "retention", "metric": "reliability", "protocol": "prob_margin",
                     "value": 1.0, "case_id": None, "layer": None, "param": None})  # other protocol: ignored
        rows.append({"n_edits": n, "kind": "general", "metric": "builtin/accuracy", "protocol": "logprob_choice",
                     "value": 0.95 if n < 800 else 0.5, "case_id": None, "layer": None, "param": None})
        rows.append({"n_edits": n, "kind": "general", "metric": "builtin/chance", "protocol": "logprob_choice",
                     "value": 0.4, "case_id": None, "layer": None, "param": None})
        if n == 0:
            continue
        for layer in (5, 6):
            slow = 100 * (1 + 0.0005 * n) * (1 + 0.005 * rng.normal())
            boom = math.exp((n - 300) / 100) if (layer == 5 and n > 300) else 1.0
            rows.append({"n_edits": n, "kind": "weights", "metric": "cond", "layer": layer, "param": f"p{layer}",
                         "value": slow * boom, "case_id": None, "protocol": None})
            rows.append({"n_edits": n, "kind": "weights", "metric": "fro", "layer": layer, "param": f"p{layer}",
                         "value": 50 + 0.01 * n, "case_id": None, "protocol": None})
    return pd.DataFrame(rows)


def test_finds_collapse_step_and_lead_time():
    df = detect_collapse(synthetic())
    for c in ("indicator", "kind", "step", "collapse_step", "lead_edits", "n_edits", "metric", "value"):
        assert c in df.columns
    perf = df[df["kind"] == "performance"].set_index("indicator")
    assert perf.loc["retention/reliability", "step"] == 600
    assert perf.loc["retention/reliability", "threshold"] == pytest.approx(0.5)
    # general ability: halfway from 0.95 to the chance floor 0.4 -> 0.675; 0.5 at 800 is below
    assert perf.loc["general/builtin/accuracy", "step"] == 800
    assert perf.loc["general/builtin/accuracy", "threshold"] == pytest.approx(0.675)
    assert (df["collapse_step"] == 600).all()
    assert perf.loc["general/builtin/accuracy", "lead_edits"] == -200  # fell 200 edits after the collapse
    ind = df[df["kind"] == "indicator"]
    cond5 = ind[(ind["indicator"] == "weights/cond") & (ind["layer"] == 5)].iloc[0]
    # exp((n-300)/100) first exceeds the 10% band at 350 (factor 1.65; at 300 it is 1)
    assert cond5["step"] == 350 and cond5["lead_edits"] == 250
    assert cond5["metric"] == "departure:weights/cond@L5" and cond5["value"] == 1.0 and cond5["n_edits"] == 350
    cond6 = ind[(ind["indicator"] == "weights/cond") & (ind["layer"] == 6)].iloc[0]
    assert math.isnan(cond6["step"]) and cond6["value"] == 0.0 and math.isnan(cond6["lead_edits"])
    fro = ind[ind["indicator"] == "weights/fro"]
    assert fro["step"].isna().all()  # a steady linear drift is its own early trend
    text = collapse_summary_text(df)
    assert "collapse at 600 edits (first: retention/reliability)" in text
    assert "weights/cond L5" in text and "250 edits before the collapse" in text


def test_no_collapse_and_options():
    df = synthetic()
    df = df[~((df["kind"] == "retention") & (df["n_edits"] >= 500))]
    df = df[df["kind"] != "general"]
    out = detect_collapse(df)
    assert out["collapse_step"].isna().all()
    assert "no collapse up to 1000 edits" in collapse_summary_text(out)
    # a stricter fraction, and naming the signal that defines the collapse
    out = detect_collapse(synthetic(), fraction=0.9, collapse_on="general/builtin/accuracy")
    perf = out[out["kind"] == "performance"].set_index("indicator")
    assert perf.loc["retention/reliability", "step"] == 500  # 0.75 < 0.9
    assert (out["collapse_step"] == 800).all()
    # custom signals
    sig = Signal("weights/fro", "weights", "fro", direction="up", per_layer=False)
    out = detect_collapse(synthetic(), indicators=(sig,), trend="constant")
    row = out[out["kind"] == "indicator"].iloc[0]
    assert row["layer"] is None and row["step"] > 0  # the linear drift leaves a constant level eventually
    with pytest.raises(ValueError, match="fraction"):
        detect_collapse(synthetic(), fraction=1.5)


def test_several_runs():
    a, b = synthetic(0), synthetic(1)
    a["run_id"], b["run_id"] = "a", "b"
    out = detect_collapse(pd.concat([a, b]))
    assert set(out["run_id"]) == {"a", "b"}
    assert "run a:" in collapse_summary_text(out)


def test_building_blocks():
    s = pd.Series([1.0, 0.9, 0.6, 0.4, 0.7], index=[0, 10, 20, 30, 40])
    assert first_drop(s, fraction=0.5) == (30.0, 1.0, 0.5)
    assert math.isnan(first_drop(s, fraction=0.3)[0])
    flat = pd.Series([2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 4.0, 4.0], index=range(0, 80, 10))
    step, tol = departure(flat, k_fit=4)
    assert step == 60 and tol == pytest.approx(math.log(1.1))
    assert math.isnan(departure(flat, k_fit=4, direction="down")[0])
    spike = pd.Series([2.0] * 6 + [4.0, 2.0], index=range(0, 80, 10))
    assert math.isnan(departure(spike, k_fit=4, patience=2)[0])  # one point is not a departure
    assert departure(spike, k_fit=4, patience=1)[0] == 60
    assert math.isnan(departure(flat.iloc[:4], k_fit=4)[0])  # not enough points
