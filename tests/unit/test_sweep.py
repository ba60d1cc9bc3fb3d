"""Sweeps without Ray: the spec (expansion, validation before anything starts), the local executor (a crash is
``failed`` with its rows, a re-run skips finished trials), the sweep table (mean ± std over seeds against a hand
computation), ``app list --sweep`` / ``cancel --sweep`` / ``sweep --dry-run``, and ``app merge`` (lossless,
idempotent, conflicting ids refused)."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from app import cli
from app.merge import MergeError, merge_stores
from app.store import RunStore
from app.sweep import (
    UNEDITED_KIND,
    SweepSpecError,
    SweepStore,
    format_summary,
    load_spec,
    plan,
    run_quantities,
    run_sweep,
    sweep_progress,
    sweep_summary,
)

BASE = {"model": "default", "methods": ["memit", "rome"], "n_edits": 4, "seeds": [0, 1]}


# ---------------------------------------------------------------------------------------------------------------
# the spec
# ---------------------------------------------------------------------------------------------------------------
def test_grid_expands_per_method_with_seeds_innermost():
    spec = load_spec({**BASE, "grid": {"memit.mom2_update_weight": [5000, 15000], "run.batch_size": [1, 2]},
                      "overrides": {"v_num_grad_steps": 3}})
    # memit: 2 weights x 2 batch sizes x 2 seeds; rome: 2 batch sizes x 2 seeds (the memit key does not multiply it)
    assert len(spec.trials) == 8 + 4
    memit = [t for t in spec.trials if t.point["method"] == "memit"]
    assert sorted({(t.config.method_overrides["mom2_update_weight"], t.config.batch_size) for t in memit}) == \
        [(5000, 1), (5000, 2), (15000, 1), (15000, 2)]
    assert all(t.config.method_overrides["v_num_grad_steps"] == 3 for t in spec.trials)
    rome = [t for t in spec.trials if t.point["method"] == "rome"]
    assert all("mom2_update_weight" not in t.config.method_overrides for t in rome)
    assert [t.seed for t in spec.trials[:2]] == [0, 1] and spec.trials[0].group == spec.trials[1].group
    assert len({t.group for t in spec.trials}) == 6 and len({t.key for t in spec.trials}) == 12
    # the id is a digest of the spec unless named; the same spec gives the same id (a re-run resumes it)
    assert spec.sweep_id == load_spec({**BASE, "grid": {"memit.mom2_update_weight": [5000, 15000],
                                                        "run.batch_size": [1, 2]},
                                       "overrides": {"v_num_grad_steps": 3}}).sweep_id
    assert load_spec({**BASE, "name": "mine", "seeds": 3}).sweep_id == "mine"
    geo = load_spec({**BASE, "checkpoint_schedule": "geometric", "grid": {"run.checkpoint_schedule": ["1,3"]}})
    assert {t.config.checkpoint_schedule for t in geo.trials} == {"1,3"}  # the grid's run field wins
    assert [t.seed for t in load_spec({**BASE, "name": "mine", "seeds": 3}).trials][:3] == [0, 1, 2]


@pytest.mark.parametrize("change, message", [
    ({"seds": [0]}, r"unknown key 'seds' \(did you mean seeds"),
    ({"methods": ["memt"]}, r"unknown method 'memt'\. Did you mean memit"),
    ({"grid": {"memit.mom2_update_weigth": [1, 2]}}, r"mom2_update_weigth.*did you mean mom2_update_weight"),
    ({"grid": {"alphaedit.nullspace_threshold": [0.1]}}, r"names method 'alphaedit', which is not one"),
    ({"grid": {"memit.layers": 3}}, r"non-empty list"),
    ({"run": {"genral": "none"}}, r"unknown run field 'genral' \(did you mean general"),
    ({"run": {"n_edits": 3}}, r"set by the spec's 'n_edits'"),
    ({"overrides": {"run.eval_evry": 3}}, r"did you mean eval_every"),
    ({"n_edits": 0}, r"n_edits must be an integer >= 1"),
    ({"data": "counterfact:/no/such/file.json"}, r"data 'counterfact:/no/such/file.json'"),
    ({"seeds": [0, 0]}, r"distinct"),
    ({"checkpoint_schedule": "sometimes"}, r"checkpoint_schedule must be"),
])
def test_bad_specs_fail_before_anything_is_written(tmp_path, change, message):
    spec_path = tmp_path / "spec.yaml"
    import yaml
    spec_path.write_text(yaml.safe_dump({**BASE, **change}))
    with pytest.raises(SweepSpecError, match=message):
        run_sweep(str(spec_path), str(tmp_path / "runs"), executor="local")
    assert not (tmp_path / "runs").exists()


def test_dry_run_lists_trials_and_starts_nothing(tmp_path, capsys):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({**BASE, "name": "dry", "grid": {"memit.mom2_update_weight": [5000, 15000]}}))
    code = cli.main(["sweep", str(spec_path), "--dry-run", "--runs-dir", str(tmp_path / "runs"), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    assert "sweep dry: 6 trials, 6 to run, 0 finished already" in out
    rows = json.loads(out.strip().splitlines()[-1])
    assert [r["action"] for r in rows] == ["run"] * 6
    assert {r["point"] for r in rows} == {"memit @default mom2_update_weight=5000",
                                          "memit @default mom2_update_weight=15000", "rome @default"}
    assert not (tmp_path / "runs").exists()
    assert cli.main(["sweep", str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the local executor (the unit-shift test editor on the tiny model directory)
# ---------------------------------------------------------------------------------------------------------------
def _local_spec(tiny_dir, name, **kw):
    return {"name": name, "model": tiny_dir, "method": "unit-shift", "n_edits": 4, "eval_every": 2,
            "seeds": [0, 1], "run": {"general": "none", "device": "cpu"}, **kw}


def test_local_sweep_crash_is_failed_with_rows_and_rerun_skips_finished(standins, tiny_dir, tmp_path, capsys):
    runs = str(tmp_path / "runs")
    # fail_at=0 runs through; fail_at=3 raises in the 3rd edit call
    spec = _local_spec(tiny_dir, "loc", seeds=[0], grid={"fail_at": [0, 3]})
    res = run_sweep(spec, runs, executor="local")
    t = res.trials.set_index("idx")
    assert list(t["status"]) == ["finished", "failed"]
    store = RunStore(runs)
    for run_id in t.loc[[1], "run_id"]:
        run = store.get_run(run_id)
        assert "unit-shift was told to fail" in run["error"]
        assert run["n_edits_done"] == 2 and len(store.edits_frame(run_id)) == 2  # rows up to the crash kept
    for run_id in t.loc[[0], "run_id"]:
        df = store.metrics_frame([run_id], kinds=[UNEDITED_KIND])
        assert set(df["metric"]) == {"fro", "cond", "spectral", "effective_rank"} and (df["n_edits"] == 0).all()
        assert store.get_run(run_id)["label"].startswith("sweep loc · unit-shift @")
    p = sweep_progress(SweepStore(store), "loc")
    assert (p["total"], p["done"], p["failed"], p["running"]) == (2, 1, 1, 0)
    # again: the finished trial is skipped, the failed one runs again as a new run (the old one stays)
    again = run_sweep(spec, runs, executor="local")
    assert len(again.skipped) == 1 and len(again.started) == 1
    assert len(store.list_runs()) == 3
    assert list(again.trials["attempts"]) == [1, 2]
    # app list --sweep: the sweep's three runs, nothing else
    store.create_run(method="rome", label="not in the sweep")
    assert cli.main(["list", "--runs-dir", runs, "--sweep", "lo", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(r["run_id"] for r in listed) == sorted(SweepStore(store).run_ids("loc"))
    assert cli.main(["list", "--runs-dir", runs, "--sweep", "nope"]) == 2
    assert "no sweep 'nope'" in capsys.readouterr().err


def test_cancel_sweep_cancels_queued_and_running_runs(standins, tiny_dir, tmp_path, capsys):
    runs = str(tmp_path / "runs")
    calls = []

    def cancel_after_first_trial(p):
        calls.append(p)
        if p["done"] >= 1 and len(calls) < 100:
            assert cli.main(["cancel", "--sweep", "can", "--runs-dir", runs]) == 0

    res = run_sweep(_local_spec(tiny_dir, "can", seeds=[0, 1, 2]), runs, executor="local",
                    progress=cancel_after_first_trial)
    assert list(res.trials["status"]) == ["finished", "cancelled", "cancelled"]
    assert "cancel requested for sweep can" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# the sweep table
# ---------------------------------------------------------------------------------------------------------------
def _fake_run(store, *, rel, gen, loc, fro, fro0, cond, cond0, collapse_at=None, status="finished"):
    run_id = store.create_run(status="running", method="memit", n_edits_planned=10)
    rows = []
    for n, scale in ((5, 1.2), (10, 1.0)):  # the table reads the LAST checkpoint
        rows += [{"n_edits": n, "kind": "retention", "metric": m, "protocol": "tf_token_acc", "value": v * scale}
                 for m, v in (("reliability", rel), ("generality", gen), ("locality", loc))]
        rows += [{"n_edits": n, "kind": "weights", "layer": 4, "param": "p4", "metric": "fro", "value": fro * scale},
                 {"n_edits": n, "kind": "weights", "layer": 4, "param": "p4", "metric": "cond",
                  "value": cond * scale}]
    rows += [{"n_edits": 0, "kind": UNEDITED_KIND, "layer": 4, "param": "p4", "metric": "fro", "value": fro0},
             {"n_edits": 0, "kind": UNEDITED_KIND, "layer": 4, "param": "p4", "metric": "cond", "value": cond0}]
    if collapse_at is not None:
        rows.append({"n_edits": collapse_at, "kind": "collapse", "metric": "collapse:retention/reliability",
                     "value": 1.0})
    rows.append({"n_edits": 10, "kind": "collapse", "metric": "departure:fro@L4", "value": 0.0})
    store.add_metric_rows(run_id, rows)
    store.update_status(run_id, status, n_edits_done=10)
    return run_id


def test_summary_is_mean_and_sample_std_over_the_seeds_of_each_point(tmp_path):
    store = RunStore(tmp_path)
    sweeps = SweepStore(store)
    spec = load_spec({"name": "sum", "method": "memit", "seeds": [0, 1, 2],
                      "grid": {"mom2_update_weight": [5000, 15000]}})
    sweeps.register(spec, "local")
    vals = {0: dict(rel=0.9, gen=0.5, loc=0.7, fro=11.0, fro0=10.0, cond=30.0, cond0=20.0, collapse_at=5),
            1: dict(rel=0.6, gen=0.4, loc=0.9, fro=12.0, fro0=10.0, cond=50.0, cond0=20.0),
            2: dict(rel=0.3, gen=0.1, loc=0.8, fro=15.0, fro0=10.0, cond=40.0, cond0=20.0, collapse_at=10)}
    for t in spec.trials[:3]:  # the first point: three seeds
        sweeps.add_run("sum", t.key, _fake_run(store, **vals[t.seed]))
    t3 = spec.trials[3]  # the second point: one seed finished, one failed, one never started
    sweeps.add_run("sum", t3.key, _fake_run(store, **vals[0]))
    sweeps.add_run("sum", spec.trials[4].key, _fake_run(store, **vals[1], status="failed"))
    df = sweep_summary(store, "sum").set_index("point")
    first = df.loc["memit @default mom2_update_weight=5000"]
    for col, key in (("reliability", "rel"), ("generality", "gen"), ("locality", "loc")):
        xs = np.array([vals[s][key] for s in range(3)])
        assert first[f"{col}_mean"] == pytest.approx(xs.mean())
        assert first[f"{col}_std"] == pytest.approx(xs.std(ddof=1))
    growth = np.array([1.1, 1.2, 1.5])
    assert first["fro_growth_mean"] == pytest.approx(growth.mean())
    assert first["fro_growth_std"] == pytest.approx(growth.std(ddof=1))
    assert first["cond_growth_mean"] == pytest.approx(np.mean([1.5, 2.5, 2.0]))
    assert first["collapse_step_mean"] == pytest.approx(7.5) and first["collapsed"] == "2/3"
    assert (first["seeds"], first["finished"]) == (3, 3)
    second = df.loc["memit @default mom2_update_weight=15000"]
    assert (second["seeds"], second["finished"]) == (3, 1)
    assert second["reliability_mean"] == pytest.approx(0.9) and math.isnan(second["reliability_std"])
    assert second["status"] == "finished 1, failed 1, pending 1"
    text = format_summary(df.reset_index())
    assert "0.600 ± 0.300" in text and "n/a" not in text.splitlines()[1]
    assert run_quantities(store, sweeps.run_ids("sum")[1])["collapse_step"] is None


# ---------------------------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------------------------
def _store_with_runs(path, n, seed):
    rng = np.random.default_rng(seed)
    store = RunStore(path)
    ids = []
    for i in range(n):
        run_id = store.create_run(status="running", method="rome", config={"seed": seed, "i": i})
        store.write_step(run_id, edit_rows=[{"idx": 0, "step": 1, "n_edits": 1, "case_id": f"c{i}",
                                             "request": {"prompt": "p"}, "seconds": 0.5, "info": {"a": 1}}],
                         metric_rows=[{"n_edits": 1, "step": 1, "kind": "edit", "metric": "reliability",
                                       "protocol": "tf_token_acc", "value": float(v)} for v in rng.random(5)]
                         + [{"n_edits": 1, "kind": "weights", "layer": 3, "param": "w", "metric": "fro",
                             "value": float("nan")}],
                         artifacts=[("singular_values", {"w|W": rng.random(7)}, 1, 1)], n_edits_done=1)
        store.update_status(run_id, "finished")
        ids.append(run_id)
    return store, ids


def _dump(store):
    import sqlite3
    conn = sqlite3.connect(store.path)
    try:
        return {t: sorted(map(repr, conn.execute(f"SELECT * FROM {t}").fetchall()))
                for t in ("runs", "edits", "metrics", "artifacts")}
    finally:
        conn.close()


def test_merge_is_lossless_idempotent_and_refuses_conflicts(tmp_path, capsys):
    a, ids_a = _store_with_runs(tmp_path / "a", 2, 0)
    a.blob_limit = 64  # this one goes to a file beside the store (artifacts/<run_id>/...)
    big = {"basis": np.arange(100.0).reshape(10, 10)}
    a.add_artifact(ids_a[0], "big", big, n_edits=1, step=1)
    assert a.list_artifacts(ids_a[0])["format"].str.endswith("-file").any()
    b, ids_b = _store_with_runs(tmp_path / "b", 3, 1)
    sweeps = SweepStore(b)
    spec = load_spec({"name": "sb", "method": "rome", "seeds": [0, 1, 2]})
    sweeps.register(spec, "ray")
    for t, r in zip(spec.trials, ids_b):
        sweeps.add_run("sb", t.key, r)
    assert cli.main(["merge", str(tmp_path / "a"), str(tmp_path / "b" / "runs.sqlite"), "--runs-dir",
                     str(tmp_path / "c")]) == 0
    assert "5 run(s) copied" in capsys.readouterr().out
    c = RunStore(tmp_path / "c")
    got, want_a, want_b = _dump(c), _dump(a), _dump(b)
    for table in got:  # every row of both sources, byte for byte (NaN stays NULL, blobs equal)
        assert got[table] == sorted(want_a[table] + want_b[table]), table
    np.testing.assert_array_equal(c.get_artifact(ids_a[0], "big")["basis"], big["basis"])  # the file came along
    assert SweepStore(c).run_ids("sb") == SweepStore(b).run_ids("sb")
    assert list(SweepStore(c).trials("sb")["status"]) == ["finished"] * 3
    # merging again changes nothing
    report = merge_stores(c, [tmp_path / "a", tmp_path / "b"])
    assert report.copied == [] and sorted(report.identical) == sorted(ids_a + ids_b)
    assert _dump(c) == got
    # the same id with other content: refused, nothing of that store written
    b.add_metric_rows(ids_b[0], [{"n_edits": 2, "kind": "edit", "metric": "reliability", "value": 0.5}])
    extra = b.create_run(method="memit")
    with pytest.raises(MergeError, match=f"already in .* with other content: {ids_b[0]}"):
        merge_stores(c, [tmp_path / "b"])
    assert _dump(c) == got and extra not in set(c.list_runs()["run_id"])
    with pytest.raises(MergeError, match="is the destination store itself"):
        merge_stores(c, [tmp_path / "c"])
    with pytest.raises(MergeError, match="no run store at"):
        merge_stores(c, [tmp_path / "missing"])
    (tmp_path / "x.sqlite").write_bytes(b"")
    with pytest.raises(MergeError, match="not a run store"):
        merge_stores(c, [tmp_path / "x.sqlite"])


def test_plan_marks_finished_trials_skip(tmp_path):
    store = RunStore(tmp_path)
    spec = load_spec({"name": "pl", "method": "rome", "seeds": [0, 1]})
    sweeps = SweepStore(store)
    sweeps.register(spec, "local")
    sweeps.add_run("pl", spec.trials[0].key, _fake_run(store, rel=1, gen=1, loc=1, fro=1, fro0=1, cond=1, cond0=1))
    df = plan(spec, store)
    assert list(df["action"]) == ["skip", "run"] and list(df["status"]) == ["finished", "pending"]
    assert os.path.isfile(store.path) and isinstance(df, pd.DataFrame)


# ---------------------------------------------------------------------------------------------------------------
# the Ray Client shard (app.sweep_ray.StoreWriter is a plain class: no Ray needed to test what it ships)
# ---------------------------------------------------------------------------------------------------------------
def test_ray_client_shard_carries_its_artifact_files(tmp_path):
    """With ``ray://`` the writer's shard lives on the cluster and comes back as bytes; artifacts over the blob limit
    are files beside it (AlphaEdit's null bases, hidden states of a real model) and must come back too: a shard of
    the store file alone makes the merge refuse the run (its artifact file is missing)."""
    from app.sweep_ray import StoreWriter, merge_shard
    writer = StoreWriter(None)
    writer.store.blob_limit = 4096  # this instance only: the 40 kB array goes to a file, the small one stays a blob
    run_id = writer.store.create_run(status="running", method="rome", n_edits_planned=1)
    big, small = np.arange(5000, dtype=np.float64), np.ones(3)
    writer.store.write_step(run_id, artifacts=[("hidden_states", {"x": big}, 1, 1), ("small", {"y": small}, 1, 1)],
                            n_edits_done=1)
    writer.store.update_status(run_id, "finished", n_edits_done=1)
    assert set(writer.store.list_artifacts(run_id)["format"]) == {"npz-file", "npz"}
    local = RunStore(tmp_path / "local")
    merge_shard(writer.dump(), local)
    assert local.get_run(run_id)["status"] == "finished"
    np.testing.assert_array_equal(local.get_artifact(run_id, "hidden_states")["x"], big)
    np.testing.assert_array_equal(local.get_artifact(run_id, "small")["y"], small)
    merge_shard(writer.dump(), local)  # the same shard again: idempotent
    assert len(local.list_artifacts(run_id)) == 2


@pytest.mark.timeout(600)  # two spawned worker processes import torch / transformers
def test_local_workers_run_trials_in_processes_with_the_rows_of_one_process(tiny_dir, tmp_path):
    """``--executor local --workers 2``: each trial runs in a spawned worker process (its run row names that
    process) and writes the same rows as the same sweep run one trial after another in this process."""
    spec = {"name": "pool", "model": tiny_dir, "method": "rome", "n_edits": 2, "eval_every": 2, "seeds": [0, 1],
            "run": {"general": "none", "cache_dir": str(tmp_path / "cache"), "device": "cpu"},
            "overrides": {"layer": 1, "mom2_n_tokens": 2000, "v_num_grad_steps": 3}}
    pooled = run_sweep(spec, str(tmp_path / "pool"), executor="local", workers=2)
    inline = run_sweep(spec, str(tmp_path / "inline"), executor="local", workers=1)
    assert list(pooled.trials["status"]) == list(inline.trials["status"]) == ["finished", "finished"]
    ps, ins = RunStore(tmp_path / "pool"), RunStore(tmp_path / "inline")
    pids = {int(ps.get_run(r)["pid"]) for r in pooled.trials["run_id"]}
    assert os.getpid() not in pids
    assert {int(ins.get_run(r)["pid"]) for r in inline.trials["run_id"]} == {os.getpid()}
    for a, b in zip(pooled.trials["run_id"], inline.trials["run_id"]):
        assert len(ps.edits_frame(a)) == len(ins.edits_frame(b)) == 2
        fa = ps.metrics_frame([a], kinds=["edit", "retention", "weights"])
        fb = ins.metrics_frame([b], kinds=["edit", "retention", "weights"])
        assert len(fa) == len(fb) > 10
        np.testing.assert_allclose(fa["value"].to_numpy(), fb["value"].to_numpy(), rtol=1e-4, atol=1e-6)
