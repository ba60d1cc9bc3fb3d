"""General abilities: does editing damage what the model could do before?"""
import streamlit as st

from analysis import plots
from app import ui, views

ui.header("General abilities", "Scores of the built-in general-ability probes (or GLUE subsets) at the start and at "
          "every checkpoint. A falling line = the edits damage unrelated abilities.")

run_ids = ui.run_picker()
if not run_ids:
    st.stop()
curves = ui.view("general_curves", run_ids, run_ids)
if curves.empty:
    st.info("These runs recorded no general-ability probes (choose 'builtin' under General-ability probes on New "
            "run).")
    st.stop()
fig = plots.curve_figure(curves, y="mean", color="method", dash="run", facet="metric", band=False, y_title="score")
ui.show_figure(fig, "general-abilities", key="ga-fig")
st.caption("Each panel is one task/metric, x = edits made. Accuracy is the share of examples whose label word gets "
           "the higher log-probability.")
st.subheader("Before and after")
st.dataframe(views.general_table(curves).style.format(precision=3, subset=["before", "after", "change"]),
             hide_index=True, key="ga-table")
ui.frame_download(curves, "general-abilities", key="ga-dl")
ui.share_link()
