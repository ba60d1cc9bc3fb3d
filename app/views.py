"""Data for the pages: read the run store, call the analysis layer, return long-form DataFrames for
:mod:`app.figures`. No Streamlit here (the pages cache these results with ``st.cache_data``, keyed by the runs'
``updated`` time so that a running run's new rows show up).

Metric rows are read with aggregate-only SQL (``case_id IS NULL``) where a page needs no per-case rows: a 2000-edit
run holds hundreds of thousands of per-case retention rows that a curve does not need.
"""
from __future__ import annotations

import math
import re
import sqlite3
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .store import METRIC_COLUMNS, RunStore, decode_npz

#: one-sentence meanings (EVALUATION.md) shown under the metric pickers and in figure captions
MEANINGS = {
    "reliability": "Reliability: teacher-forced share of target tokens the model predicts after the edit prompt "
                   "(1 = the new fact is produced token for token).",
    "generality": "Generality: the same score on paraphrases of the edit prompt (does the edit generalise?).",
    "locality": "Locality: agreement of the edited model's argmax tokens with the UNEDITED model's on unrelated "
                "prompts (1 = no drift; it measures drift, not truth).",
    "editing_score": "Editing Score (AGRADE): harmonic mean of reliability, generality and locality.",
    "retention": "Retention: every edit made so far re-scored on the current model at each checkpoint "
                 "(sequential editing forgets earlier edits when it collapses).",
    "edit": "Immediate: the edits of each step scored right after that step.",
    "fro": "‖W‖_F: Frobenius norm of the edited matrix.",
    "spectral": "‖W‖₂: largest singular value of the edited matrix.",
    "cond": "Condition number σ_max/σ_min of W: a sharp rise signals numerical collapse.",
    "effective_rank": "Effective rank exp(H(σ/Σσ)) of W (Roy & Vetterli 2007).",
    "delta_fro": "‖ΔW‖_F of the accumulated change W − W0.",
    "delta_cond": "Condition number σ_1/σ_r of ΔW over its non-zero singular values (MOSE, PRUNE).",
    "delta_rank": "Numerical rank of ΔW (one per ROME edit until it saturates).",
    "rel_change": "‖ΔW‖_F / ‖W0‖_F: size of the accumulated change relative to the original weight.",
    "preserve_change": "sqrt(tr(ΔW C ΔWᵀ) / tr(W0 C W0ᵀ)), C = E[kkᵀ] of the layer's inputs: how much the outputs of "
                       "the preserved keys moved, relative (0 = unchanged; MOSE's and MEMIT's preservation term). "
                       "Only where the layer's key statistics are cached.",
    "mean_cosine_shift": "Mean over probe prompts of 1 − cos(before, after): 0 = the states did not move.",
    "linear_cka": "Linear CKA between before and after states: 1 = same geometry up to rotation and scale.",
    "mmd_rbf": "Squared MMD (Gaussian kernel, median bandwidth) between before and after: 0 = same distribution.",
    "angle_flat": "Angle between this step's update and the previous one of the same matrix (flattened): > 90° = "
                  "the new edit partly undoes the last one (interference).",
    "angle_accumulated": "Angle between this step's update and the change accumulated before it.",
}


# ---------------------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------------------
def run_short(run_id: str, label: str | None) -> str:
    """A run's short display name: its label, else the random part of its id."""
    return label if label else (run_id.rsplit("-", 1)[-1] if run_id else "?")


def run_name(run_id: str, method: str | None, label: str | None) -> str:
    return f"{method or '?'} · {run_short(run_id, label)}"


def runs_frame(store: RunStore, run_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Runs with a display ``name`` (newest first); all runs when ``run_ids`` is None."""
    df = store.list_runs()
    if run_ids is not None:
        df = df[df["run_id"].isin(list(run_ids))]
    df = df.copy()
    labels = [lab if isinstance(lab, str) and lab else None for lab in df["label"]]
    df["run"] = [run_short(r, lab) for r, lab in zip(df["run_id"], labels)]
    df["name"] = [run_name(r, m, lab) for r, m, lab in zip(df["run_id"], df["method"], labels)]
    return df


def run_versions(store: RunStore, run_ids: Sequence[str]) -> tuple:
    """A cache key that changes whenever one of the runs gets new rows (``updated`` times)."""
    if not run_ids:
        return ()
    conn = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute(f"SELECT run_id, updated FROM runs WHERE run_id IN ({', '.join('?' * len(run_ids))})",
                            list(run_ids)).fetchall()
    finally:
        conn.close()
    return tuple(sorted(rows))


def _attach_names(df: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    info = runs.set_index("run_id")[["method", "name", "run"]]
    out = df.join(info, on="run_id")
    out["method"] = out["method"].fillna("?")
    out["name"] = out["name"].fillna(out["run_id"])
    out["run"] = out["run"].fillna(out["run_id"])
    return out


def _with_run(curves: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Add the runs' short display names (``run``) to curves grouped by ``run_id``."""
    return curves.assign(run=curves["run_id"].map(dict(zip(runs["run_id"], runs["run"]))).fillna(curves["run_id"]))


def aggregate_metrics(store: RunStore, run_ids: Sequence[str], kinds: Sequence[str] | None = None,
                      metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Aggregate metric rows (``case_id IS NULL``), the columns of ``RunStore.metrics_frame``."""
    if not run_ids:
        return pd.DataFrame(columns=list(METRIC_COLUMNS))
    where = [f"run_id IN ({', '.join('?' * len(run_ids))})", "case_id IS NULL"]
    args: list[Any] = list(run_ids)
    for col, vals in (("kind", kinds), ("metric", metrics)):
        if vals is not None:
            where.append(f"{col} IN ({', '.join('?' * len(vals))})")
            args.extend(vals)
    sql = f"SELECT {', '.join(METRIC_COLUMNS)} FROM metrics WHERE {' AND '.join(where)} ORDER BY rowid"
    conn = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, timeout=30)
    try:
        df = pd.read_sql_query(sql, conn, params=args)
    finally:
        conn.close()
    df["n_edits"] = df["n_edits"].astype("int64")
    for c in ("step", "layer"):
        df[c] = df[c].astype("Int64")
    df["value"] = df["value"].astype("float64")
    return df


# ---------------------------------------------------------------------------------------------------------------
# Metrics page
# ---------------------------------------------------------------------------------------------------------------
CURVE_KINDS = ("retention", "edit", "locality")


def protocols(stored: bool = True) -> tuple[list[str], dict[str, str]]:
    """The evaluation protocols and their help texts, for the pages (which do not import analysis.evaluation
    themselves): every label a stored row may carry (``PROTOCOL_LABELS``), or with ``stored=False`` the ones a run
    can be asked for (``PROTOCOLS``)."""
    from analysis.evaluation import PROTOCOL_HELP, PROTOCOL_LABELS, PROTOCOLS
    return list(PROTOCOL_LABELS if stored else PROTOCOLS), dict(PROTOCOL_HELP)


def metric_curves(store: RunStore, run_ids: Sequence[str], *, kinds: Sequence[str] = CURVE_KINDS,
                  protocol: str = "tf_token_acc", editing_score: bool = True,
                  baseline: bool = False) -> pd.DataFrame:
    """Curves vs edits, one per run (:func:`analysis.curves.metric_curves` grouped by method and run): columns
    ``method, run_id, run, kind, metric, n_edits, mean, lo, hi, std, n_runs, panel``.

    ``panel`` is "<kind> · <metric>". Locality probe rows (``kind="locality"``) follow the protocol when the runs
    recorded probe rows under it (tf_token_acc, wild_gen, wild_gen_f1), and fall back to tf_token_acc otherwise
    (prob_margin / gen_exact have none).
    Retention adds an ``editing_score`` panel (harmonic mean of reliability, generality, locality at each
    checkpoint) when all three exist. ``baseline``: retention curves start at 0 edits with the unedited model's
    scores (the run's pre-edit evaluation, over all its requests), where the run recorded one.
    """
    from analysis.curves import metric_curves as _curves
    from analysis.evaluation import editing_score as _score
    runs = runs_frame(store, run_ids)
    want = list(kinds) + (["pre"] if baseline and "retention" in kinds else [])
    df = aggregate_metrics(store, run_ids, kinds=want, metrics=["reliability", "generality", "locality"])
    df.loc[df["kind"] == "pre", "kind"] = "retention"  # the 0-edit point of the retention curves
    probe = df["kind"] == "locality"
    probe_protocol = protocol if bool((df.loc[probe, "protocol"] == protocol).any()) else "tf_token_acc"
    df = df[(~probe & (df["protocol"].isna() | (df["protocol"] == protocol)))
            | (probe & (df["protocol"].isna() | (df["protocol"] == probe_protocol)))]
    if df.empty:
        return pd.DataFrame(columns=["method", "run_id", "run", "kind", "metric", "n_edits", "mean", "lo", "hi",
                                     "std", "n_runs", "panel"])
    df = _attach_names(df, runs).drop(columns=["protocol", "layer", "param"])
    curves = _with_run(_curves(df, by=("method", "run_id"), band="none", keys=("kind", "metric")), runs)
    if editing_score and "retention" in kinds:
        ret = curves[curves["kind"] == "retention"].pivot_table(index=["method", "run_id", "run", "n_edits"],
                                                                columns="metric", values="mean")
        if {"reliability", "generality", "locality"} <= set(ret.columns):
            score = ret.apply(lambda r: _score(r["reliability"], r["generality"], r["locality"])
                              if r[["reliability", "generality", "locality"]].notna().all() else math.nan, axis=1)
            es = score.rename("mean").reset_index()
            es["kind"], es["metric"], es["n_runs"], es["std"] = "retention", "editing_score", 1, 0.0
            es["lo"] = es["hi"] = es["mean"]
            curves = pd.concat([curves, es[curves.columns]], ignore_index=True)
    order = {k: i for i, k in enumerate(kinds)}
    morder = {"reliability": 0, "generality": 1, "locality": 2, "editing_score": 3}
    curves["panel"] = curves["kind"] + " · " + curves["metric"]
    curves = curves.sort_values(by=["kind", "metric", "n_edits"], kind="stable",
                                key=lambda s: s.map(order) if s.name == "kind" else
                                (s.map(morder) if s.name == "metric" else s))
    return curves.reset_index(drop=True)


def collapse_markers(store: RunStore, run_ids: Sequence[str]) -> pd.DataFrame:
    """Collapse points the engine recorded (``kind="collapse"`` rows of :func:`analysis.collapse.detect_collapse`,
    metric ``collapse:<signal>`` with value 1), in the marker format of :func:`analysis.plots.curve_figure`:
    ``run_id, method, run, kind ("performance"), step, indicator`` -- one row per (run, step)."""
    cols = ["run_id", "method", "run", "kind", "step", "indicator"]
    df = aggregate_metrics(store, run_ids, kinds=["collapse"])
    df = df[df["value"].fillna(0) != 0]
    if df["metric"].str.startswith("collapse:").any():
        df = df[df["metric"].str.startswith("collapse:")]
    if df.empty:
        return pd.DataFrame(columns=cols)
    df = df.assign(indicator=df["metric"].str.replace("collapse:", "", regex=False))
    df = df.sort_values("n_edits").drop_duplicates(["run_id", "indicator"])
    out = df.groupby(["run_id", "n_edits"], as_index=False)["indicator"].agg(lambda s: ", ".join(sorted(set(s))))
    out = _attach_names(out.rename(columns={"n_edits": "step"}), runs_frame(store, run_ids))
    out["indicator"] = out["run"] + ": " + out["indicator"]
    out["kind"] = "performance"
    return out[cols]


def metrics_view(store: RunStore, run_ids: Sequence[str], *, kinds: Sequence[str] = CURVE_KINDS,
                 protocol: str = "tf_token_acc") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(curves, collapse markers) for the Metrics page."""
    return (metric_curves(store, run_ids, kinds=kinds, protocol=protocol, baseline=True),
            collapse_markers(store, run_ids))


def final_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """Last retention value of each (run, metric): rows run name, columns the metrics."""
    ret = curves[curves["kind"] == "retention"]
    if ret.empty:
        return pd.DataFrame()
    ret = ret.assign(name=ret["method"] + " · " + ret["run"])
    last = ret.sort_values("n_edits").groupby(["name", "metric"], as_index=False).last()
    table = last.pivot_table(index="name", columns="metric", values="mean")
    table["edits"] = last.groupby("name")["n_edits"].max()
    return table


#: the final-metric columns of the Runs table: retention at the last checkpoint (tf_token_acc protocol)
FINAL_METRICS = ("reliability", "generality", "locality", "editing_score")


def final_metrics(store: RunStore, run_ids: Sequence[str]) -> pd.DataFrame:
    """Per run (index ``run_id``): retention of each metric at the run's last checkpoint, tf_token_acc protocol,
    plus ``editing_score`` (columns :data:`FINAL_METRICS`, NaN where the run has none)."""
    curves = metric_curves(store, run_ids, kinds=("retention",)) if run_ids else pd.DataFrame()
    if curves.empty:
        return pd.DataFrame(columns=list(FINAL_METRICS), index=pd.Index([], name="run_id"))
    last = curves.sort_values("n_edits").groupby(["run_id", "metric"], as_index=False).last()
    table = last.pivot_table(index="run_id", columns="metric", values="mean")
    return table.reindex(columns=list(FINAL_METRICS))


def with_data_first(runs: pd.DataFrame) -> str:
    """The run an analysis page opens with: the newest with at least one edit made, else the newest."""
    done = runs[runs["n_edits_done"].fillna(0) > 0]
    return (done if not done.empty else runs)["run_id"].iloc[0]


def config_fields(config: dict) -> pd.DataFrame:
    """A config dict as labelled rows (``field``, ``value`` as text) for a table."""
    def text(v):
        return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else "–" if v is None else str(v)
    return pd.DataFrame({"field": list(config), "value": [text(v) for v in config.values()]})


# ---------------------------------------------------------------------------------------------------------------
# Weights page
# ---------------------------------------------------------------------------------------------------------------
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


def editor_state_curves(store: RunStore, run_ids: Sequence[str]) -> pd.DataFrame:
    """The editors' own state at checkpoints (``kind="editor"`` rows of :meth:`editors.base.Editor.state_metrics`,
    e.g. a codebook's size and hit shares): ``run_id, method, name, run, series, layer, metric, n_edits, value``.
    Empty for editors whose state is their weights only."""
    runs = runs_frame(store, run_ids)
    df = aggregate_metrics(store, run_ids, kinds=["editor"])
    cols = ["run_id", "method", "name", "run", "series", "layer", "metric", "n_edits", "value"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    df = _attach_names(df, runs)
    df["series"] = df["run"] + df["layer"].map(lambda v: "" if pd.isna(v) else f" · L{int(v)}")
    return df[cols]


def layer_of(param: str) -> int | None:
    m = _LAYER_RE.search(param)
    return int(m.group(1)) if m else None


def weight_choices(store: RunStore, run_ids: Sequence[str]) -> tuple[list[str], list[int]]:
    """(metrics, layers) present among the runs' weight rows."""
    df = aggregate_metrics(store, run_ids, kinds=["weights"])
    return sorted(df["metric"].unique()), sorted(int(x) for x in df["layer"].dropna().unique())


def weight_curves(store: RunStore, run_ids: Sequence[str], metric: str,
                  layers: Sequence[int] | None = None) -> pd.DataFrame:
    """One weight metric per (run, layer) vs edits: ``run_id, method, name, run, series ("<run> · L<layer>"),
    layer, param, metric, n_edits, value``."""
    runs = runs_frame(store, run_ids)
    df = aggregate_metrics(store, run_ids, kinds=["weights"], metrics=[metric])
    if layers:
        df = df[df["layer"].isin(list(layers))]
    df = _attach_names(df, runs)
    df["series"] = df["run"] + " · L" + df["layer"].astype(str)
    return df[["run_id", "method", "name", "run", "series", "layer", "param", "metric", "n_edits", "value"]]


def artifact_steps(store: RunStore, run_id: str, name: str) -> list[int]:
    arts = store.list_artifacts(run_id)
    return sorted({int(n) for n in arts.loc[arts["name"] == name, "n_edits"].dropna()})


def spectrum(store: RunStore, run_id: str, n_edits: int) -> pd.DataFrame:
    """Singular values at one checkpoint from the ``singular_values`` artifact: columns
    ``n_edits, layer, param, which, index, sigma`` (as :func:`analysis.weights.spectrum_frame`)."""
    try:
        arrays = store.get_artifact(run_id, "singular_values", n_edits)
    except KeyError:
        return pd.DataFrame(columns=["n_edits", "layer", "series", "param", "which", "index", "sigma"])
    frames = []
    for key, s in arrays.items():
        param, _, which = key.partition("|")
        s = np.sort(np.asarray(s, dtype=np.float64).reshape(-1))[::-1]
        layer = layer_of(param)
        frames.append(pd.DataFrame({"n_edits": n_edits, "layer": layer, "series": f"layer {layer}", "param": param,
                                    "which": which or "W", "index": np.arange(1, s.size + 1), "sigma": s}))
    if not frames:
        return pd.DataFrame(columns=["n_edits", "layer", "series", "param", "which", "index", "sigma"])
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------------------------
# Geometry page
# ---------------------------------------------------------------------------------------------------------------
#: update-angle metrics the engine writes (degrees), as named in the store
UPDATE_ANGLE_METRICS = ("angle_flat", "angle_accumulated")


def update_angle_frame(store: RunStore, run_ids: Sequence[str]) -> pd.DataFrame:
    """Successive-update angles in degrees: columns ``run_id, method, name, n_edits, layer, metric, angle``."""
    runs = runs_frame(store, run_ids)
    df = aggregate_metrics(store, run_ids, kinds=["update_angle"], metrics=list(UPDATE_ANGLE_METRICS))
    df = df.dropna(subset=["value"]).copy()
    df["angle"] = df["value"]  # the engine stores degrees
    return _attach_names(df, runs)[["run_id", "method", "name", "run", "n_edits", "layer", "metric", "angle"]]


def _all_artifacts(store: RunStore, run_id: str, name: str, n_edits: int | None = None
                   ) -> list[tuple[int | None, int | None, dict]]:
    """Every artifact ``name`` of a run (only those at ``n_edits`` when given) in insertion order:
    (n_edits, step, arrays)."""
    sql = "SELECT n_edits, step, format, blob FROM artifacts WHERE run_id = ? AND name = ?"
    args: list[Any] = [run_id, name]
    if n_edits is not None:
        sql += " AND n_edits = ?"
        args.append(int(n_edits))
    conn = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute(sql + " ORDER BY rowid", args).fetchall()
    finally:
        conn.close()
    return [(n, s, decode_npz(b)) for n, s, fmt, b in rows if fmt == "npz"]


def geoedit_angles(store: RunStore, run_id: str, n_edits: int) -> pd.DataFrame:
    """GeoEdit per-neuron angles (raw vs latent) of the step that made ``n_edits`` edits, from the editor's
    artifacts when the method stored any: columns of :func:`analysis.angles.neuron_angle_frame` plus ``n_edits``.
    Arrays are found by key: one containing "angle" and "raw", one containing "angle" and "latent"."""
    from analysis.angles import neuron_angle_frame
    frames = []
    for n, _, arrays in _all_artifacts(store, run_id, "editor", n_edits):
        raw = {k: v for k, v in arrays.items() if "angle" in k.lower() and "raw" in k.lower()}
        latent = {k: v for k, v in arrays.items() if "angle" in k.lower() and "latent" in k.lower()}
        for key, r in raw.items():
            lkey = next((k for k in latent if k.replace("latent", "raw") == key), None)
            lat = latent.get(lkey) if lkey else None
            if lat is not None and np.size(lat) != np.size(r):
                lat = None
            cls = arrays.get(key.replace("raw_angle", "neuron_class")) if "raw_angle" in key else None
            if cls is not None and np.size(cls) != np.size(r):
                cls = None
            # the classes GeoEdit used (its own φ1/φ2, on the latent angles) when stored, else recomputed
            f = neuron_angle_frame(np.asarray(r).reshape(-1), None if lat is None else np.asarray(lat).reshape(-1),
                                   None if cls is None else np.asarray(cls).reshape(-1).astype(np.int64),
                                   param=key.split("|")[0], layer=layer_of(key))
            f["n_edits"] = n
            frames.append(f)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["layer", "param", "neuron", "space", "angle", "class", "n_edits"])


#: GeoEdit's per-edit diagnostics (editors.geoedit info keys, stored as kind="info" metrics) -> display names
GEOEDIT_SUMMARY = (
    ("class_counts.aligned", "aligned neurons (φ < φ1, synergistic)"),
    ("class_counts.orthogonal", "orthogonal neurons (φ1 ≤ φ ≤ φ2, no update)"),
    ("class_counts.conflicting", "conflicting neurons (φ > φ2, forget-then-learn)"),
    ("class_shares.aligned", "share aligned"),
    ("class_shares.orthogonal", "share orthogonal"),
    ("class_shares.conflicting", "share conflicting"),
    ("tau_old_norm", "|τ_old| (Frobenius)"),
    ("tau_new_norm", "|τ_new| (Frobenius)"),
    ("edit_to_new_norm", "|τ_edit| / |τ_new|"),
    ("tau_new_energy_shares.orthogonal", "share of |τ_new|² in orthogonal neurons (masked)"),
    ("alpha_median", "α median"),
    ("alpha_mean", "α mean"),
    ("beta_median", "β median"),
    ("beta_mean", "β mean"),
    ("angle_spearman", "Spearman(latent angle, raw angle)"),
)


def geoedit_variant(store: RunStore, run_id: str) -> str | None:
    """What a GeoEdit run ran (:func:`editors.geoedit.variant_label` of its stored method config): the paper's full
    method or which deviation (e.g. '+MW'); None for other methods."""
    run = store.get_run(run_id)
    if run.get("method") not in ("geoedit", "geoedit-mw"):
        return None
    from editors.geoedit import variant_label
    return f"{run['method']}: {variant_label(run.get('method_config') or {})}"


def geoedit_summary(store: RunStore, run_id: str, n_edits: int) -> pd.DataFrame:
    """GeoEdit's per-edit diagnostics of the step that made ``n_edits`` edits (``GEOEDIT_SUMMARY``): columns
    ``key, quantity, value``; empty when the run stored none."""
    df = aggregate_metrics(store, [run_id], kinds=["info"], metrics=[k for k, _ in GEOEDIT_SUMMARY])
    df = df[df["n_edits"] == int(n_edits)].drop_duplicates("metric", keep="last").set_index("metric")
    rows = [{"key": k, "quantity": label, "value": float(df.loc[k, "value"])} for k, label in GEOEDIT_SUMMARY
            if k in df.index]
    return pd.DataFrame(rows, columns=["key", "quantity", "value"])


def geoedit_fusion_weights(store: RunStore, run_id: str, n_edits: int) -> pd.DataFrame:
    """GeoEdit Fig. 4 of one step: per neuron |τ_old|, |τ_new| beside α, β, each min-max scaled to [0, 1]
    (:func:`analysis.importance.fusion_weights_frame`); empty when the run stored no such arrays."""
    from analysis.importance import fusion_weights_frame
    keys = ("tau_old_norm", "tau_new_norm", "alpha", "beta")
    for _, _, arrays in reversed(_all_artifacts(store, run_id, "editor", n_edits)):
        if all(k in arrays for k in keys):
            return fusion_weights_frame(*(np.asarray(arrays[k], dtype=np.float64).reshape(-1) for k in keys))
    return pd.DataFrame(columns=["neuron", "task", "quantity", "label", "value"])


def change_map(store: RunStore, run_id: str, metric: str = "rel_change") -> pd.DataFrame:
    """Where the update lands: ``layer x n_edits`` of a weight metric (default ‖ΔW‖/‖W0‖)."""
    df = aggregate_metrics(store, [run_id], kinds=["weights"], metrics=[metric])
    return df[["layer", "n_edits", "value"]].dropna(subset=["layer"])


def neuron_map(store: RunStore, run_id: str, n_edits: int) -> pd.DataFrame:
    """Per-neuron importance / magnitude arrays an editor stored at the step that made ``n_edits`` edits (keys
    containing "importance", "magnitude", "alpha" or "beta"), as ``layer, neuron, value, key``."""
    rows = {}
    for _, _, arrays in _all_artifacts(store, run_id, "editor", n_edits):
        for key, v in arrays.items():
            low = key.lower()
            if any(w in low for w in ("importance", "magnitude", "alpha", "beta")) and np.ndim(v) in (1, 2):
                rows[key] = np.asarray(v, dtype=np.float64)
    frames = []
    for key, v in rows.items():
        v2 = v if v.ndim == 2 else v.reshape(1, -1)
        layers = [layer_of(key)] if v.ndim == 1 else list(range(v2.shape[0]))
        for li, vec in zip(layers, v2):
            frames.append(pd.DataFrame({"layer": li, "neuron": np.arange(vec.size), "value": vec, "key": key}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["layer", "neuron", "value", "key"])


# ---------------------------------------------------------------------------------------------------------------
# Hidden states page
# ---------------------------------------------------------------------------------------------------------------
def hidden_index(store: RunStore, run_id: str) -> dict[str, Any]:
    """``{"steps": [n_edits...] (after the baseline), "layers": [..]}`` of the stored hidden states."""
    arts = store.list_artifacts(run_id)
    hs = arts[arts["name"] == "hidden_states"]
    steps = sorted({int(n) for n in hs["n_edits"].dropna() if int(n) > 0})
    layers: set[int] = set()
    if len(hs):
        for n, _, arrays in _all_artifacts(store, run_id, "hidden_states")[-1:]:
            layers.update(int(k[5:]) for k in arrays if k.startswith("layer") and k[5:].isdigit())
    return {"steps": steps, "layers": sorted(layers)}


def hidden_pair(store: RunStore, run_id: str, n_edits: int, layer: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(before [n, d], after [n, d], prompts) for one checkpoint and layer."""
    key = f"layer{layer}"
    before = after = None
    prompts: list[str] = []
    for n, _, arrays in _all_artifacts(store, run_id, "hidden_states"):
        if key not in arrays:
            continue
        if n == 0 and before is None:
            before = arrays[key]
        if n == n_edits:
            after = arrays[key]
            prompts = [str(p) for p in arrays.get("prompts", [])]
    if before is None or after is None:
        raise KeyError(f"run {run_id} has no hidden states of layer {layer} at 0 and {n_edits} edits")
    return before, after, prompts


def hidden_projection(store: RunStore, run_id: str, n_edits: int, layer: int, method: str = "pca",
                      seed: int = 0) -> tuple[pd.DataFrame, dict[str, float]]:
    """Joint 2-D projection of the probe states before editing and after ``n_edits`` (``x, y, which, idx, prompt``)
    and the projection-free shift numbers (mean cosine shift, linear CKA, MMD)."""
    from analysis.hidden import project, shift_metrics
    before, after, prompts = hidden_pair(store, run_id, n_edits, layer)
    df = project(before, after, method=method, seed=seed)
    if prompts:
        df["prompt"] = [prompts[i] if i < len(prompts) else "" for i in df["idx"]]
    return df, shift_metrics(before, after)


# ---------------------------------------------------------------------------------------------------------------
# General abilities page
# ---------------------------------------------------------------------------------------------------------------
def general_curves(store: RunStore, run_ids: Sequence[str]) -> pd.DataFrame:
    """General-ability scores vs edits, one curve per (run, task metric): columns of
    :func:`analysis.curves.metric_curves` (``method, run, metric, n_edits, mean, ...``)."""
    from analysis.curves import metric_curves as _curves
    runs = runs_frame(store, run_ids)
    df = aggregate_metrics(store, run_ids, kinds=["general"])
    if df.empty:
        return pd.DataFrame(columns=["method", "run_id", "run", "metric", "n_edits", "mean", "lo", "hi", "std",
                                     "n_runs"])
    df = _attach_names(df, runs).drop(columns=["protocol", "layer", "param"])
    return _with_run(_curves(df, by=("method", "run_id"), band="none", keys=("metric",)), runs)


def general_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Before (first point, 0 edits) and after (last checkpoint) per (run, metric), with the change."""
    if curves.empty:
        return pd.DataFrame()
    c = curves.assign(name=curves["method"] + " · " + curves["run"]).sort_values("n_edits")
    g = c.groupby(["name", "metric"])
    out = pd.DataFrame({"before": g["mean"].first(), "after": g["mean"].last(), "edits": g["n_edits"].max()})
    out["change"] = out["after"] - out["before"]
    return out.reset_index()


def series_column(df: pd.DataFrame) -> str:
    """Colour column for a plot over runs: "method" (method colours) when each method appears in one run only,
    else "name" (one colour per run)."""
    if "method" not in df.columns or df.empty:
        return "name"
    per = df.groupby("method")["run_id"].nunique() if "run_id" in df.columns else None
    return "method" if per is None or (per <= 1).all() else "name"


__all__ = ["MEANINGS", "runs_frame", "run_versions", "aggregate_metrics", "metric_curves", "metrics_view",
           "collapse_markers", "final_summary", "weight_choices", "weight_curves", "spectrum",
           "artifact_steps", "update_angle_frame", "geoedit_angles", "geoedit_variant", "geoedit_summary",
           "geoedit_fusion_weights", "GEOEDIT_SUMMARY", "change_map", "neuron_map", "hidden_index",
           "hidden_pair", "hidden_projection", "general_curves", "general_table", "layer_of", "run_name", "run_short",
           "series_column", "FINAL_METRICS", "final_metrics", "protocols", "with_data_first", "config_fields"]
