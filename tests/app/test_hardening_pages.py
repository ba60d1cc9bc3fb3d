"""Issue 20 in the app: the Runs page while every run is queued, server paths of the New-run page restricted to the
data folders, the /runs route."""
from __future__ import annotations

import os

import pytest


def test_runs_page_with_only_queued_runs(tmp_path, make_app):
    from app.store import RunStore
    store = RunStore(str(tmp_path))
    a = store.create_run(status="queued", method="rome", n_edits_planned=6)
    b = store.create_run(status="running", method="ft", n_edits_planned=6, pid=os.getpid())
    at = make_app(str(tmp_path))
    assert not at.exception
    assert set(at.dataframe[0].value["run_id"]) == {a, b}


@pytest.mark.parametrize("source,key", [("CounterFact file", "nr-cf"), ("zsRE file", "nr-zsre")])
def test_new_run_refuses_server_paths_outside_the_data_folders(tmp_path, make_app, source, key):
    secret = tmp_path / "secret.json"
    secret.write_text("[]")
    at = make_app(str(tmp_path / "runs"), "new_run.py")
    at.radio(key="nr-source").set_value(source).run()
    assert not at.error, [e.value for e in at.error]  # the shared data file is inside the default folder
    at.text_input(key=key).set_value("/etc/passwd").run()
    assert any("outside the data folders" in e.value for e in at.error), [e.value for e in at.error]
    assert at.button(key="nr-start").disabled
    at.text_input(key=key).set_value(str(tmp_path / "runs" / "uploads" / ".." / ".." / "secret.json")).run()
    assert any("outside the data folders" in e.value for e in at.error)


def test_submit_run_refuses_a_path_outside_the_roots(tmp_path):
    from app import backend
    from app.jobs import JobQueue
    from app.store import RunStore
    store, queue = RunStore(str(tmp_path)), JobQueue(str(tmp_path))
    with pytest.raises(backend.JobError, match="outside the data folders"):
        backend.submit_run(store, queue, {"method": "ft", "data": "counterfact:/etc/passwd"}, start_worker=False)
    assert store.list_runs().empty
    roots = backend.check_data_source("zsre:../shared/data/zsre/zsre-800.json")
    assert roots.startswith("zsre:")
