"""The engine's lifelong-editing seams on tiny models: the WILD protocol in runs (rows, the fixed retention subset,
probe locality) and an editor's own state (``editor_state`` artifacts that a replay reproduces and a fresh editor
restores)."""
from __future__ import annotations

import numpy as np
import torch

from analysis import evaluation as ev
from app.engine import run_sequential
from app.runconfig import RunConfig
from app.store import RunStore
from editors.base import ConfigError
from editors.presets import build_config
from editors.registry import get_editor_class
from tests.engine_doubles import PROBES


def _cfg(tmp_path, **kw) -> RunConfig:
    base = dict(method="unit-shift", n_edits=4, eval_every=1, runs_dir=str(tmp_path), general="none", device="cpu",
                update_angles=False)
    base.update(kw)
    return RunConfig(**base)


def test_wild_protocol_in_a_run(tmp_path, tiny_llama, standins):
    cfg = _cfg(tmp_path, protocols=(ev.TF, ev.WILD), wild_max_tokens=3, wild_retention_max=2, n_edits=4,
               batch_size=1, eval_every=2)
    run_id = run_sequential(cfg, lm=tiny_llama)
    store = RunStore(tmp_path)
    assert store.get_run(run_id)["status"] == "finished", store.get_run(run_id)["error"]
    df = store.metrics_frame([run_id])
    cases = df[df["case_id"].notna()]
    for kind in ("pre", "edit", "retention"):
        got = set(cases.loc[cases["kind"] == kind, "protocol"])
        assert {ev.TF, ev.WILD, ev.WILD_F1} <= got, (kind, got)
    ret = cases[(cases["kind"] == "retention") & (cases["metric"] == "reliability")]
    # intermediate checkpoint (2 edits): WILD on the seeded subset of the 4 planned requests that is done; TF on all
    mid_tf = ret[(ret["n_edits"] == 2) & (ret["protocol"] == ev.TF)]
    mid_wild = ret[(ret["n_edits"] == 2) & (ret["protocol"] == ev.WILD)]
    assert len(mid_tf) == 2 and len(mid_wild) <= 2
    last = ret[ret["n_edits"] == 4]
    assert len(last[last["protocol"] == ev.WILD]) == 4  # the last checkpoint scores every edit
    loc = df[(df["kind"] == "locality") & df["case_id"].notna()]
    assert set(loc["protocol"]) == {ev.TF, ev.WILD, ev.WILD_F1}
    assert len(loc[(loc["protocol"] == ev.WILD) & (loc["n_edits"] == 2)]) == len(PROBES)


def test_immediate_protocols_score_edits_with_a_subset(tmp_path, tiny_llama, standins):
    """immediate_protocols=(tf,): each edit is scored right after it teacher-forced only, the checkpoints with every
    protocol (fails if the immediate evaluation ignored the field, or the checkpoints used it too)."""
    cfg = _cfg(tmp_path, protocols=(ev.TF, ev.WILD), immediate_protocols=(ev.TF,), wild_max_tokens=3, n_edits=2,
               batch_size=1, eval_every=2)
    run_id = run_sequential(cfg, lm=tiny_llama)
    store = RunStore(tmp_path)
    assert store.get_run(run_id)["status"] == "finished", store.get_run(run_id)["error"]
    assert store.get_run(run_id)["config"]["immediate_protocols"] == [ev.TF]
    cases = (df := store.metrics_frame([run_id]))[df["case_id"].notna()]
    assert set(cases.loc[cases["kind"] == "edit", "protocol"]) == {ev.TF}
    assert {ev.TF, ev.WILD, ev.WILD_F1} <= set(cases.loc[cases["kind"] == "retention", "protocol"])
    assert {ev.TF, ev.WILD, ev.WILD_F1} <= set(cases.loc[cases["kind"] == "pre", "protocol"])


def test_wild_run_fields_are_validated():
    import pytest
    for bad in ({"wild_context": "judge"}, {"wild_max_tokens": 0}, {"wild_retention_max": -1},
                {"immediate_protocols": (ev.WILD,)}):  # not one of the run's protocols (tf, margin)
        with pytest.raises(ConfigError, match=next(iter(bad))):
            RunConfig(method="unit-shift", **bad).validate()


def test_editor_state_is_stored_replayed_and_restored(tmp_path, tiny_llama, standins):
    over = {"layers": (1, 2), "chunk_size": 1, "lr": 1e-2}
    cfg = _cfg(tmp_path, method="ultraedit", method_overrides=over, n_edits=4, batch_size=2, eval_every=1)
    a = run_sequential(cfg, lm=tiny_llama)
    b = run_sequential(cfg, lm=tiny_llama)
    store = RunStore(tmp_path)
    assert store.get_run(a)["status"] == "finished", store.get_run(a)["error"]
    arts = store.list_artifacts(a)
    assert sorted(arts.loc[arts["name"] == "editor_state", "n_edits"]) == [2, 4]
    sa, sb = store.get_artifact(a, "editor_state", 4), store.get_artifact(b, "editor_state", 4)
    assert set(sa) == set(sb) and all(np.array_equal(sa[k], sb[k]) for k in sa)  # the replay reproduces it
    first = store.get_artifact(a, "editor_state", 2)
    assert int(first["stats|shared|n"]) < int(sa["stats|shared|n"])
    # a fresh editor restored from the artifact makes the same next edit as one that made the first two edits
    cls = get_editor_class("ultraedit")
    config, _ = build_config("ultraedit", tiny_llama.name, over, use_preset=False)
    restored = cls(tiny_llama, config)
    restored.load_state_dict(first)
    lived = cls(tiny_llama, config)
    r0 = lived.edit(standins[:2])
    lived.after_apply(standins[:2], r0)
    ra, rb = restored.edit(standins[2:4]), lived.edit(standins[2:4])
    assert all(torch.equal(ra.deltas[n], rb.deltas[n]) for n in ra.deltas)
