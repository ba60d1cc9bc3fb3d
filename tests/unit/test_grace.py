"""GRACE (editors/grace.py): the codebook's decision rules on integer coordinates, inference boundaries, replacement
locality, exact undo, hooks, state round trip, and weights that never change in a run. Each test names the wrong
variant it fails on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from app.engine import run_sequential
from app.runconfig import RunConfig
from app.store import RunStore
from editors.base import EditError, apply_result, make_config
from editors.grace import SPLIT_MARGIN, Codebook, GRACEConfig, GRACEEditor, decide
from editors.requests import make_request

REQS = [
    make_request(source="test", record=0, case_id="eiffel", prompt="The Eiffel Tower is located in the city of",
                 subject="The Eiffel Tower", target_new="Rome", target_true="Paris",
                 rephrase_prompts=["Where is the Eiffel Tower? It is in"]),
    make_request(source="test", record=1, case_id="darrieux", prompt="The mother tongue of Danielle Darrieux is",
                 subject="Danielle Darrieux", target_new="English", target_true="French"),
]


def _pt(*xy):
    return torch.tensor(xy, dtype=torch.float64)


K1 = _pt(0, 0)[None]


@pytest.mark.parametrize("q, same, action, eps_j, eps_new", [
    ((3, 0), True, "add", 1.0, 1.0),            # d = 3 > ε₀ + ε₁ = 2
    ((3, 0), False, "add", 1.0, 1.0),
    ((2, 0), True, "expand", 2.0, None),        # d = 2 is not > 2 (wrong variant '>=' adds)
    ((2, 0), False, "split", 1.0 - SPLIT_MARGIN, 1.0),
    ((1, 0), True, "keep", 1.0, None),
    ((0, 0), False, "split", -SPLIT_MARGIN, 0.0),
])
def test_decision_rules(q, same, action, eps_j, eps_new):
    d = decide(K1, [1.0], [(7,)], _pt(*q), (7,) if same else (8,), 1.0)
    assert d.action == action and d.j == 0
    assert d.eps_j == pytest.approx(eps_j, abs=1e-15)
    assert (d.eps_new is None) == (eps_new is None) and (eps_new is None or d.eps_new == pytest.approx(eps_new))
    assert decide(K1[:0], [], [], _pt(*q), (7,), 1.0).action == "add"


def _codebook(points, eps, labels) -> Codebook:
    cb = Codebook(2, 1)
    for i, (p, e, y) in enumerate(zip(points, eps, labels)):
        cb.add(torch.tensor(p, dtype=torch.float32), torch.tensor([float(i)]), e, (y,), f"e{i}")
    return cb


def test_inference_boundaries():
    cb = _codebook([(0, 0)], [1.0], [7])
    hit, j = cb.lookup(torch.tensor([[1.0, 0.0], [0.0, 1.0 + 1e-6], [0.0, -1.0]]))
    assert hit.tolist() == [True, False, True]  # d = ε hits (wrong variant '<' misses the first)
    # after a split of (0,0) by (2,0): the midpoint is at distance 1 of both, the tie goes to entry 0, radius 1 − 1e-5
    split = _codebook([(0, 0), (2, 0)], [1.0 - SPLIT_MARGIN, 1.0], [7, 8])
    hit, j = split.lookup(torch.tensor([[1.0, 0.0]]))
    assert j.tolist() == [0] and hit.tolist() == [False]  # wrong variant: a split without the margin hits
    # nearest only: inside entry 1's radius, but entry 0 is nearer and its radius is small
    near = _codebook([(0, 0), (3, 0)], [0.1, 5.0], [7, 8])
    hit, j = near.lookup(torch.tensor([[1.0, 0.0]]))
    assert j.tolist() == [0] and hit.tolist() == [False]


def _editor(lm, **over) -> GRACEEditor:
    return GRACEEditor(lm, make_config(GRACEConfig, {"layer": 2, "n_iter": 5, **over}, method="grace"), seed=0)


def _host_io(lm, ed, prompt):
    """Host module output of ``prompt`` and the lookup of its inputs."""
    from editors.hooks import Trace
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    with torch.no_grad(), Trace(lm.model, [ed.module_name], retain_input=True, retain_output=True) as tr:
        lm.model(input_ids=ids)
    return tr.inputs[ed.module_name][0], tr.outputs[ed.module_name][0]


def test_replacement_locality_and_undo(tiny_llama):
    lm = tiny_llama
    ed = _editor(lm)
    ed.prepare()
    try:
        other = "Michael Jordan plays the sport of"
        h0, base_other = _host_io(lm, ed, other)
        _, base_edit = _host_io(lm, ed, REQS[0].prompt)
        res = ed.edit(REQS)
        undo = apply_result(lm, res)
        assert len(ed.codebook) == 2 and ed.codebook.edit_ids == ["eiffel", "darrieux"]
        h, out = _host_io(lm, ed, REQS[0].prompt)
        hit, j = ed.codebook.lookup(h)
        assert bool(hit[-1]) and int(j[-1]) == 0  # the edit prompt's last token hits its own key
        assert torch.equal(out[hit], ed.codebook.values[j[hit]])  # hit positions = the value
        assert torch.equal(out[~hit], base_edit[~hit])  # other positions bit-identical to the base model
        o_hit, _ = ed.codebook.lookup(h0)
        _, out_other = _host_io(lm, ed, other)
        assert torch.equal(out_other[~o_hit], base_other[~o_hit])
        # a same-label re-edit (retrain) and a conflicting one (split), then undo everything in reverse
        states = [(len(ed.codebook), ed.codebook.keys.clone(), ed.codebook.values.clone(), list(ed.codebook.eps))]
        ed.after_apply(REQS, res)
        conflict = make_request(source="test", record=2, case_id="eiffel2", prompt=REQS[0].prompt,
                                subject="The Eiffel Tower", target_new="Berlin", target_true="Paris")
        undos = []
        for batch in ([REQS[0]], [conflict]):
            states.append((len(ed.codebook), ed.codebook.keys.clone(), ed.codebook.values.clone(),
                           list(ed.codebook.eps)))
            r = ed.edit(batch)
            undos.append(apply_result(lm, r))
        assert len(ed.codebook) == 3 and ed.codebook.eps[0] == pytest.approx(-SPLIT_MARGIN)  # d = 0: latest wins
        for u, (n, k, v, e) in zip(reversed(undos), reversed(states[1:])):
            u(lm.model)
            assert len(ed.codebook) == n and torch.equal(ed.codebook.keys, k)
            assert torch.equal(ed.codebook.values, v) and ed.codebook.eps == e
        undo(lm.model)
        assert len(ed.codebook) == 0
        _, again = _host_io(lm, ed, REQS[0].prompt)
        assert torch.equal(again, base_edit)
    finally:
        ed.close()


def test_hooks_and_one_adaptor_per_module(tiny_llama):
    lm = tiny_llama
    host = lm.model.get_submodule(lm.spec.mlp_out_module(2))
    n0 = len(host._forward_hooks)
    a = _editor(lm)
    a.prepare()
    with pytest.raises(EditError, match="already carries"):
        _editor(lm).prepare()
    a.close()
    a.close()  # idempotent
    assert len(host._forward_hooks) == n0


def test_a_run_never_changes_weights_records_state_and_removes_hooks(tmp_path, tiny_llama, standins):
    lm = tiny_llama
    snap = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    host = lm.model.get_submodule(lm.spec.mlp_out_module(2))
    n0 = len(host._forward_hooks)
    cfg = RunConfig(method="grace", method_overrides={"layer": 2, "n_iter": 3}, n_edits=5, eval_every=2,
                    runs_dir=str(tmp_path), general="none", device="cpu", update_angles=False)
    run_id = run_sequential(cfg, lm=lm)
    store = RunStore(tmp_path)
    assert store.get_run(run_id)["status"] == "finished", store.get_run(run_id)["error"]
    assert all(torch.equal(p, snap[n]) for n, p in lm.model.named_parameters())
    assert len(host._forward_hooks) == n0
    df = store.metrics_frame([run_id])
    ed = df[df["kind"] == "editor"]
    size = ed[ed["metric"] == "codebook_size"].sort_values("n_edits")
    assert size["n_edits"].tolist() == [2, 4, 5] and size["value"].tolist()[-1] >= 1
    assert {"hit_share_probes_last", "hit_share_edits_correct", "radius_mean"} <= set(ed["metric"])
    w = df[(df["kind"] == "weights") & (df["metric"] == "delta_fro")]
    assert sorted(w["n_edits"]) == [2, 4, 5] and (w["value"] == 0).all()  # the watched host matrix: exactly flat
    # the stored codebook restores into a fresh editor exactly
    state = store.get_artifact(run_id, "editor_state", 5)
    fresh = _editor(lm)
    fresh.load_state_dict(state)
    again = fresh.state_dict()
    assert set(again) == set(state) and all(np.array_equal(np.asarray(again[k]), state[k]) for k in state)
    assert len(fresh.codebook) == int(size["value"].tolist()[-1])


def test_playground_edit_with_an_adaptor_editor(tiny_llama):
    from app.playground import playground_edit
    lm = tiny_llama
    host = lm.model.get_submodule(lm.spec.mlp_out_module(2))
    n0 = len(host._forward_hooks)
    snap = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    cache: dict = {}
    out = playground_edit(lm, {"method": "grace", "overrides": {"layer": 2, "n_iter": 20},
                               "request": REQS[0].to_dict(), "max_new_tokens": 2}, cache)
    assert out["explanation"]["adaptor"]["added"] == 1 and out["explanation"]["params"] == []
    edit = next(p for p in out["probes"] if p["prompt"] == REQS[0].prompt)
    assert edit["after"]["p_new"] > edit["before"]["p_new"]  # the codebook acted while applied
    assert len(host._forward_hooks) == n0 and not cache  # detached; adaptor results are not cached
    assert all(torch.equal(p, snap[n]) for n, p in lm.model.named_parameters())


@pytest.mark.parametrize("expand", ["coverage", "moving_average"])
def test_same_label_expand_grows_the_radius_and_moving_average_moves_the_key(tiny_llama, expand):
    """A second edit with the same label whose query lies beyond the entry's radius but within ε₀ + ε_j expands the
    entry: ε_j <- d under both rules; 'moving_average' also moves the key to (k_j + q)/2, 'coverage' keeps it
    (wrong variants: a moved key under 'coverage', the key replaced by q, or no move). Undo restores key and radius."""
    lm = tiny_llama
    first = REQS[0]
    second = make_request(source="test", record=3, case_id="eiffel-b", prompt="The Eiffel Tower stands in the city of",
                          subject="The Eiffel Tower", target_new="Rome", target_true="Paris")
    probe = _editor(lm)
    try:
        k1 = _host_io(lm, probe, first.prompt)[0][-1].to(torch.float64)
        q2 = _host_io(lm, probe, second.prompt)[0][-1].to(torch.float64)
    finally:
        probe.close()
    d = float(torch.linalg.vector_norm(k1 - q2))
    assert d > 0
    ed = _editor(lm, eps=0.75 * d, eps_expand=expand)  # ε_1 = 0.75 d < d <= ε₀ + ε_1 = 1.5 d: expand
    ed.prepare()
    try:
        r1 = ed.edit([first])
        apply_result(lm, r1)
        ed.after_apply([first], r1)
        key0, eps0 = ed.codebook.keys[0].clone(), list(ed.codebook.eps)
        r2 = ed.edit([second])
        undo = apply_result(lm, r2)
        assert len(ed.codebook) == 1  # no new entry
        assert ed.codebook.eps[0] == pytest.approx(d, rel=1e-6)
        want = (key0.to(torch.float64) + q2) / 2 if expand == "moving_average" else key0.to(torch.float64)
        torch.testing.assert_close(ed.codebook.keys[0].to(torch.float64), want, rtol=1e-5, atol=1e-5)
        undo(lm.model)
        assert torch.equal(ed.codebook.keys[0], key0) and ed.codebook.eps == eps0
    finally:
        ed.close()


def test_value_training_with_the_frozen_prefix_equals_the_full_forward(tiny_llama, monkeypatch):
    """_train_value skips the blocks below the adaptor (editors/hooks.frozen_prefix); the value it trains and its
    losses equal those of the full forward in every step (fails if the prefix kept the wrong block's output or
    dropped the override)."""
    import contextlib

    import editors.grace as grace
    ed = _editor(tiny_llama, layer=2)
    ed.prepare()
    try:
        p, t = ed._encode(REQS[0])
        v0 = torch.rand(tiny_llama.spec.hidden_size, generator=torch.Generator().manual_seed(0))
        fast = ed._train_value(p, t, v0)
        monkeypatch.setattr(grace, "frozen_prefix", lambda *a, **k: contextlib.nullcontext())
        full = ed._train_value(p, t, v0)
    finally:
        ed.close()
    assert torch.allclose(fast[0], full[0], atol=1e-5, rtol=1e-5)
    assert fast[1] == pytest.approx(full[1], rel=1e-5) and fast[2] == pytest.approx(full[2], rel=1e-5)
    assert fast[2] < fast[1]  # it trained
