"""Every page of the workbench under Streamlit's AppTest, against run stores written directly (synthetic runs) or by
the worker on a tiny model. Figures are checked through their JSON (``proto.spec``): AppTest renders no JavaScript."""
from __future__ import annotations

import ast
import json
import os

import pytest

from tests.app.conftest import FACT, ROOT, plotly_specs, trace_names


def _texts(at) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [i.value for i in at.info]
    parts += [e.value for e in at.error] + [w.value for w in at.warning] + [s.value for s in at.success]
    return "\n".join(str(p) for p in parts)


# ---------------------------------------------------------------------------------------------------------------
# composition rules
# ---------------------------------------------------------------------------------------------------------------
def test_pages_only_compose():
    """Pages import streamlit, app/ glue and analysis.plots (plus pandas / plotly); never torch, editors or the
    computing analysis modules (those run through app.views, cached)."""
    allowed = {"streamlit", "app", "pandas", "plotly", "analysis.plots"}
    pages = os.path.join(ROOT, "pages")
    files = [f for f in os.listdir(pages) if f.endswith(".py")]
    assert len(files) == 8
    for f in files:
        tree = ast.parse(open(os.path.join(pages, f), encoding="utf-8").read())
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if isinstance(node, ast.ImportFrom) and node.module == "analysis":
                mods = [f"analysis.{a.name}" for a in node.names]
            for m in mods:
                assert m.split(".")[0] in allowed or m in allowed, f"pages/{f} imports {m}"


def test_pages_are_registered_explicitly():
    from app.ui import PAGE_SPECS
    on_disk = {f for f in os.listdir(os.path.join(ROOT, "pages")) if f.endswith(".py")}
    assert {s[0] for s in PAGE_SPECS} == on_disk
    main = open(os.path.join(ROOT, "app", "main.py"), encoding="utf-8").read()
    assert "st.navigation(" in main


def test_streamlit_config_binds_to_localhost():
    text = open(os.path.join(ROOT, ".streamlit", "config.toml"), encoding="utf-8").read()
    assert 'address = "localhost"' in text and "headless = true" in text and "gatherUsageStats = false" in text


# ---------------------------------------------------------------------------------------------------------------
# empty store
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", [None, "metrics.py", "weights.py", "geometry.py", "hidden_states.py", "general.py"])
def test_empty_store_says_how_to_start(tmp_path, make_app, page):
    at = make_app(str(tmp_path), page)
    assert any("No runs yet" in i.value for i in at.info)
    assert not at.get("plotly_chart")


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------
def test_runs_page_lists_filters_exports_and_deletes(tmp_path, make_app):
    from app.store import RunStore
    from tests.fixtures import synthetic_run
    store = RunStore(str(tmp_path))
    a = synthetic_run(store, method="rome", n_edits=12, eval_every=6, hidden=False, per_case=False)
    b = synthetic_run(store, method="ft", n_edits=12, eval_every=6, hidden=False, per_case=False, seed=2)
    at = make_app(str(tmp_path))
    assert at.title[0].value == "Runs"
    table = at.dataframe[0].value
    assert set(table["run_id"]) == {a, b}
    at.multiselect(key="f-method").set_value(["ft"]).run()
    assert list(at.dataframe[0].value["run_id"]) == [b]
    at.multiselect(key="f-method").set_value([]).run()
    at.multiselect(key="picked").set_value([a]).run()
    assert at.query_params["runs"] == [a] or at.query_params["runs"] == a
    assert at.get("download_button")  # CSV / Parquet exports, made when clicked
    from app.backend import export_bytes
    assert export_bytes(store, a, "csv").startswith(b"run_id,n_edits,step,kind")
    assert export_bytes(store, a, "parquet")[:4] == b"PAR1"
    at.button(key="delete").click().run()
    assert list(RunStore(str(tmp_path)).list_runs()["run_id"]) == [b]


# ---------------------------------------------------------------------------------------------------------------
# analysis pages on synthetic runs
# ---------------------------------------------------------------------------------------------------------------
def test_metrics_overlays_runs_with_collapse_markers(synthetic_store, make_app):
    path, rome, ft = synthetic_store
    at = make_app(path, "metrics.py", {"runs": f"{rome},{ft}"})
    assert at.title[0].value == "Metrics"
    specs = plotly_specs(at)
    assert len(specs) == 1
    short = rome.rsplit("-", 1)[-1]
    names = trace_names(at)[0]
    assert f"rome · {short}" in names and "ft · baseline" in names
    texts = [a["text"] for a in specs[0]["layout"]["annotations"]]
    assert "retention · reliability" in texts and "retention · editing_score" in texts
    assert f"rome: {short}: retention/reliability" in texts  # the collapse marker (departures are not markers)
    assert any(s.get("type") == "line" and s["x0"] == 20 for s in specs[0]["layout"]["shapes"])
    from app.figures import method_colour
    colours = {t["name"]: t["line"]["color"] for t in specs[0]["data"]}
    assert colours[f"rome · {short}"] == method_colour("rome") and colours["ft · baseline"] == method_colour("ft")
    assert "Reliability" in _texts(at)  # one-sentence meanings
    assert at.dataframe[0].value.loc[f"rome · {short}", "edits"] == 30
    at.selectbox(key="m-protocol").set_value("prob_margin").run()
    assert not at.exception and len(plotly_specs(at)[0]["data"]) > 0
    at.multiselect(key="m-kinds").set_value(["edit"]).run()
    titles = [a["text"] for a in plotly_specs(at)[0]["layout"]["annotations"] if "·" in a["text"]]
    assert titles and all(t.startswith("edit ·") for t in titles)


def test_weights_page_curves_and_spectrum_at_step(synthetic_store, make_app):
    path, rome, ft = synthetic_store
    short = rome.rsplit("-", 1)[-1]
    at = make_app(path, "weights.py", {"runs": rome})
    specs = plotly_specs(at)
    assert len(specs) == 3  # metric curves + norm / cond beside drift (and preserved outputs) + spectrum
    assert trace_names(at)[0] == {f"rome · {short} · L4", f"rome · {short} · L5"}
    assert specs[0]["layout"]["yaxis"]["type"] == "log"  # cond is shown on a log axis
    panels = [a["text"] for a in specs[1]["layout"]["annotations"]]
    assert len(panels) >= 3 and any("W0" in p for p in panels)  # norm, cond and the drift ‖ΔW‖/‖W0‖ side by side
    assert "‖ΔW‖_F / ‖W0‖_F" in _texts(at)
    assert trace_names(at)[2] == {"layer 4 · W", "layer 4 · delta", "layer 5 · W", "layer 5 · delta"}
    at.select_slider(key="w-step").set_value(10).run()
    assert at.query_params["step"] in ("10", ["10"])
    at.selectbox(key="w-metric").set_value("rel_change").run()
    at.multiselect(key="w-layers").set_value([5]).run()
    assert trace_names(at)[0] == {f"rome · {short} · L5"}
    assert at.query_params["layer"] in ("5", ["5"])


def test_geometry_page_angles_geoedit_and_maps(synthetic_store, make_app):
    path, rome, ft = synthetic_store
    at = make_app(path, "geometry.py", {"runs": f"{rome},{ft}"})
    specs = plotly_specs(at)
    assert specs[0]["data"][0]["type"] == "histogram"
    assert len(specs[0]["data"]) == 2  # one histogram per run
    at.selectbox(key="g-run").set_value(rome).run()
    specs = plotly_specs(at)
    geo = [s for s in specs if any(a.get("text") in ("raw", "latent") for a in s["layout"].get("annotations", []))]
    assert geo, "GeoEdit raw vs latent histogram missing"
    assert any(s["data"][0]["type"] == "heatmap" for s in specs)
    assert len([s for s in specs if s["data"][0]["type"] == "heatmap"]) == 2  # change map + stored importance


def test_geometry_page_geoedit_variant_summary_and_fig4(tmp_path, make_app):
    """A GeoEdit run: the page names the variant that ran (here '+MW', a deviation from the paper), shows the class
    counts, norms, α/β and the latent/raw agreement of the chosen step, and Fig. 4 (|τ| beside α/β)."""
    from app.store import RunStore
    from tests.fixtures import synthetic_run
    store = RunStore(str(tmp_path))
    run = synthetic_run(store, method="geoedit-mw", n_edits=4, eval_every=2, geoedit=True, hidden=False, seed=3,
                        method_config={"fusion": "fixed", "fixed_alpha": 0.3, "fixed_beta": 1.0, "ae": "linear",
                                       "mode": "ft"})
    at = make_app(str(tmp_path), "geometry.py", {"runs": run})
    text = _texts(at)
    assert "**Variant:** geoedit-mw: GeoEdit_FT (+MW: fixed α=0.3, β=1" in text
    table = next(d.value for d in at.dataframe if "quantity" in d.value.columns)
    shown = dict(zip(table["quantity"], table["value"]))
    assert {"aligned neurons (φ < φ1, synergistic)", "|τ_new| (Frobenius)", "β median",
            "Spearman(latent angle, raw angle)"} <= set(shown)
    assert shown["Spearman(latent angle, raw angle)"] == pytest.approx(0.99)
    fig4 = [s for s in plotly_specs(at) if {t.get("name") for t in s["data"]} >= {"|τ_old|", "α", "|τ_new|", "β"}]
    assert fig4, "GeoEdit Fig. 4 (|τ| beside α/β) missing"


def test_hidden_states_projection_with_step_slider(synthetic_store, make_app):
    path, rome, ft = synthetic_store
    at = make_app(path, "hidden_states.py", {"runs": rome, "step": "20", "layer": "5"})
    assert at.select_slider(key="h-step").value == 20 and at.selectbox(key="h-layer").value == 5
    spec = plotly_specs(at)[0]
    kinds = {(t["type"], t.get("name")) for t in spec["data"]}
    assert ("scatter", "before") in kinds and ("scatter", "after") in kinds
    assert sum(t.get("fill") in ("tozeroy", "tozerox") for t in spec["data"]) == 4  # x and y marginals per group
    labels = [m.label for m in at.metric]
    assert labels == ["Mean cosine shift", "Linear CKA", "MMD²"]
    at.radio(key="h-method").set_value("tsne").run()
    assert not at.exception and plotly_specs(at)
    # a run without stored states explains how to get them
    at2 = make_app(path, "hidden_states.py", {"runs": ft})
    assert any("stored no hidden states" in i.value for i in at2.info)


def test_general_page(synthetic_store, make_app):
    path, rome, ft = synthetic_store
    at = make_app(path, "general.py", {"runs": f"{rome},{ft}"})
    spec = plotly_specs(at)[0]
    assert {a["text"] for a in spec["layout"]["annotations"]} == {"sentiment/accuracy", "nli/accuracy"}
    assert {t["name"] for t in spec["data"]} == {f"rome · {rome.rsplit('-', 1)[-1]}", "ft · baseline"}
    table = at.dataframe[0].value
    assert {"before", "after", "change"} <= set(table.columns)


def test_share_link_holds_the_view(synthetic_store, make_app):
    path, rome, ft = synthetic_store
    at = make_app(path, "weights.py", {"runs": rome, "step": "20", "layer": "4"})
    assert at.select_slider(key="w-step").value == 20
    assert at.multiselect(key="w-layers").value == [4]
    code = [c.value for c in at.code]
    assert any(f"runs={rome}" in c and "step=20" in c and "layer=4" in c for c in code)


@pytest.mark.parametrize("page, query, widgets", [
    ("runs.py", {"runs": "{rome}"}, {("multiselect", "picked"): ["{rome}"]}),
    ("metrics.py", {"runs": "{ft},{rome}"}, {("multiselect", "runs"): ["{ft}", "{rome}"]}),
    ("geometry.py", {"runs": "{ft},{rome}", "run": "{rome}", "step": "10"},
     {("multiselect", "runs"): ["{ft}", "{rome}"], ("selectbox", "g-run"): "{rome}", ("select_slider", "g-step"): 10}),
    ("hidden_states.py", {"runs": "{rome}", "step": "10", "layer": "4"},
     {("selectbox", "runs"): "{rome}", ("select_slider", "h-step"): 10, ("selectbox", "h-layer"): 4}),
    ("general.py", {"runs": "{ft}"}, {("multiselect", "runs"): ["{ft}"]}),
])
def test_every_page_reopens_from_its_url(synthetic_store, make_app, page, query, widgets):
    """A shared URL (the page and its query params) reopens the same view: the widgets hold the URL's values, and the
    URL stays as it was (weights: ``test_share_link_holds_the_view``; playground: its own reload test)."""
    path, rome, ft = synthetic_store

    def fill(v):
        return [fill(x) for x in v] if isinstance(v, list) else v.format(rome=rome, ft=ft) if isinstance(v, str) else v
    query = {k: fill(v) for k, v in query.items()}
    at = make_app(path, page, query)
    for (kind, key), want in widgets.items():
        assert getattr(at, kind)(key=key).value == fill(want), (kind, key)
    assert {k: at.query_params[k] for k in query} == query


def test_new_run_page_watches_the_runs_of_its_url(synthetic_store, make_app):
    path, rome, _ = synthetic_store
    at = make_app(path, "new_run.py", {"runs": rome})
    assert rome in _texts(at) and at.query_params["runs"] == rome


# ---------------------------------------------------------------------------------------------------------------
# New run and Playground against a worker (run in this process, on a tiny model)
# ---------------------------------------------------------------------------------------------------------------
def test_new_run_form_queues_and_cancels(tmp_path, make_app, tiny_dir):
    from app.jobs import JobQueue
    from app.store import RunStore
    at = make_app(str(tmp_path), "new_run.py")
    # config fields come from the registry with their defaults and help
    at.selectbox(key="nr-model").set_value(tiny_dir)
    at.multiselect(key="nr-methods").set_value(["ft"]).run()
    layers = at.text_input(key="nr-ft-layers")
    assert layers.value == "20" and layers.help
    layers.set_value("1")
    at.number_input(key="nr-ft-num_steps").set_value(3)
    at.number_input(key="nr-n").set_value(4)
    at.button(key="nr-start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    runs = RunStore(str(tmp_path)).list_runs()
    assert len(runs) == 1 and runs["status"].iloc[0] == "queued"
    run_id = runs["run_id"].iloc[0]
    run = RunStore(str(tmp_path)).get_run(run_id)
    assert run["config"]["method_overrides"] == {"layers": "1", "num_steps": 3} and run["model"] == tiny_dir
    job = JobQueue(str(tmp_path)).job_for_run(run_id)
    assert job.status == "queued" and job.kind == "run"
    assert at.get("progress")  # the live progress section shows the queued run
    at.button(key=f"cancel-{run_id}").click().run()
    assert RunStore(str(tmp_path)).get_run(run_id)["status"] == "cancelled"
    assert JobQueue(str(tmp_path)).get(job.job_id).status == "cancelled"


def test_new_run_rejects_bad_method_field(tmp_path, make_app):
    at = make_app(str(tmp_path), "new_run.py")
    at.multiselect(key="nr-methods").set_value(["ft"]).run()
    at.text_input(key="nr-ft-lr").set_value("many")
    at.button(key="nr-start").click().run()
    assert any("lr" in e.value for e in at.error), [e.value for e in at.error]


def _playground_ft(at, model: str, layers: str = "1"):
    """Fill the playground's form: a typed fact, FT with 3 steps on ``layers`` of the tiny model."""
    at.radio(key="pg-mode").set_value("type your own").run()
    at.selectbox(key="pg-model").set_value(model)
    at.selectbox(key="pg-method").set_value("ft").run()
    at.text_input(key="pg-ft-layers").set_value(layers)
    at.number_input(key="pg-ft-num_steps").set_value(3)
    return at


def test_playground_edit_runs_in_the_worker_and_undoes(tmp_path, make_app, tiny_dir):
    from app.worker import Worker
    at = _playground_ft(make_app(str(tmp_path), "playground.py", timeout=120), tiny_dir)
    at.button(key="pg-apply").click().run()
    assert at.session_state["pg_pending"]
    assert any("Editing in the worker" in i.value for i in at.info)
    assert Worker(str(tmp_path)).serve(max_jobs=1) == 1  # the worker (here in-process) takes the job
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    text = _texts(at)
    assert "rank-" in text and "model.layers.1.mlp.down_proj.weight" in text
    assert len(at.session_state["pg_stack"]) == 1
    specs = plotly_specs(at)
    assert len(specs) == 3  # edit prompt, paraphrase, locality prompt
    assert all(len(s["data"]) == 2 and s["data"][0]["type"] == "bar" for s in specs)
    assert at.query_params["job"]
    at.button(key="pg-undo").click().run()
    assert at.session_state["pg_stack"] == [] and any("unedited" in i.value for i in at.info)


def test_playground_failure_is_shown(tmp_path, make_app, tiny_dir):
    from app.jobs import JobQueue
    from app.worker import Worker
    # the tiny model has 4 layers
    at = _playground_ft(make_app(str(tmp_path), "playground.py", timeout=120), tiny_dir, layers="7")
    at.button(key="pg-apply").click().run()
    Worker(str(tmp_path)).serve(max_jobs=1)
    at.run()
    job = JobQueue(str(tmp_path)).list_jobs()
    assert job["status"].iloc[0] == "failed"
    assert any("The edit failed" in e.value for e in at.error)


def test_playground_stack_and_undo_survive_a_reload(tmp_path, make_app, tiny_dir):
    """The URL's ?job= alone reopens the playground: the edit in progress, the stack of edits, and Undo."""
    from app.worker import Worker

    def stack_ids(at) -> list[str]:
        return [s["job_id"] for s in at.session_state["pg_stack"]]

    def subheaders(at) -> list[str]:
        return [h.value for h in at.subheader]

    at = _playground_ft(make_app(str(tmp_path), "playground.py", timeout=120), tiny_dir)
    at.button(key="pg-apply").click().run()
    pending = at.query_params["job"]
    # reloaded while the edit is queued: the new session waits for the same job
    reloaded = make_app(str(tmp_path), "playground.py", {"job": pending}, timeout=120)
    assert reloaded.session_state["pg_pending"] == pending
    assert any("Editing in the worker" in i.value for i in reloaded.info)
    assert Worker(str(tmp_path)).serve(max_jobs=1) == 1
    reloaded.run()
    assert stack_ids(reloaded) == [pending] and reloaded.query_params["job"] == pending
    at.run()
    assert stack_ids(at) == [pending]
    # a second edit on top of the first
    at.text_input(key="pg-new").set_value("London")
    at.button(key="pg-apply").click().run()
    assert Worker(str(tmp_path)).serve(max_jobs=1) == 1
    at.run()
    first, second = pending, at.query_params["job"]
    assert stack_ids(at) == [first, second]
    # reload: a new session that has only the URL sees both edits, the top one's before/after, and can undo
    reloaded = make_app(str(tmp_path), "playground.py", {"job": second}, timeout=120)
    assert stack_ids(reloaded) == [first, second]
    assert "Edits applied in this playground (2)" in subheaders(reloaded)
    assert "London" in _texts(reloaded) and len(plotly_specs(reloaded)) == 3
    reloaded.button(key="pg-undo").click().run()
    assert stack_ids(reloaded) == [first] and reloaded.query_params["job"] == first
    # ... and the URL after Undo reopens the shorter stack; undoing the last edit clears the URL
    reloaded = make_app(str(tmp_path), "playground.py", {"job": first}, timeout=120)
    assert stack_ids(reloaded) == [first] and "Edits applied in this playground (1)" in subheaders(reloaded)
    reloaded.button(key="pg-undo").click().run()
    assert stack_ids(reloaded) == [] and "job" not in reloaded.query_params
    assert any("unedited" in i.value for i in reloaded.info)
    # an unknown job in the URL: a warning, an empty playground
    unknown = make_app(str(tmp_path), "playground.py", {"job": "pl-nope"}, timeout=120)
    assert any("pl-nope" in w.value for w in unknown.warning) and stack_ids(unknown) == []


def test_upload_parsing_is_json_csv_only_limited_and_names_the_record():
    from app import backend
    good = json.dumps([FACT]).encode()
    reqs = backend.parse_upload(good, "edits.json")
    assert reqs[0].target_new == "Rome"
    csv_text = "prompt,subject,target_new\nThe Eiffel Tower is in,The Eiffel Tower,Rome\n".encode()
    assert backend.parse_upload(csv_text, "edits.csv")[0].subject == "The Eiffel Tower"
    with pytest.raises(backend.JobError, match="only .json"):
        backend.parse_upload(b"\x80\x04K\x01.", "edits.pkl")
    with pytest.raises(backend.JobError, match="upload limit"):
        backend.parse_upload(b"[" + b" " * 2000 + b"]", "edits.json", limit=1000)
    bad = json.dumps([FACT, {**FACT, "subject": "Big Ben"}]).encode()
    with pytest.raises(backend.JobError) as exc:
        backend.parse_upload(bad, "edits.json")
    assert "record 2" in str(exc.value) and "subject" in str(exc.value)  # the second record, counted from 1


def test_changed_overrides_only_keeps_changed_fields():
    from app.backend import changed_overrides
    fields = [{"name": "layers", "default": (20,)}, {"name": "lr", "default": 5e-4}, {"name": "flag", "default": True},
              {"name": "steps", "default": 25}]
    assert changed_overrides(fields, {"layers": "20", "lr": "0.0005", "flag": True, "steps": 25}) == {}
    assert changed_overrides(fields, {"layers": "1, 2", "lr": "1e-3", "flag": False, "steps": 3}) == {
        "layers": "1, 2", "lr": "1e-3", "flag": False, "steps": 3}

