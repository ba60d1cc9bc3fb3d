"""Curves over edits: per-run means, then mean and band over seeds."""
import numpy as np
import pandas as pd
import pytest

from analysis.curves import as_rows, attach_runs, metric_curves, run_means


def rows():
    out = []
    for method, slope in (("memit", 0.01), ("mose", 0.0)):
        for seed in (0, 1, 2):
            rid = f"{method}-{seed}"
            for n in (10, 20, 30):
                for c in range(4):  # per-case rows, no aggregate rows
                    out.append({"run_id": rid, "n_edits": n, "kind": "retention", "layer": None,
                                "metric": "reliability", "protocol": "tf_token_acc",
                                "value": 1.0 - slope * n - 0.1 * seed + 0.01 * c, "case_id": f"c{c}"})
                out.append({"run_id": rid, "n_edits": n, "kind": "weights", "layer": 5, "metric": "cond",
                            "protocol": None, "value": 10.0 + n + seed, "case_id": None})
    return out


def test_mean_and_bands_over_seeds():
    df = attach_runs(rows(), [{"run_id": f"{m}-{s}", "method": m, "seed": s}
                              for m in ("memit", "mose") for s in range(3)])
    c = metric_curves(df, band="minmax")
    assert list(c.columns) == ["method", "kind", "layer", "metric", "protocol", "n_edits", "mean", "lo", "hi",
                               "std", "n_runs"]
    rel = c[(c["method"] == "memit") & (c["metric"] == "reliability")].set_index("n_edits")
    # per run: mean over the 4 cases = 1 - 0.01 n - 0.1 seed + 0.015; over seeds 0, 1, 2
    assert rel.loc[20, "mean"] == pytest.approx(1 - 0.2 - 0.1 + 0.015)
    assert rel.loc[20, "lo"] == pytest.approx(1 - 0.2 - 0.2 + 0.015)
    assert rel.loc[20, "hi"] == pytest.approx(1 - 0.2 + 0.015)
    assert (rel["n_runs"] == 3).all()
    std = metric_curves(df, band="std")
    r = std[(std["method"] == "mose") & (std["metric"] == "cond") & (std["n_edits"] == 30)].iloc[0]
    assert r["mean"] == pytest.approx(41.0) and r["std"] == pytest.approx(1.0)
    assert (r["lo"], r["hi"]) == pytest.approx((40.0, 42.0))
    only = metric_curves(df, kinds=["weights"], band="none")
    assert set(only["metric"]) == {"cond"} and (only["lo"] == only["mean"]).all()
    with pytest.raises(ValueError, match="band"):
        metric_curves(df, band="iqr")


def test_aggregate_rows_win_over_cases_and_runs_without_method():
    data = [{"run_id": "a", "n_edits": 5, "kind": "retention", "metric": "reliability", "value": 0.2,
             "case_id": "x"},
            {"run_id": "a", "n_edits": 5, "kind": "retention", "metric": "reliability", "value": 0.9,
             "case_id": None}]
    per = run_means(data)
    assert per["value"].tolist() == [0.9]
    c = metric_curves(data)  # no method column: one curve per run
    assert c["run_id"].tolist() == ["a"] and c["mean"].tolist() == [0.9]


def test_as_rows():
    frame = pd.DataFrame({"n_edits": [3, 3], "layer": [1, 1], "param": ["p", "p"], "metric": ["fro", "cond"],
                          "value": [1.0, 2.0]})
    r = as_rows(frame, run_id="r1", kind="weights")
    assert list(r.columns) == ["run_id", "n_edits", "kind", "layer", "param", "metric", "protocol", "value"]
    assert set(r["kind"]) == {"weights"} and set(r["run_id"]) == {"r1"} and r["protocol"].isna().all()
    assert np.array_equal(r["value"], [1.0, 2.0])
