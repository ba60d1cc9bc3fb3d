"""Weights: norms and condition numbers of every edited matrix vs edits; singular-value spectra at a step."""
import pandas as pd
import streamlit as st

from analysis import plots
from app import ui

ui.header("Weights", "The numerical health of each edited weight matrix as edits accumulate (one line per run and "
          "layer), and its singular-value spectrum at a chosen checkpoint.")

run_ids = ui.run_picker()
if not run_ids:
    st.stop()
metrics, layers = ui.view("weight_choices", run_ids, run_ids)
if not metrics:
    st.info("These runs have no weight diagnostics (enable 'Weight diagnostics' on New run; rows appear at the "
            "first checkpoint).")
    st.stop()
c1, c2, c3 = st.columns([2, 2, 1])
default_metric = "cond" if "cond" in metrics else metrics[0]
metric = c1.selectbox("Metric", metrics, index=ui.qp_choice("metric", metrics, default_metric), key="w-metric")
wanted = ui.qp_int("layer")
chosen_layers = c2.multiselect("Layers", layers, default=[wanted] if wanted in layers else layers, key="w-layers")
log_y = c3.toggle("log y", value=metric in ("cond", "delta_cond"), key="w-log")
ui.qp_set(layer=chosen_layers[0] if len(chosen_layers) == 1 else None, metric=metric)
df = ui.view("weight_curves", run_ids, run_ids, metric, tuple(chosen_layers))
# runs of one method get colours of their own (dash = layer then); otherwise colour = method, dash = run · layer
same_method = not df.empty and df.groupby("method")["run_id"].nunique().max() > 1
fig = plots.weights_figure(df, metrics=[metric], color="run" if same_method else "method",
                           dash="layer" if same_method else "series", log_metrics=[metric] if log_y else [],
                           cols=1, height=440)
ui.show_figure(fig, f"weights-{metric}", key="w-fig")
ui.meaning(metric)

# issue 14: norm and condition number alone hide how far a matrix moved (MOSE keeps both at exactly x1 while it
# drifts furthest from W0), so the drift and the preserved outputs' change stand beside them
side = [m for m in ("fro", "cond", "rel_change", "preserve_change") if m in metrics]
if len(side) > 2:
    st.subheader("Norm and condition number beside drift and preserved outputs")
    both = pd.concat([ui.view("weight_curves", run_ids, run_ids, m, tuple(chosen_layers)) for m in side])
    ui.show_figure(plots.weights_figure(both, metrics=side, color="method", dash="series",
                                        log_metrics=["cond"] if log_y else [], cols=2, height=560),
                   "weights-side-by-side", key="w-side")
    ui.meaning(*side)

st.subheader("Singular-value spectrum")
names = dict(zip(*[ui.view("runs_frame", run_ids, run_ids)[c] for c in ("run_id", "name")]))
run_id = st.selectbox("Run", run_ids, format_func=names.get, key="w-spec-run")
steps = ui.view("artifact_steps", [run_id], run_id, "singular_values")
if not steps:
    st.info("No singular values stored for this run (they are saved at checkpoints with weight diagnostics).")
else:
    want = ui.qp_int("step")
    step = st.select_slider("Edits made (checkpoint)", steps, value=want if want in steps else steps[-1],
                            key="w-step")
    ui.qp_set(step=step)
    spec = ui.view("spectrum", [run_id], run_id, step)
    if chosen_layers:
        spec = spec[spec["layer"].isin(chosen_layers)]
    ui.show_figure(plots.spectrum_figure(spec, color="series", dash="which", height=420),
                   f"spectrum-{run_id}-{step}", key="w-spec")
    st.caption("σᵢ of W (solid) and of the accumulated change ΔW = W − W0 (dashed), largest first. A few large σ "
               "of ΔW = the edits pile up in a few directions; a falling tail of W = a growing condition number.")
st.subheader("Editor state")
state = ui.view("editor_state_curves", run_ids, run_ids)
if state.empty:
    st.caption("No editor-state rows: these runs' editors keep no state beside the weights (a memory editor such as "
               "GRACE records its codebook size, radii and hit shares here at every checkpoint).")
else:
    state_metrics = sorted(state["metric"].unique())
    chosen_state = st.multiselect("Editor-state metrics", state_metrics, default=state_metrics[:4], key="w-state")
    sel = state[state["metric"].isin(chosen_state)]
    if not sel.empty:
        ui.show_figure(plots.weights_figure(sel, metrics=chosen_state, color="method", dash="series", cols=2,
                                            height=360), "editor-state", key="w-state-fig")
    st.caption("What the editor itself holds at each checkpoint (Editor.state_metrics), next to the weights above: "
               "for GRACE the weights stay exactly flat while its codebook grows.")
ui.share_link()
