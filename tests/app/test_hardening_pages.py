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


def test_the_worker_reports_its_phases_and_the_card_shows_them(tmp_path, tiny_llama, standins):
    """The engine's phases reach the job row through the worker's callback; run_progress says them in words, counts
    the ETA from the first edit (not the setup) and says "cancelling" once Cancel was pressed."""
    import time

    from app import backend
    from app.engine import run_sequential
    from app.jobs import JobQueue
    from app.runconfig import RunConfig
    from app.store import RunStore
    from app.worker import JobProgress
    store, queue = RunStore(str(tmp_path)), JobQueue(str(tmp_path))
    run_id, job_id = backend.submit_run(store, queue, {"method": "unit-shift", "n_edits": 4, "eval_every": 2,
                                                      "general": "none", "label": "lecture"}, start_worker=False)
    queue.claim("auto", os.getpid())
    seen = []
    report = JobProgress(queue, job_id)

    def progress(done, total, info):
        report(done, total, info)
        p = backend.run_progress(store, queue, run_id)
        seen.append((queue.get(job_id).progress["phase"], p.phase))

    config = RunConfig.from_dict(queue.get(job_id).payload["config"])
    run_sequential(config, store, lm=tiny_llama, run_id=run_id, progress=progress)
    phases = [s[0] for s in seen]
    for expected in ("prepare", "reference", "pre_eval", "edit", "checkpoint"):
        assert expected in phases, phases
    words = dict(seen)
    assert words["pre_eval"] == "pre-evaluation of the unedited model"
    assert words["checkpoint"].startswith("checkpoint")
    assert [w for _, w in seen if w and w.startswith("edit ")][:2] == ["edit 1 of 4", "edit 2 of 4"], seen

    # a running run half-way: the ETA counts from the first edit, not from the (long) setup
    rid, jid = backend.submit_run(store, queue, {"method": "unit-shift", "n_edits": 10}, start_worker=False)
    queue.claim("auto", os.getpid())
    now = time.time()
    store.update_run(rid, status="running", n_edits_done=5, pid=os.getpid())
    queue.set_progress(jid, {"phase": "edit", "since": now, "done": 5, "total": 10, "edits_started": now - 50})
    p = backend.run_progress(store, queue, rid)
    assert p.method == "unit-shift" and p.phase == "edit 6 of 10" and not p.cancelling
    assert 45 <= p.eta_seconds <= 60, p.eta_seconds  # 50 s for 5 edits -> ~50 s for the other 5
    backend.cancel_run(store, queue, rid)
    p = backend.run_progress(store, queue, rid)
    assert p.status == "running" and p.cancelling


def test_progress_card_says_cancelling_instead_of_offering_cancel(tmp_path, make_app):
    import time

    from app import backend
    from app.jobs import JobQueue
    from app.store import RunStore
    store, queue = RunStore(str(tmp_path)), JobQueue(str(tmp_path))
    rid, jid = backend.submit_run(store, queue, {"method": "ft", "n_edits": 6, "label": "demo"}, start_worker=False)
    queue.claim("auto", os.getpid())
    store.update_run(rid, status="running", n_edits_done=0, pid=os.getpid())
    queue.set_progress(jid, {"phase": "pre_eval", "since": time.time() - 3, "done": 0, "total": 6})
    at = make_app(str(tmp_path), "new_run.py", query={"runs": rid})
    text = " ".join(m.value for m in at.markdown)
    assert "ft" in text and "demo" in text
    assert any("pre-evaluation" in (getattr(p, "text", "") or "") for p in at.get("progress")) or \
        "pre-evaluation" in str(at.get("progress")[0].proto)
    at.button(key=f"cancel-{rid}").click().run()
    assert not [b for b in at.button if b.key == f"cancel-{rid}"]
    assert "cancelling" in " ".join(m.value for m in at.markdown)


def test_metrics_chart_is_lecture_ready(tmp_path, make_app):
    """A title naming the protocol and the runs, axis titles with the scale, integer edit ticks, a legend below the
    x-axis title, and two runs of the same method in two colours."""
    from app.store import RunStore
    from tests.app.conftest import plotly_specs
    from tests.fixtures import synthetic_run
    store = RunStore(str(tmp_path))
    a = synthetic_run(store, method="rome", n_edits=8, eval_every=2, hidden=False, per_case=False, seed=0)
    b = synthetic_run(store, method="rome", n_edits=8, eval_every=2, hidden=False, per_case=False, seed=1)
    at = make_app(str(tmp_path), "metrics.py", query={"runs": f"{a},{b}"})
    spec = plotly_specs(at)[0]
    layout = spec["layout"]
    assert "tf_token_acc" in layout["title"]["text"] and "rome" in layout["title"]["text"]
    assert layout["yaxis"]["title"]["text"].startswith("score (0–1")
    xaxes = [v for k, v in layout.items() if k.startswith("xaxis")]
    assert all(ax.get("tickformat") == "d" for ax in xaxes)
    assert any(ax.get("title", {}).get("text") == "edits made (n)" for ax in xaxes)
    assert layout["legend"]["y"] < -0.12 and layout["legend"]["yanchor"] == "top"
    colours = {t["line"]["color"] for t in spec["data"] if t.get("line", {}).get("color")}
    assert len(colours) >= 2


def test_weights_chart_names_its_metric(synthetic_store, make_app):
    from tests.app.conftest import plotly_specs
    path, rome, _ = synthetic_store
    at = make_app(path, "weights.py", query={"runs": rome})
    spec = plotly_specs(at)[0]
    titles = [a["text"] for a in spec["layout"].get("annotations", [])]
    assert any("condition number" in t for t in titles), titles
    assert "condition number" in spec["layout"]["yaxis"]["title"]["text"]
    assert spec["layout"]["xaxis"]["tickformat"] == "d"


def test_upload_messages_are_for_people():
    import json

    from app import backend
    from tests.app.conftest import FACT
    bad = json.dumps([FACT, {**FACT, "case_id": "t1", "subject": "Big Ben"}]).encode()
    with pytest.raises(backend.JobError) as info:
        backend.parse_upload(bad, "my-edits.json")
    text = str(info.value)
    assert text.count("my-edits.json") == 1 and "record 2" in text and "'subject'" in text, text
    with pytest.raises(backend.JobError) as info:
        backend.parse_upload(b"[" + b" " * (7 * 2 ** 20) + b"]", "big.json", limit=5 * 2 ** 20)
    assert str(info.value).startswith("big.json is 7.0 MB, over the upload limit of 5 MB"), str(info.value)
    with pytest.raises(backend.JobError) as info:
        backend.parse_upload(b"{not json", "broken.json")
    assert str(info.value).count("broken.json") == 1, str(info.value)
    lines = (json.dumps(FACT) + "\n" + json.dumps({**FACT, "case_id": "t2", "target_new": ""}) + "\n").encode()
    with pytest.raises(backend.JobError, match=r"edits.jsonl, record 2 \(line 2"):
        backend.parse_upload(lines, "edits.jsonl")


def test_playground_errors_use_the_form_labels(tmp_path):
    from app import backend
    from app.jobs import JobQueue
    from tests.app.conftest import FACT
    queue = JobQueue(str(tmp_path))
    with pytest.raises(backend.JobError) as info:
        backend.submit_playground(queue, {"model": "default", "method": "rome", "request": {**FACT, "target_new": ""}},
                                  start_worker=False)
    assert str(info.value) == "New target: empty"


def test_the_playground_explains_a_rank_one_edit_in_words():
    from app import backend
    ex = {"params": [{"param": "model.layers.5.mlp.down_proj.weight", "layer": 5, "kind": "MLP output", "rank": 1,
                      "delta_norm": 0.8, "rel_norm": 0.0123, "max_abs": 0.01}]}
    text = backend.explain_in_words(ex, {"subject": "The Eiffel Tower", "target_new": "Rome"})
    assert "layer 5" in text and "rank-1" in text and "The Eiffel Tower" in text and "Rome" in text
    assert "1.23%" in text
    assert "rank-3" in backend.explain_in_words({"params": [{**ex["params"][0], "rank": 3}]}, {})


def test_general_page_draws_chance_as_a_line_and_geometry_hides_geoedit_for_others(tmp_path, make_app):
    from app.store import RunStore
    from tests.app.conftest import plotly_specs
    from tests.fixtures import synthetic_run
    store = RunStore(str(tmp_path))
    run = synthetic_run(store, method="ft", n_edits=8, eval_every=2, hidden=False, per_case=False, seed=0)
    store.add_metric_rows(run, [{"n_edits": n, "step": n, "kind": "general", "metric": f"{task}/chance",
                                 "protocol": "logprob_choice", "value": 0.5}
                                for n in (0, 2, 4, 6, 8) for task in ("nli", "sentiment")])
    at = make_app(str(tmp_path), "general.py", query={"runs": run})
    spec = plotly_specs(at)[0]
    titles = [a["text"] for a in spec["layout"].get("annotations", [])]
    assert not any(t.endswith("/chance") for t in titles), titles  # no panel of its own
    lines = [sh for sh in spec["layout"].get("shapes", []) if sh.get("y0") == 0.5 and sh.get("y1") == 0.5]
    assert len(lines) == 2 and "chance" in titles
    assert spec["layout"]["yaxis"]["range"] == [-0.02, 1.02]
    at = make_app(str(tmp_path), "geometry.py", query={"runs": run})
    assert not [h for h in at.subheader if "GeoEdit" in h.value]
