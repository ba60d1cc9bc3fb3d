"""Long runs at linear cost (issue 16): checkpoint schedules, the stratified retention sample, collapse detection
from aggregate rows only, and large artifacts kept in files beside the store."""
from __future__ import annotations

import os

import numpy as np
import pytest

import app.engine as engine
from analysis.collapse import detect_collapse
from app.engine import run_sequential
from app.runconfig import (
    RunConfig,
    checkpoint_steps,
    geometric_steps,
    retention_priorities,
    stratified_sample,
)
from app.store import RunStore
from editors.base import ConfigError


def test_geometric_schedule():
    assert geometric_steps(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert geometric_steps(7) == [1, 2, 5, 7]  # the last step always
    assert geometric_steps(1) == [1]
    # total retention cost of exact retention on the geometric schedule is linear: sum of the checkpoints' n
    for n in (1000, 10000):
        assert sum(geometric_steps(n)) < 1.9 * n


def test_checkpoint_steps_modes():
    assert checkpoint_steps(RunConfig(eval_every=3), 10) == [3, 6, 9, 10]
    assert checkpoint_steps(RunConfig(eval_every=0), 10) == [10]
    assert checkpoint_steps(RunConfig(checkpoint_schedule="geometric", eval_every=3), 60) == [1, 2, 5, 10, 20, 50, 60]
    assert checkpoint_steps(RunConfig(checkpoint_schedule="4, 1, 50"), 10) == [1, 4, 10]
    for bad in ("sometimes", "0,5", "1,x", ""):
        with pytest.raises(ConfigError, match="checkpoint_schedule"):
            RunConfig(method="rome", checkpoint_schedule=bad).validate()
    with pytest.raises(ConfigError, match="retention_sample"):
        RunConfig(method="rome", retention_sample=-1).validate()
    with pytest.raises(ConfigError, match="dtype must be one of auto, float32, bfloat16, float16"):
        RunConfig(method="rome", dtype="fp8").validate()
    c = RunConfig().replace(checkpoint_schedule="geometric", retention_sample="25", dtype="bfloat16")
    assert (c.checkpoint_schedule, c.retention_sample, c.dtype) == ("geometric", 25, "bfloat16")
    assert RunConfig.from_dict(c.to_dict()) == c


def test_stratified_sample():
    pr = retention_priorities(3, 1000)
    assert np.array_equal(pr[:10], retention_priorities(3, 10))  # an edit's priority does not depend on n
    assert stratified_sample(5, 8, pr) == [0, 1, 2, 3, 4]  # n <= k: every edit (exact)
    assert stratified_sample(5, 0, pr) == [0, 1, 2, 3, 4]  # k = 0: every edit
    idx = stratified_sample(1000, 10, pr)
    assert len(idx) == 10 and idx == sorted(idx)
    # one per stratum [100 j, 100 (j + 1)): the first tenth of the run is always represented
    assert [i // 100 for i in idx] == list(range(10))
    # the pick of each stratum is its smallest priority (not, e.g., its first edit)
    assert all(pr[i] == pr[100 * j:100 * (j + 1)].min() for j, i in enumerate(idx))
    assert stratified_sample(1000, 10, pr) == idx  # deterministic
    assert stratified_sample(1000, 10, retention_priorities(4, 1000)) != idx  # and seeded


def test_geometric_sampled_run(tmp_path, tiny_llama, standins):
    """A run with the geometric schedule and a retention sample of 3: checkpoints at steps 1, 2, 5, 6 and at most 3
    re-scored edits per checkpoint, drawn one per stratum."""
    cfg = RunConfig(method="unit-shift", n_edits=6, eval_every=4, checkpoint_schedule="geometric",
                    retention_sample=3, runs_dir=str(tmp_path), general="none", device="cpu", weights=False)
    run_id = run_sequential(cfg, lm=tiny_llama)
    store = RunStore(tmp_path)
    df = store.metrics_frame([run_id], kinds=["retention", "timing"])
    ret = df[(df["kind"] == "retention") & (df["metric"] == "reliability") & (df["protocol"] == "tf_token_acc")]
    assert sorted(ret.loc[ret["case_id"].isna(), "n_edits"]) == [1, 2, 5, 6]
    per_case = ret[ret["case_id"].notna()]
    assert per_case.groupby("n_edits").size().to_dict() == {1: 1, 2: 2, 5: 3, 6: 3}
    pr = retention_priorities(0, 6)
    case_ids = [r.case_id for r in standins[:6]]
    for n in (5, 6):
        expect = [case_ids[i] for i in stratified_sample(n, 3, pr)]
        assert list(per_case.loc[per_case["n_edits"] == n, "case_id"]) == expect
    scored = df[(df["kind"] == "timing") & (df["metric"] == "retention_scored")]
    assert list(scored.sort_values("n_edits")["value"]) == [1, 2, 3, 3]
    assert store.get_run(run_id)["package_versions"]["model_dtype"] == "float32"


def test_collapse_rows_read_aggregates_only(tmp_path, tiny_llama, standins, monkeypatch):
    """Collapse detection reads only aggregate rows of the signals' kinds, and finds what it finds on every row."""
    cfg = RunConfig(method="unit-shift", n_edits=8, eval_every=1, runs_dir=str(tmp_path), general="none",
                    device="cpu", method_overrides={"scale": 2.0})
    calls = []
    real = RunStore.metrics_frame

    def spy(self, *args, **kw):
        calls.append(kw)
        return real(self, *args, **kw)

    monkeypatch.setattr(RunStore, "metrics_frame", spy)
    run_id = run_sequential(cfg, lm=tiny_llama)
    assert calls and calls[-1].get("aggregates_only") is True
    assert set(calls[-1]["kinds"]) == set(engine.COLLAPSE_KINDS)
    store = RunStore(tmp_path)
    full = real(store, [run_id])
    full = full[full["kind"] != "collapse"]
    expect = engine._collapse_to_rows(detect_collapse(full), 8, 8)
    got = real(store, [run_id], kinds=["collapse"])
    assert len(got) == len(expect) > 0
    assert sorted(zip(got["metric"], got["value"])) == sorted((r["metric"], r["value"]) for r in expect)


def test_aggregates_only_frame(tmp_path):
    store = RunStore(tmp_path)
    rid = store.create_run(status="running")
    store.add_metric_rows(rid, [{"n_edits": 1, "kind": "retention", "metric": "reliability", "value": 1.0,
                                 "case_id": "a"},
                                {"n_edits": 1, "kind": "retention", "metric": "reliability", "value": 0.5}])
    df = store.metrics_frame([rid], aggregates_only=True)
    assert len(df) == 1 and df["case_id"].isna().all() and float(df["value"].iloc[0]) == 0.5
    assert len(store.metrics_frame([rid])) == 2


def test_large_artifact_goes_to_a_file(tmp_path):
    store = RunStore(tmp_path)
    store.blob_limit = 10_000
    rid = store.create_run(status="running")
    rng = np.random.default_rng(0)
    big = {"null_basis|5": rng.standard_normal((200, 50)).astype(np.float32)}  # ~40 kB, incompressible
    small = {"s": np.arange(4.0)}
    store.write_step(rid, artifacts=[("editor", big, 1, 1), ("singular_values", small, 1, 1)])
    store.add_artifact(rid, "hidden_states", big, n_edits=2, step=2)
    arts = store.list_artifacts(rid)
    files = arts[arts["format"] == "npz-file"]
    assert list(files["name"]) == ["editor", "hidden_states"]
    assert list(arts.loc[arts["format"] == "npz", "name"]) == ["singular_values"]
    for path, size in zip(files["path"], files["bytes"]):
        full = os.path.join(store.runs_dir, path)
        assert os.path.isfile(full) and os.path.getsize(full) == size > store.blob_limit
        assert os.path.dirname(full) == store.artifact_dir(rid)
    with store._read() as conn:  # no blob in SQLite above the limit
        assert conn.execute("SELECT max(length(blob)) FROM artifacts").fetchone()[0] <= store.blob_limit
    got = store.get_artifact(rid, "editor")
    assert np.array_equal(got["null_basis|5"], big["null_basis|5"])
    assert np.array_equal(store.get_artifact(rid, "singular_values")["s"], small["s"])
    store.delete_run(rid)
    assert not os.path.exists(store.artifact_dir(rid))


def test_missing_artifact_file_is_a_clear_error(tmp_path):
    from app.store import StoreError
    store = RunStore(tmp_path)
    store.blob_limit = 100
    rid = store.create_run(status="running")
    store.add_artifact(rid, "big", {"x": np.random.default_rng(1).standard_normal(1000)})
    path = os.path.join(store.runs_dir, store.list_artifacts(rid)["path"].iloc[0])
    os.remove(path)
    with pytest.raises(StoreError, match="artifact file .* could not be read"):
        store.get_artifact(rid, "big")




def test_cli_long_run_flags(tmp_path, capsys, standins, tiny_dir):
    import json

    import tests.engine_doubles  # noqa: F401  (registers unit-shift)
    from app.cli import main
    runs = tmp_path / "runs"
    code = main(["run", "--model", tiny_dir, "--method", "unit-shift", "--n-edits", "6", "--device", "cpu",
                 "--runs-dir", str(runs), "--set", "run.general=none", "--checkpoints", "geometric",
                 "--retention-sample", "2", "--dtype", "float32", "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    run_id = json.loads(out.strip().splitlines()[-1])["run_id"]
    store = RunStore(runs)
    cfg = store.get_run(run_id)["config"]
    assert (cfg["checkpoint_schedule"], cfg["retention_sample"], cfg["dtype"]) == ("geometric", 2, "float32")
    ret = store.metrics_frame([run_id], kinds=["retention"], metrics=["reliability"], aggregates_only=True)
    assert sorted(set(ret["n_edits"])) == [1, 2, 5, 6]
    code = main(["methods"])
    out, _ = capsys.readouterr()
    assert "checkpoint_schedule=geometric" in out and "retention_sample=K" in out
