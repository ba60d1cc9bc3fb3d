"""Geometry: angles between updates (interference) and where updates land (importance maps)."""
import streamlit as st

from analysis import plots
from app import ui, views

ui.header("Geometry", "Do successive edits fight each other, and where in the network do they land? Angles between "
          "updates (90° = independent, > 90° = a new edit partly undoes earlier ones) and layer maps of the change.")

run_ids = ui.run_picker()
if not run_ids:
    st.stop()

st.subheader("Successive-update angles")
which = st.radio("Angle", list(views.UPDATE_ANGLE_METRICS), horizontal=True, key="g-which",
                 index=ui.qp_choice("angle", list(views.UPDATE_ANGLE_METRICS), list(views.UPDATE_ANGLE_METRICS)[0]),
                 format_func={"angle_flat": "to the previous update", "angle_accumulated": "to the change so far"}.get)
ui.qp_set(angle=which)
angles = ui.view("update_angle_frame", run_ids, run_ids)
sub = angles[angles["metric"] == which]
if sub.empty:
    st.info("No update angles recorded for these runs (enable 'Successive-update angles' on New run).")
else:
    ui.show_figure(plots.histogram_figure(sub, x="angle", color=views.series_column(sub), vlines=(90,),
                                          x_title="angle (degrees)", y_title="fraction of updates (per run)"),
                   f"update-angles-{which}", key="g-angles")
ui.meaning(which)

st.subheader("One run, at one checkpoint")
names = dict(zip(angles["run_id"], angles["name"]))
wanted = st.query_params.get("run")
run_id = st.selectbox("Run", run_ids, index=run_ids.index(wanted) if wanted in run_ids else 0,
                      format_func=lambda r: names.get(r, r), key="g-run")
ui.qp_set(run=run_id if len(run_ids) > 1 else None)
steps = ui.view("artifact_steps", [run_id], run_id, "editor")
step = None
if steps:
    want = ui.qp_int("step")
    step = st.select_slider("Edits made (step)", steps, value=want if want in steps else steps[-1], key="g-step")
    ui.qp_set(step=step)
variant = ui.view("geoedit_variant", [run_id], run_id)
if variant:
    st.markdown(f"**Variant:** {variant}")
geo = ui.view("geoedit_angles", [run_id], run_id, step) if step is not None else None
if geo is not None and not geo.empty:  # GeoEdit's own section only for runs that stored its angles
    st.subheader("GeoEdit: per-neuron angles, raw vs latent")
    ui.show_figure(plots.histogram_figure(geo, x="angle", color="class", facet="space", vlines=(85, 95),
                                          x_title="angle (degrees)", y_title="fraction of neurons"),
                   f"geoedit-angles-{run_id}", key="g-geo")
    st.caption(f"At {step} edits. Angle per neuron between old- and new-knowledge task vectors, in parameter space "
               "(raw) and in the auto-encoder's latent space where GeoEdit classifies: aligned < φ1 (85°), orthogonal "
               "φ1–φ2 (95°, inclusive), conflicting > φ2 (GeoEdit Fig. 3).")
summary = ui.view("geoedit_summary", [run_id], run_id, step) if step is not None else None
if summary is not None and not summary.empty:
    st.dataframe(summary[["quantity", "value"]], hide_index=True, key="g-geo-summary")
weights = ui.view("geoedit_fusion_weights", [run_id], run_id, step) if step is not None else None
if weights is not None and not weights.empty:
    ui.show_figure(plots.curve_figure(weights, x="neuron", y="value", color="label", facet="task", band=False,
                                      x_title="neuron", y_title="scaled to [0, 1]"),
                   f"geoedit-fusion-{run_id}", key="g-fusion")
    st.caption("GeoEdit Fig. 4: per neuron the magnitude of τ_old / τ_new beside the fusion weights α / β of Eq. 11 "
               "(importance-guided: normalised EMA importance; '+MW': one fixed value), each scaled to [0, 1].")

st.subheader("Importance map: where the change lands")
metric = st.selectbox("Per-layer quantity", ["rel_change", "delta_fro", "delta_rank", "cond"], key="g-map-metric")
cmap = ui.view("change_map", [run_id], run_id, metric)
if cmap.empty:
    st.info("No weight diagnostics recorded for this run (they come with checkpoints).")
else:
    ui.show_figure(plots.heatmap_figure(cmap, x="n_edits", y="layer", x_title="edits made (checkpoints)",
                                        y_title="layer", colorbar_title=plots.metric_label(metric), ticks_at_x=True,
                                        title=f"{plots.metric_label(metric)} per layer and checkpoint"),
                   f"change-map-{run_id}", key="g-map")
ui.meaning(metric)
neurons = ui.view("neuron_map", [run_id], run_id, step) if step is not None else None
if neurons is not None and not neurons.empty:
    key = st.selectbox("Per-neuron array stored by the method", sorted(neurons["key"].unique()), key="g-neuron-key")
    ui.show_figure(plots.heatmap_figure(neurons[neurons["key"] == key], x="neuron", y="layer", title=key),
                   f"neuron-map-{run_id}", key="g-neurons")
ui.share_link()
