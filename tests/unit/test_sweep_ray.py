"""Sweeps on a real local Ray (``ray.init(num_cpus=2)``, one instance for the module: it takes ~11 s to start) with
real ROME edits of the tiny random llama saved as a model directory.

What is checked: a 2 x 2 grid (two v_num_grad_steps values x two seeds) runs to completion with every row in the
one store, and a trial's rows equal those of the same run made in this process (the same code path); re-running
the sweep skips the finished trials; a trial whose worker process is killed mid-run is retried by Ray as a new run
while the killed run is kept, ``failed``, with its rows; a cancelled sweep leaves every trial ``cancelled`` and
nothing running.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest

from app.store import RunStore
from app.sweep import SweepStore, execute_trial, load_spec, run_sweep

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")

KEY_COLS = ["kind", "metric", "n_edits", "step", "layer", "param", "protocol", "case_id"]


@pytest.fixture(scope="module")
def ray_local():
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # pragma: no cover - a machine where Ray cannot start
        pytest.skip(f"Ray cannot start here: {type(exc).__name__}: {exc}")
    yield ray
    ray.shutdown()


def spec(tiny_dir, cache, name, *, n_edits=3, seeds=(0, 1), steps=(2, 3), **extra):
    return {"name": name, "model": tiny_dir, "methods": ["rome"], "n_edits": n_edits, "eval_every": 2,
            "seeds": list(seeds), "run": {"general": "none", "cache_dir": str(cache), "device": "cpu"},
            "overrides": {"layer": 1, "mom2_n_tokens": 2000}, "grid": {"rome.v_num_grad_steps": list(steps)},
            **extra}


def _rows(store: RunStore, run_id: str) -> pd.DataFrame:
    df = store.metrics_frame([run_id])
    df = df[~df["kind"].isin(["timing"])].copy()  # wall-clock numbers differ from run to run
    df = df[~df["metric"].str.contains("seconds")]
    for c in KEY_COLS:
        df[c] = df[c].astype(str)
    return df.sort_values(KEY_COLS).reset_index(drop=True)


@pytest.mark.timeout(600)  # ~65 s on the shared 2-core machine at load 12; cold Ray workers import the engine
def test_grid_runs_to_completion_with_every_row_and_resume_skips(ray_local, tiny_dir, tmp_path):
    runs = tmp_path / "runs"
    s = spec(tiny_dir, tmp_path / "cache", "grid")
    res = run_sweep(s, str(runs), executor="ray", cpus_per_trial=1)
    trials = res.trials
    assert len(trials) == 4 and set(trials["status"]) == {"finished"}, trials[["status", "error"]]
    # Ray's scheduling holds: never more trials at once than CPUs (a trial waiting on Ray would lend its CPU)
    spans = [(r["t_start"], r["t_end"]) for r in res.info["results"]]
    assert len(spans) == 4
    assert max(sum(a <= t < b for a, b in spans) for t, _ in spans) <= 2
    store = RunStore(runs)
    assert sorted(store.list_runs()["run_id"]) == sorted(trials["run_id"])  # one run per trial, nothing else
    for run_id in trials["run_id"]:
        assert len(store.edits_frame(run_id)) == 3
        kinds = set(store.metrics_frame([run_id])["kind"])
        assert {"pre", "edit", "retention", "locality", "weights", "timing", "weights_unedited"} <= kinds
        assert len(store.list_artifacts(run_id)) > 0
    # trial 0 made again in this process: the same rows (the same code path, only the transport differs)
    t0 = load_spec(s, str(tmp_path / "local")).trials[0]
    ref_store = RunStore(tmp_path / "local")
    from app.engine import queue_run
    ref_id, _ = queue_run(t0.config, ref_store)
    execute_trial(t0.config, ref_id, ref_store, SweepStore(ref_store), sweep_id="ref", trial_key=t0.key, threads=1)
    got = _rows(store, trials.loc[trials["trial_key"] == t0.key, "run_id"].iloc[0])
    want = _rows(ref_store, ref_id)
    assert len(got) == len(want) > 50
    pd.testing.assert_frame_equal(got[KEY_COLS], want[KEY_COLS])
    np.testing.assert_allclose(got["value"].to_numpy(), want["value"].to_numpy(), rtol=1e-3, atol=1e-5)
    # the same spec again: every trial is done, nothing runs
    again = run_sweep(s, str(runs), executor="ray")
    assert again.started == [] and len(again.skipped) == 4
    assert len(RunStore(runs).list_runs()) == 4


def _wait_for(pred, timeout=120.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got is not None:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _running_with_edits(runs_dir):
    if not os.path.exists(os.path.join(runs_dir, "runs.sqlite")):
        return None
    df = RunStore(runs_dir, recover=False).list_runs(status="running")
    df = df[df["n_edits_done"].fillna(0) >= 1]
    return df if len(df) else None


@pytest.mark.timeout(600)  # the retry starts a cold worker
def test_killed_trial_is_retried_and_the_dead_run_keeps_its_rows(ray_local, tiny_dir, tmp_path):
    runs = str(tmp_path / "runs")
    s = spec(tiny_dir, tmp_path / "cache", "kill", n_edits=12, seeds=(0,), steps=(2,))
    s["eval_every"] = 1
    out: dict = {}
    th = threading.Thread(target=lambda: out.update(res=run_sweep(s, runs, executor="ray", max_retries=1)),
                          daemon=True)
    th.start()
    victim = _wait_for(lambda: _running_with_edits(runs), what="a running trial")
    run_id, pid = victim["run_id"].iloc[0], int(victim["pid"].iloc[0])
    assert pid != os.getpid()  # the trial runs in a Ray worker
    os.kill(pid, signal.SIGKILL)
    th.join(240)
    assert not th.is_alive()
    store = RunStore(runs)
    trials = out["res"].trials
    assert trials["status"].tolist() == ["finished"] and trials["attempts"].tolist() == [2]
    assert trials["run_id"].iloc[0] == run_id  # the retry ran under the queued id ...
    assert len(store.edits_frame(run_id)) == 12 and store.get_run(run_id)["n_edits_done"] == 12
    dead_ids = [r for r in SweepStore(store).run_ids("kill") if r != run_id]
    assert len(dead_ids) == 1  # ... and the killed attempt is its own run, failed, with its rows
    dead = store.get_run(dead_ids[0])
    assert dead["status"] == "failed" and "died mid-run" in dead["error"] and str(pid) in dead["error"]
    assert 1 <= dead["n_edits_done"] < 12
    assert len(store.edits_frame(dead_ids[0])) == dead["n_edits_done"]
    edits = store.metrics_frame([dead_ids[0]], kinds=["edit"])
    assert sorted(set(edits["n_edits"])) == list(range(1, dead["n_edits_done"] + 1))


def test_cancelled_sweep_leaves_no_trial_running(ray_local, tiny_dir, tmp_path):
    runs = str(tmp_path / "runs")
    s = spec(tiny_dir, tmp_path / "cache", "cancel", n_edits=40, seeds=(0, 1, 2), steps=(2,))
    out: dict = {}
    th = threading.Thread(target=lambda: out.update(res=run_sweep(s, runs, executor="ray", poll_seconds=0.2)),
                          daemon=True)
    th.start()
    _wait_for(lambda: _running_with_edits(runs), what="a running trial")
    t0 = time.time()
    SweepStore(RunStore(runs, recover=False)).request_cancel("cancel")  # as `python -m app cancel --sweep`
    th.join(120)
    assert not th.is_alive()
    assert time.time() - t0 < 60
    trials = out["res"].trials
    assert set(trials["status"]) == {"cancelled"}, trials[["status", "n_edits_done"]]
    store = RunStore(runs)
    assert set(store.list_runs()["status"]) == {"cancelled"}
    assert trials["n_edits_done"].max() >= 1 and trials["n_edits_done"].max() < 40
    started = trials[trials["n_edits_done"] > 0]
    for run_id in started["run_id"]:
        assert len(store.edits_frame(run_id)) == store.get_run(run_id)["n_edits_done"]  # rows kept
    before = store.list_runs()[["run_id", "n_edits_done", "updated"]]
    time.sleep(2.0)
    after = RunStore(runs).list_runs()[["run_id", "n_edits_done", "updated"]]
    pd.testing.assert_frame_equal(before, after)  # nothing is still writing
