"""Metrics: edit, retention and locality curves against the number of edits; several runs overlaid."""
import streamlit as st

from analysis import plots
from app import sweep_views, ui, views

ui.header("Metrics", "How well the edits hold as they accumulate. Each line is a run (colour = method, dash = run); "
          "x = edits made so far; the retention curves start at 0 edits with the unedited model (the run's pre-edit "
          "evaluation over all its requests). Dotted vertical lines mark where the engine detected a collapse.")

if sweep_views.has_sweeps(ui.store()) and st.radio(
        "Show", ["runs", "a sweep"], horizontal=True, key="m-mode",
        help="a sweep: one curve per grid point, the band = mean ± std over its seeds") == "a sweep":
    store = ui.store()
    s1, s2, s3 = st.columns([2, 1, 2])
    sweep_id = s1.selectbox("Sweep", list(sweep_views.sweeps_overview(store)["sweep_id"]), key="m-sweep")
    band = s2.selectbox("Band", ["std", "minmax", "none"], key="m-band",
                        help="over the seeds of each grid point: mean ± sample std, or min to max")
    sweep_kinds = s3.multiselect("Curves", list(views.CURVE_KINDS), default=["retention", "locality"],
                                 key="m-sweep-kinds")
    curves = sweep_views.sweep_curves(store, sweep_id, kinds=tuple(sweep_kinds), band=band)
    if curves.empty:
        st.info("No metric rows yet for this sweep's runs.")
        st.stop()
    fig = plots.curve_figure(curves, y="mean", color="point", facet="panel", band=band != "none", cols=3,
                             y_title="score (tf_token_acc)")
    fig.update_yaxes(range=[-0.03, 1.03])
    ui.show_figure(fig, f"sweep-{sweep_id}", key="metrics-sweep-fig")
    st.subheader("Per grid point at the last checkpoint (mean ± std over seeds)")
    st.dataframe(sweep_views.sweep_table(store, sweep_id), hide_index=True, key="m-sweep-table")
    st.caption("fro_growth / cond_growth: Frobenius norm / condition number of the edited matrices at the end "
               "relative to the unedited ones (mean over matrices); collapse_step: the first collapse event "
               "(analysis.collapse), over the seeds that collapsed.")
    ui.frame_download(curves, f"sweep-{sweep_id}-curves", key="m-sweep-dl")
    st.stop()
run_ids = ui.run_picker()
if not run_ids:
    st.stop()
c1, c2 = st.columns([1, 2])
protocols, protocol_help = views.protocols()
protocol = c1.selectbox("Protocol", protocols, index=ui.qp_choice("protocol", protocols, "tf_token_acc"),
                        key="m-protocol",
                        help="; ".join(f"{k}: {v}" for k, v in protocol_help.items())
                        + ". Only protocols the run recorded have data.")
kinds = c2.multiselect("Curves", list(views.CURVE_KINDS),
                       default=ui.qp_subset("curves", list(views.CURVE_KINDS), ["retention", "edit", "locality"]),
                       key="m-kinds",
                       format_func={"retention": "retention (all edits so far, at checkpoints)",
                                    "edit": "immediate (edits of each step)",
                                    "locality": "locality probe set"}.get)
ui.qp_set(protocol=protocol, curves=kinds)
curves, markers = ui.view("metrics_view", run_ids, run_ids, kinds=tuple(kinds), protocol=protocol)
if curves.empty:
    st.info("No metric rows yet for these runs — a running run shows its first point after its first step.")
    st.stop()
# runs of one method get colours of their own (dash = run otherwise)
same_method = "run" in curves.columns and curves.groupby("method")["run"].nunique().max() > 1
names = list(dict.fromkeys(curves["method"] + " · " + curves["run"])) if "run" in curves.columns else []
title = (f"{protocol}: {', '.join(kinds)} vs edits — " + (", ".join(names[:3]) + (f" and {len(names) - 3} more"
                                                                                   if len(names) > 3 else "")))
if same_method:
    curves = curves.assign(series=curves["method"] + " · " + curves["run"])
fig = plots.curve_figure(curves, y="mean", color="series" if same_method else "method",
                         dash=None if same_method else "run", facet="panel",
                         band=False, collapse=markers, cols=3, y_title=f"score (0–1, {protocol})",
                         x_title="edits made (n)", title=title)
fig.update_yaxes(range=[-0.03, 1.03])  # every curve here is a score in [0, 1]
ui.show_figure(fig, "metrics", key="metrics-fig")
ui.meaning("retention", "edit", "reliability", "generality", "locality", "editing_score")
summary = views.final_summary(curves)
if not summary.empty:
    st.subheader("At the last checkpoint (retention)")
    st.dataframe(summary.style.format(precision=3), key="m-summary")
if not markers.empty:
    st.subheader("Collapse")
    st.dataframe(markers[["indicator", "step"]].rename(columns={"indicator": "run: signal", "step": "edits"}),
                 hide_index=True, key="m-markers")
    st.caption("The first checkpoint where a performance signal fell below half of its start (analysis.collapse).")
ui.frame_download(curves, "metric-curves", key="m-dl")
ui.share_link()
