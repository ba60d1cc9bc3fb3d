"""Issue 20, app item 7: a hidden-state projection (UMAP took 74 s) is computed once per run + checkpoint + layer
+ projection. A second render, in the same or a new browser session, and a render after the run wrote more rows
do not compute it again; another projection or checkpoint does."""
from __future__ import annotations


def test_second_render_does_not_recompute_the_projection(tmp_path, make_app, monkeypatch):
    import analysis.hidden
    from app.store import RunStore
    from tests.fixtures import synthetic_run
    store = RunStore(str(tmp_path))
    rid = synthetic_run(store, method="rome", n_edits=20, eval_every=10, per_case=False, seed=5)
    calls = []
    real = analysis.hidden.project

    def counting(before, after, method="pca", seed=0, **kw):
        calls.append(method)
        return real(before, after, method=method, seed=seed, **kw)
    monkeypatch.setattr(analysis.hidden, "project", counting)

    at = make_app(str(tmp_path), "hidden_states.py", {"runs": rid, "proj": "tsne", "step": "20"})
    assert calls == ["tsne"] and at.get("plotly_chart")
    at.run()  # a rerun of the same session
    make_app(str(tmp_path), "hidden_states.py", {"runs": rid, "proj": "tsne", "step": "20"})  # a new session
    assert calls == ["tsne"]
    store.heartbeat(rid, n_edits_done=20)  # the run writes rows: its checkpoint's states are unchanged
    make_app(str(tmp_path), "hidden_states.py", {"runs": rid, "proj": "tsne", "step": "20"})
    assert calls == ["tsne"]
    make_app(str(tmp_path), "hidden_states.py", {"runs": rid, "proj": "pca", "step": "20"})
    make_app(str(tmp_path), "hidden_states.py", {"runs": rid, "proj": "tsne", "step": "10"})
    assert calls == ["tsne", "pca", "tsne"]
