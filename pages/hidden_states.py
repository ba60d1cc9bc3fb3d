"""Hidden states: how far editing moves the probe set's hidden states (projection + projection-free numbers)."""
import streamlit as st

from analysis import plots
from app import ui

ui.header("Hidden states", "The last-token hidden states of a fixed probe set, before editing and after n edits, "
          "projected jointly to 2-D (with each group's density on the margins). Computed when you open a step, "
          "from the states the run stored.")

run_ids = ui.run_picker(multi=False)
if not run_ids:
    st.stop()
run_id = run_ids[0]
index = ui.view("hidden_index", [run_id], run_id)
if not index["steps"] or not index["layers"]:
    st.info("This run stored no hidden states. Tick 'Hidden states of the probe set' on New run to record them "
            "at every checkpoint.")
    st.stop()
c1, c2, c3 = st.columns([3, 1, 1])
want_step, want_layer = ui.qp_int("step"), ui.qp_int("layer")
step = c1.select_slider("Edits made", index["steps"],
                        value=want_step if want_step in index["steps"] else index["steps"][-1], key="h-step")
layer = c2.selectbox("Layer", index["layers"],
                     index=index["layers"].index(want_layer) if want_layer in index["layers"] else 0, key="h-layer")
method = c3.radio("Projection", ["pca", "tsne", "umap"], index=ui.qp_choice("proj", ["pca", "tsne", "umap"], "pca"),
                  key="h-method",
                  format_func={"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}.get)
ui.qp_set(step=step, layer=layer, proj=method)
names = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
with st.spinner(f"Projecting the probe states with {names[method]}… (t-SNE and UMAP can take a minute on a small "
                "machine; each checkpoint, layer and projection is computed once, then kept)", show_time=True):
    df, shift = ui.projection(run_id, step, layer, method)
fig = plots.scatter_with_marginals(df, color="which", hover="prompt", x_title=f"{names[method]} component 1",
                                   y_title=f"{names[method]} component 2",
                                   title=f"Probe hidden states at layer {layer}: before editing and after {step} "
                                         f"edits ({names[method]}, fitted jointly)")
ui.show_figure(fig, f"hidden-{run_id}-{step}-{layer}", key="h-fig")
m1, m2, m3 = st.columns(3)
m1.metric("Mean cosine shift", f"{shift.get('mean_cosine_shift', float('nan')):.4f}",
          help="Mean over probe prompts of 1 − cos(before, after): 0 = the states did not move.")
m2.metric("Linear CKA", f"{shift.get('linear_cka', float('nan')):.4f}",
          help="1 = same geometry up to rotation and scale.")
m3.metric("MMD²", f"{shift.get('mmd_rbf', float('nan')):.4f}",
          help="Squared maximum mean discrepancy (Gaussian kernel, median bandwidth): 0 = same distribution.")
st.caption("The shift numbers need no projection; a projection can exaggerate or hide a shift (t-SNE and UMAP "
           "distances between clusters mean little).")
ui.share_link()
