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
# chance is a reference line in its task's panel, not a panel of its own
is_chance = curves["metric"].str.endswith("/chance")
chance = curves[is_chance].assign(task=lambda d: d["metric"].str.rsplit("/", n=1).str[0]).groupby("task")["mean"].mean()
curves = curves[~is_chance]
panels = list(dict.fromkeys(curves["metric"]))
same_method = curves.groupby("method")["run"].nunique().max() > 1  # then each run gets a colour of its own
if same_method:
    curves = curves.assign(series=curves["method"] + " · " + curves["run"])
fig = plots.curve_figure(curves, y="mean", color="series" if same_method else "method",
                         dash=None if same_method else "run", facet="metric", band=False,
                         y_title="accuracy (0–1)", x_title="edits made (n)",
                         title=f"General abilities vs edits — {', '.join(dict.fromkeys(curves['run']))}")
for i, metric in enumerate(panels):
    task = metric.rsplit("/", 1)[0]
    if metric.endswith("/accuracy"):
        fig.update_yaxes(range=[-0.02, 1.02], row=i // 2 + 1, col=i % 2 + 1)
        if task in chance.index:
            fig.add_hline(y=float(chance[task]), line={"dash": "dot", "color": "#888"}, row=i // 2 + 1,
                          col=i % 2 + 1, annotation_text="chance", annotation_position="bottom right")
ui.show_figure(fig, "general-abilities", key="ga-fig")
st.caption("Each panel is one task/metric, x = edits made; the dotted line is chance. Accuracy is the share of "
           "examples whose label word gets the higher log-probability.")
st.subheader("Before and after")
st.dataframe(views.general_table(curves).style.format(precision=3, subset=["before", "after", "change"]),
             hide_index=True, key="ga-table")
ui.frame_download(curves, "general-abilities", key="ga-dl")
ui.share_link()
