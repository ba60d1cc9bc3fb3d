"""The collapse study (app/study.py) on a tiny random model: two methods, a few sequential edits, one run store.

Checks the table's columns, that the weight ratios come from the store's ``weights`` rows against the unedited
model (MOSE keeps norm and condition number exactly: ratio 1), that a second call reuses the finished runs, and
``report_only``.
"""
from __future__ import annotations

import json

import pytest

from app.store import RunStore
from app.study import TABLE_COLUMNS, collapse_study, format_table
from editors.testing import tiny_model

RECORDS = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
     "target_true": "Paris", "rephrase_prompts": ["Where is the Eiffel Tower? It is in"],
     "locality_prompts": ["The capital of France is"], "locality_answers": ["Paris"]},
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "English",
     "target_true": "French"},
    {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano", "target_true": "guitar"},
]

SMALL = {
    "mose": {"candidate_layers": (1, 2), "mom2_n_tokens": 2000, "v_num_grad_steps": 2},
    "adaedit": {"layers": (1, 2), "mom2_n_tokens": 2000, "v_num_grad_steps": 2},
}


def test_collapse_study_table_reuse_and_report(tmp_path):
    data = tmp_path / "edits.json"
    data.write_text(json.dumps(RECORDS))
    lm = tiny_model("llama", seed=21)
    runs = tmp_path / "runs"
    kw = dict(eval_every=2, method_overrides=SMALL, lm=lm, locality_probes="none")
    table = collapse_study(["mose", "adaedit"], 3, str(data), str(runs), **kw)
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert list(table["method"]) == ["mose", "adaedit"]
    assert (table["status"] == "finished").all() and (table["n_edits"] == 3).all()
    for col in ("reliability", "generality", "locality", "fro_rel", "cond_rel"):
        assert table[col].notna().all(), col
    mose = table.set_index("method").loc["mose"]
    assert mose["fro_rel"] == pytest.approx(1.0, abs=1e-4) and mose["cond_rel"] == pytest.approx(1.0, abs=1e-3)
    assert "fro_rel" in format_table(table)
    # beside them: the drift and the preserved outputs' change (MOSE keeps the norm but its matrices move)
    for col in ("drift", "drift_max", "preserve", "preserve_max"):
        assert table[col].notna().all(), col
    assert mose["drift"] > 1e-4 and mose["preserve"] > 1e-5 and mose["drift_max"] >= mose["drift"]
    assert "drift" in format_table(table) and "preserve" in format_table(table)
    n_runs = len(RunStore(str(runs)).list_runs())
    again = collapse_study(["mose", "adaedit"], 3, str(data), str(runs), **kw)
    assert list(again["run_id"]) == list(table["run_id"]) and len(RunStore(str(runs)).list_runs()) == n_runs
    report = collapse_study(["mose"], 3, str(data), str(runs), report_only=True, **kw)
    assert list(report["run_id"]) == [table["run_id"].iloc[0]]


def test_an_interrupted_study_continues_its_unfinished_run(tmp_path):
    """A study stopped inside a method's run (Ctrl-C after its 2nd edit, past the checkpoint at 2) is continued
    by the same call: the unfinished run resumes from its snapshot (one run in the store, every edit once) and the
    table equals that of an uninterrupted study in another store."""
    data = tmp_path / "edits.json"
    data.write_text(json.dumps(RECORDS))
    lm = tiny_model("llama", seed=21)
    kw = dict(eval_every=2, method_overrides=SMALL, lm=lm, locality_probes="none")

    def stop_after_two(method, done, total, info):
        if info.get("phase") == "edit" and info.get("n_edits") == 3:
            raise KeyboardInterrupt

    runs = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        collapse_study(["adaedit"], 3, str(data), str(runs), progress=stop_after_two, **kw)
    store = RunStore(runs)
    (run_id,) = list(store.list_runs()["run_id"])
    assert store.get_run(run_id)["status"] == "interrupted"
    table = collapse_study(["adaedit"], 3, str(data), str(runs), **kw)
    assert list(store.list_runs()["run_id"]) == [run_id]
    assert store.get_run(run_id)["status"] == "finished"
    assert list(store.edits_frame(run_id)["idx"]) == [0, 1, 2]
    clean = collapse_study(["adaedit"], 3, str(data), str(tmp_path / "clean"), **kw)
    cols = ["n_edits", "reliability", "generality", "fro_rel", "cond_rel", "drift"]
    for col in cols:
        assert table[col].astype(float).tolist() == pytest.approx(clean[col].astype(float).tolist(), rel=1e-5), col
