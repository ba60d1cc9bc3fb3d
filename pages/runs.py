"""Runs: every run in the store -- filter, open, cancel, delete, export, share."""
import streamlit as st

from app import backend, sweep_views, ui, views

ui.header("Runs", "Every sequential editing run in the run store, newest first. Select runs to compare them on the "
          "analysis pages, export their rows, or delete them.")

store, queue = ui.store(), ui.queue()
runs = views.runs_frame(store)
if runs.empty:
    ui.no_runs()
    st.stop()

sweeps = sweep_views.sweeps_overview(store)
sweep_pick = None
if not sweeps.empty:  # sweeps (python -m app sweep): progress of each, and a filter
    st.subheader("Sweeps")
    st.dataframe(sweeps, hide_index=True, key="sweeps-table",
                 column_config={"progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0,
                                                                            format="percent"),
                                "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm"),
                                "eta": st.column_config.TextColumn("ETA", help="estimate: mean wall time of the "
                                                                   "finished trials x trials left / running")})
    sweep_pick = st.selectbox("Only the runs of sweep", [None, *sweeps["sweep_id"]], key="f-sweep",
                              format_func=lambda s: "(all runs)" if s is None else s)
c1, c2, c3 = st.columns([2, 2, 3])
methods = c1.multiselect("Method", sorted(runs["method"].dropna().unique()), key="f-method")
statuses = c2.multiselect("Status", sorted(runs["status"].unique()), key="f-status")
text = c3.text_input("Search (id, label, model, data)", key="f-text")
shown = runs
if sweep_pick:
    shown = shown[shown["run_id"].isin(sweep_views.sweep_point_runs(store, sweep_pick)) |
                  shown["label"].fillna("").str.startswith(f"sweep {sweep_pick} ·")]
if methods:
    shown = shown[shown["method"].isin(methods)]
if statuses:
    shown = shown[shown["status"].isin(statuses)]
if text:
    hay = (shown["run_id"] + " " + shown["label"].fillna("") + " " + shown["model"].fillna("") + " "
           + shown["data_source"].fillna("")).str.lower()
    shown = shown[hay.str.contains(text.lower(), regex=False)]

table = shown.assign(edits=[f"{d}/{p}" for d, p in zip(shown["n_edits_done"].fillna(0),
                                                      shown["n_edits_planned"].fillna(0))],
                     seconds=shown["seconds_total"].round(1))
finals = ui.view("final_metrics", list(table["run_id"]), list(table["run_id"]))
table = table.join(finals, on="run_id")[
    ["name", "method", "label", "status", "edits", *views.FINAL_METRICS, "seconds", "model", "data_source",
     "created", "run_id"]].reset_index(drop=True)
score = {m: st.column_config.NumberColumn(m, format="%.3f", help=f"retention {m} at the last checkpoint "
                                          "(tf_token_acc, all edits so far)") for m in views.FINAL_METRICS}
event = st.dataframe(table, hide_index=True, key="runs-table", on_select="rerun", selection_mode="multi-row",
                     column_config={"created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm"),
                                    "data_source": "data", "seconds": st.column_config.NumberColumn("seconds"),
                                    **score})
st.caption(f"{len(shown)} of {len(runs)} runs. Click rows (the box at their left) to select runs.")
names = dict(zip(shown["run_id"], shown["name"] + " — " + shown["status"]))
# a click in the table replaces the selection below (which also takes runs by name and keeps ?runs= in the URL)
clicked = [table["run_id"].iloc[i] for i in event.selection.rows if i < len(table)]
if clicked != st.session_state.get("runs-table-last", []):
    st.session_state["runs-table-last"] = clicked
    st.session_state["picked"] = clicked
if "picked" not in st.session_state:
    st.session_state["picked"] = [r for r in ui.qp_list("runs") if r in names]
st.session_state["picked"] = [r for r in st.session_state["picked"] if r in names]
picked = st.multiselect("Select runs to open, compare, export or delete", list(names), format_func=names.get,
                        key="picked")
if not picked:
    st.info("Select one or more runs above to open, compare, export or delete them.")
    ui.share_link()
    st.stop()

ui.qp_set(runs=picked)
st.subheader(f"{len(picked)} selected")
a1, a2, a3 = st.columns(3)
a1.page_link(ui.page("metrics.py"), label="Open in Metrics", icon=":material/monitoring:",
             query_params={"runs": ",".join(picked)})
if a2.button("Cancel running", icon=":material/stop:", key="cancel",
             disabled=not runs[runs["run_id"].isin(picked)]["status"].isin(["queued", "running"]).any()):
    for rid in picked:
        if runs.loc[runs["run_id"] == rid, "status"].iloc[0] in ("queued", "running"):
            backend.cancel_run(store, queue, rid)
    st.rerun()
with a3.popover("Delete", icon=":material/delete:"):
    st.write(f"Delete {len(picked)} run(s) and all their rows? This cannot be undone.")
    if st.button("Delete for good", type="primary", key="delete"):
        for rid in picked:
            backend.delete_run(store, queue, rid)
        ui.qp_set(runs=None)
        st.rerun()

for rid in picked:
    run = store.get_run(rid)
    with st.expander(f"{views.run_name(rid, run['method'], run.get('label'))} — {run['status']}",
                     expanded=len(picked) == 1):
        st.markdown(f"{ui.status_badge(run['status'])} `{rid}` · model **{run['model']}** · data "
                    f"`{run['data_source']}` · {run['n_edits_done']}/{run['n_edits_planned']} edits · device "
                    f"{run['device'] or '–'}")
        if run.get("error"):
            st.error(run["error"].split("\n\n")[0])
            with st.popover("Full error"):
                st.code(run["error"], language=None)
        e1, e2 = st.columns(2)
        for col, efmt, mime in ((e1, "csv", "text/csv"), (e2, "parquet", "application/vnd.apache.parquet")):
            col.download_button(f"Export {efmt.upper()}",
                                lambda rid=rid, efmt=efmt: backend.export_bytes(store, rid, efmt),
                                file_name=f"{rid}.{efmt}", mime=mime, key=f"dl-{efmt}-{rid}", on_click="ignore",
                                icon=":material/download:")
        f1, f2 = st.columns(2)
        for col, title, cfg, k in ((f1, "Run config", run["config"], "cfg"),
                                   (f2, "Method config", run["method_config"], "mcfg")):
            col.markdown(f"**{title}**")
            col.dataframe(views.config_fields(cfg or {}), hide_index=True, key=f"{k}-{rid}",
                          column_config={"field": "field", "value": "value"})

ui.share_link()
