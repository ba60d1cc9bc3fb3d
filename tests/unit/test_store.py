"""The SQLite run store: round trip, WAL, concurrent reader + writer, interrupted runs, export."""
from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest

from app.store import METRIC_COLUMNS, RunNotFoundError, RunStore, StoreError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _fill(store: RunStore, **fields) -> str:
    run_id = store.create_run(status="running", method="ft", model="tiny", data_source="builtin",
                              config={"n_edits": 2, "protocols": ["tf_token_acc"]}, method_config={"lr": 0.1},
                              package_versions={"torch": "x"}, n_edits_planned=2, pid=os.getpid(), **fields)
    store.add_edit_rows(run_id, [
        {"idx": 0, "step": 1, "n_edits": 1, "case_id": "a", "request": {"prompt": "p"}, "seconds": 0.5,
         "peak_mem_mb": 10.0, "info": {"loss": 1.0}},
        {"idx": 1, "step": 2, "n_edits": 2, "case_id": "b", "request": {"prompt": "q"}, "seconds": 0.25,
         "peak_mem_mb": 11.0, "info": {}},
    ])
    store.add_metric_rows(run_id, [
        {"n_edits": 1, "step": 1, "kind": "edit", "metric": "reliability", "protocol": "tf_token_acc", "value": 1.0,
         "case_id": "a"},
        {"n_edits": 2, "step": 2, "kind": "retention", "metric": "reliability", "protocol": "tf_token_acc",
         "value": 0.5},
        {"n_edits": 2, "step": 2, "kind": "weights", "layer": 3, "param": "model.layers.3.mlp.down_proj.weight",
         "metric": "fro", "value": 12.5},
        {"n_edits": 2, "step": 2, "kind": "weights", "layer": 3, "param": "model.layers.3.mlp.down_proj.weight",
         "metric": "delta_cond", "value": float("nan")},
        {"n_edits": 2, "step": 2, "kind": "weights", "layer": 3, "param": "model.layers.3.mlp.down_proj.weight",
         "metric": "cond", "value": float("inf")},
    ])
    return run_id


def test_round_trip(tmp_path):
    store = RunStore(tmp_path)
    assert store.path == str(tmp_path / "runs.sqlite")
    run_id = _fill(store)
    run = store.get_run(run_id)
    assert run["status"] == "running" and run["method"] == "ft"
    assert run["config"] == {"n_edits": 2, "protocols": ["tf_token_acc"]}
    assert run["method_config"] == {"lr": 0.1} and run["package_versions"] == {"torch": "x"}

    store.update_status(run_id, "finished", n_edits_done=2, seconds_total=3.0)
    again = RunStore(str(tmp_path / "runs.sqlite"))  # the file path works too
    assert again.get_run(run_id)["status"] == "finished"
    assert again.get_run(run_id[:12])["run_id"] == run_id  # unique prefix

    df = again.metrics_frame([run_id])
    assert list(df.columns) == list(METRIC_COLUMNS)
    assert len(df) == 5
    w = df[df["kind"] == "weights"].set_index("metric")
    assert w.loc["fro", "layer"] == 3 and w.loc["fro", "value"] == 12.5
    assert math.isnan(w.loc["delta_cond", "value"]) and w.loc["cond", "value"] == math.inf
    assert df.loc[df["kind"] == "retention", "layer"].isna().all()
    assert df.loc[df["kind"] == "retention", "case_id"].isna().all()
    assert list(df.loc[df["kind"] == "edit", "case_id"]) == ["a"]
    assert len(again.metrics_frame(run_id, kinds=["weights"], metrics="fro")) == 1

    edits = again.edits_frame(run_id)
    assert list(edits["case_id"]) == ["a", "b"] and list(edits["n_edits"]) == [1, 2]
    assert edits["request"][0] == {"prompt": "p"} and edits["info"][0] == {"loss": 1.0}

    sv = np.linspace(3, 1, 5)
    again.add_artifact(run_id, "singular_values", {"W": sv}, n_edits=2, step=2)
    again.add_artifact(run_id, "singular_values", {"W": sv * 2}, n_edits=4, step=4)
    np.testing.assert_array_equal(again.get_artifact(run_id, "singular_values", n_edits=2)["W"], sv)
    np.testing.assert_array_equal(again.get_artifact(run_id, "singular_values")["W"], sv * 2)  # latest
    assert list(again.list_artifacts(run_id)["n_edits"]) == [2, 4]
    with pytest.raises(KeyError):
        again.get_artifact(run_id, "nothing")

    runs = again.list_runs()
    assert list(runs["run_id"]) == [run_id] and runs["created"].dt.tz is not None
    assert again.list_runs(method="rome").empty and len(again.list_runs(status=["finished", "failed"])) == 1

    again.delete_run(run_id)
    assert again.list_runs().empty
    assert again.metrics_frame([run_id]).empty  # cascaded
    with pytest.raises(RunNotFoundError):
        again.get_run(run_id)


def test_unknown_fields_and_statuses_are_rejected(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(TypeError, match="unknown run field 'colour'"):
        store.create_run(colour="red")
    with pytest.raises(StoreError, match="unknown status"):
        store.create_run(status="exploded")
    with pytest.raises(RunNotFoundError):
        store.update_run("nope", status="finished")


def test_wal_mode_and_foreign_keys(tmp_path):
    store = RunStore(tmp_path)
    assert store.journal_mode() == "wal"
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    with pytest.raises(sqlite3.IntegrityError):  # an edit row of a run that does not exist
        store.add_edit_rows("missing", [{"step": 1, "n_edits": 1}])


def test_reader_and_writer_at_the_same_time(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create_run(status="running", pid=os.getpid())
    # a reader holding an open read transaction does not block the writer (WAL)
    reader = sqlite3.connect(store.path, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 0
    store.add_metric_rows(run_id, [{"n_edits": 1, "kind": "edit", "metric": "m", "value": 1.0}])
    assert reader.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 0  # its snapshot
    reader.execute("COMMIT")
    assert reader.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 1
    reader.close()

    # one writer thread (steps plus heartbeats) and a polling reader thread
    errors: list[BaseException] = []
    done = threading.Event()

    def write():
        try:
            for i in range(40):
                store.write_step(run_id, metric_rows=[{"n_edits": i, "kind": "edit", "metric": "m", "value": i}],
                                 n_edits_done=i)
                store.heartbeat(run_id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    def read():
        try:
            reader_store = RunStore(tmp_path, recover=False)
            while not done.is_set():
                reader_store.metrics_frame([run_id])
                reader_store.list_runs()
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert store.get_run(run_id)["n_edits_done"] == 39
    assert len(store.metrics_frame([run_id])) == 41


def test_dead_writer_becomes_interrupted_and_keeps_rows(tmp_path):
    store = RunStore(tmp_path)
    dead = _fill(store)
    store.update_run(dead, pid=_dead_pid())
    alive = store.create_run(status="running", pid=os.getpid(), heartbeat=time.time())
    finished = store.create_run(status="finished", pid=_dead_pid())

    reopened = RunStore(tmp_path)
    run = reopened.get_run(dead)
    assert run["status"] == "interrupted" and "pid" in run["error"]
    assert len(reopened.edits_frame(dead)) == 2 and len(reopened.metrics_frame([dead])) == 5
    assert reopened.get_run(alive)["status"] == "running"
    assert reopened.get_run(finished)["status"] == "finished"


def test_stale_heartbeat_on_another_host_becomes_interrupted(tmp_path):
    store = RunStore(tmp_path)
    stale = store.create_run(status="running", pid=1, host="some-other-host", heartbeat=time.time() - 3600)
    fresh = store.create_run(status="running", pid=1, host="some-other-host", heartbeat=time.time())
    reopened = RunStore(tmp_path, stale_after=600)
    assert reopened.get_run(stale)["status"] == "interrupted"
    assert "heartbeat" in reopened.get_run(stale)["error"]
    assert reopened.get_run(fresh)["status"] == "running"
    # a run that was only slow comes back with its next heartbeat
    reopened.heartbeat(stale, n_edits_done=3)
    assert reopened.get_run(stale)["status"] == "running"
    assert reopened.get_run(stale)["n_edits_done"] == 3


def test_cancel_request(tmp_path):
    store = RunStore(tmp_path)
    queued = store.create_run(status="queued")
    running = store.create_run(status="running", pid=os.getpid())
    store.request_cancel(queued)
    store.request_cancel(running)
    assert store.get_run(queued)["status"] == "cancelled"
    assert store.get_run(running)["status"] == "running" and store.cancel_requested(running)


def test_ambiguous_prefix(tmp_path):
    store = RunStore(tmp_path)
    store.create_run(run_id="abc-1")
    store.create_run(run_id="abc-2")
    with pytest.raises(RunNotFoundError, match="ambiguous"):
        store.resolve("abc-")
    assert store.resolve("abc-2") == "abc-2"


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_columns(tmp_path, fmt):
    store = RunStore(tmp_path)
    run_id = _fill(store)
    out = store.export(run_id, fmt, tmp_path / f"out.{fmt}")
    df = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
    for col in ("run_id", "n_edits", "kind", "layer", "metric", "protocol", "value", "case_id"):
        assert col in df.columns
    assert set(df["kind"]) == {"edit", "retention", "weights", "edit_log"}
    assert df.loc[df["kind"] == "retention", "layer"].isna().all()
    assert (df.loc[df["kind"] == "weights", "layer"] == 3).all()
    log = df[df["kind"] == "edit_log"]
    assert sorted(log["metric"].unique()) == ["peak_mem_mb", "seconds"] and len(log) == 4
    if fmt == "csv":
        text = open(out).read().splitlines()
        header = text[0].split(",")
        retention = next(line for line in text if ",retention," in line).split(",")
        assert retention[header.index("layer")] == ""  # empty, not "nan" / "<NA>"
    with pytest.raises(StoreError, match="valid: csv, parquet"):
        store.export(run_id, "xlsx", tmp_path / "out.xlsx")
