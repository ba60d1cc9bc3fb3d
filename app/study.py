"""Reproduction studies built on the run engine: ``collapse_study`` (why sequential editing collapses).

``collapse_study(methods, n, data, runs_dir)`` makes ``n`` sequential single edits with every method (one run per
method, all in ONE run store, the model loaded once and restored exactly after each run) and summarises each run at
``n`` edits:

* retention (tf_token_acc, every edit made so far, at the last checkpoint): reliability, generality, locality
  (the requests' own locality prompts against the UNEDITED model), and the fixed locality probe set;
* the numerical health of the edited matrices (the MOSE / PRUNE / AdaEdit argument): the Frobenius norm and the
  condition number of each edited matrix at ``n`` edits relative to the unedited matrix (1.0 = unchanged), from
  the store's ``weights`` rows; the unedited values are computed once from the loaded model;
* beside them, how far the matrices moved (:data:`DRIFT_COLUMNS`): ``drift`` = ‖W − W0‖/‖W0‖ and ``preserve`` = the
  relative change of the preserved keys' outputs. MOSE keeps norm and condition number at exactly 1 while it
  drifts; these two columns show it.

The papers' claims this reproduces (at a small scale): additive methods (ROME, MEMIT) blow up the norm and the
condition number and lose their edits; RECT / AlphaEdit / PRUNE slow that down (MOSE Fig. 2, Table 1; PRUNE);
AdaEdit keeps the norm near its original (AdaEdit Tables 1, 4, 5); MOSE keeps both exactly (MOSE Eq. 5-14).

The lifelong paradigms (issue 18) join them: UltraEdit (lifelong normalisation, and ``ultraedit:no_ln``, the
ablation StableEdit says collapses at once) and GRACE (memory: flat weights, a codebook). A method entry may name a
preset variant as ``method:variant``. With ``protocols`` including ``wild_gen`` the table also gives the WILD
(free-generation) exact-match retention next to the teacher-forced one. The ``lifelong`` preset
(:data:`STUDY_PRESETS`) sets all of this at 1,000 edits with geometric checkpoints.

A method whose finished run with the same study label already exists in the store is not run again (``reuse``), and
an unfinished one (killed, interrupted, cancelled) continues from its newest resume snapshot (app/snapshots.py), so
an interrupted study is continued by running the same command.
"""
from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from analysis import evaluation as ev
from editors.base import ConfigError
from editors.registry import collapse_study_methods, get_editor_class

from .engine import run_sequential, run_summary
from .runconfig import RunConfig
from .store import RunStore

log = logging.getLogger(__name__)

#: the methods and data of `python -m app study collapse` without --methods / --data
#: (the methods registered with collapse_study=True, in the registry's order)
DEFAULT_METHODS = tuple(collapse_study_methods())
DEFAULT_DATA = "counterfact:../shared/data/counterfact/counterfact-edit.json"

TABLE_COLUMNS = ("method", "status", "n_edits", "reliability", "generality", "locality", "probe_locality",
                 "fro_rel", "cond_rel", "fro_rel_max", "cond_rel_max", "drift", "drift_max", "preserve",
                 "preserve_max", "layers", "seconds_per_edit", "run_id")
#: the columns beside norm and condition number (issue 14: both ratios are 1 for MOSE by construction, while its
#: matrices drift furthest from W0): ``drift`` = ‖W − W0‖_F / ‖W0‖_F (the weights rows' ``rel_change``) and
#: ``preserve`` = the relative change of the preserved keys' outputs sqrt(tr(ΔW C ΔWᵀ) / tr(W0 C W0ᵀ)) (the rows'
#: ``preserve_change``; absent for matrices without cached key statistics); mean and largest over edited matrices
DRIFT_COLUMNS = {"drift": "rel_change", "preserve": "preserve_change"}
#: extra columns when a run used wild_gen: WILD exact-match retention and probe locality at the last checkpoint
WILD_COLUMNS = ("reliability_wild", "generality_wild", "locality_wild", "probe_locality_wild")

#: named study settings (``python -m app study collapse --preset NAME``); explicit arguments win over them
STUDY_PRESETS: dict[str, dict[str, Any]] = {
    # issue 18: the paradigms side by side over 1,000+ sequential edits. Additive (ROME, MEMIT), constrained
    # (AlphaEdit, PRUNE), multiplicative (MOSE), lifelong-normalised (UltraEdit with and without LN), memory (GRACE).
    # Checkpoints on the geometric schedule of RunConfig.checkpoint_schedule (issue 16); WILD retention on a fixed
    # sample of 200 edits at intermediate checkpoints, every edit at the last.
    "lifelong": {
        "n": 1000,
        "methods": ("rome", "memit", "alphaedit", "prune", "mose", "ultraedit", "ultraedit:no_ln", "grace"),
        "protocols": (ev.TF, ev.MARGIN, ev.WILD),
        # a snapshot every 10 steps: a run killed on the way (1,000 edits of MOSE are hours) loses at most 10
        # immediate evaluation (each edit right after it) teacher-forced only: wild_gen after every edit is ~85% of
        # a 1,000-edit run's CPU time; WILD retention at the checkpoints is what the table reports
        "run": {"checkpoint_schedule": "geometric", "wild_retention_max": 200, "update_angles": False,
                "snapshot_every": 10, "immediate_protocols": (ev.TF, ev.MARGIN)},
    },
}


def study_preset(name: str) -> dict[str, Any]:
    """The settings of a named study preset; raises ConfigError for an unknown name, or when it needs a run field
    this version of :class:`RunConfig` does not have."""
    if name not in STUDY_PRESETS:
        raise ConfigError(f"unknown study preset {name!r}; valid: {', '.join(sorted(STUDY_PRESETS))}")
    preset = STUDY_PRESETS[name]
    known = {f.name for f in RunConfig.__dataclass_fields__.values()}
    missing = sorted(set(preset.get("run", {})) - known)
    if missing:
        raise ConfigError(f"study preset {name!r} needs the run field(s) {', '.join(missing)}, which this RunConfig "
                          "does not have (checkpoint_schedule: issue 16, the geometric schedule)")
    return {**preset, "run": dict(preset.get("run", {}))}


def split_method(entry: str) -> tuple[str, str]:
    """``"ultraedit:no_ln"`` -> ``("ultraedit", "no_ln")`` (a preset variant); ``"rome"`` -> ``("rome", "")``."""
    name, _, variant = str(entry).partition(":")
    return name.strip(), variant.strip()


def study_label(method: str, n: int, data: str, seed: int, overrides: Mapping[str, Any] | None = None,
                run: Mapping[str, Any] | None = None) -> str:
    """The label that identifies one method's run (``method`` may be ``name:variant``) of a collapse study in the
    store; ``run`` are the run fields the study changed (protocols, schedule)."""
    label = f"collapse-study {method} n={n} seed={seed} data={data}"
    if overrides:
        label += " set=" + json.dumps(dict(overrides), sort_keys=True, default=str)
    if run:
        label += " run=" + json.dumps(dict(run), sort_keys=True, default=str)
    return label


def unedited_matrix_stats(lm, params: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{param: {"fro", "cond"}}`` of the model's CURRENT (unedited) weights, canonical orientation."""
    from analysis.weights import matrix_stats
    named = dict(lm.model.named_parameters())
    out = {}
    for name in params:
        W = lm.spec.to_canonical(named[name].detach()).float()
        s = matrix_stats(W)
        out[name] = {"fro": float(s["fro"]), "cond": float(s["cond"])}
    return out


def collapse_table(store: RunStore, run_ids: Sequence[str], reference: Mapping[str, Mapping[str, float]]
                   ) -> pd.DataFrame:
    """One row per run (columns :data:`TABLE_COLUMNS`) at its last checkpoint.

    Args:
        reference: ``{param: {"fro", "cond"}}`` of the unedited matrices (:func:`unedited_matrix_stats`).
    """
    rows = []
    wild = False
    for run_id in run_ids:
        run = store.get_run(run_id)
        summary = run_summary(store, run_id)
        df = store.metrics_frame([run_id], kinds=["weights", "locality", "retention"])
        variant = (run.get("config") or {}).get("preset_variant") if isinstance(run.get("config"), dict) else ""
        row: dict[str, Any] = {"method": run["method"] + (f":{variant}" if variant else ""), "status": run["status"],
                               "n_edits": summary["n_edits"],
                               **{k: summary["final"][k] for k in ("reliability", "generality", "locality")},
                               "seconds_per_edit": summary["seconds_per_edit"], "run_id": run_id}
        agg = df[df["case_id"].isna()]
        probes = agg[(agg["kind"] == "locality") & (agg["protocol"].isna() | (agg["protocol"] == ev.TF))]
        row["probe_locality"] = (float(probes.loc[probes["n_edits"].idxmax(), "value"]) if len(probes) else None)
        ret = agg[(agg["kind"] == "retention") & (agg["protocol"] == ev.WILD)]
        if len(ret):
            wild = True
            last = ret[ret["n_edits"] == ret["n_edits"].max()]
            for metric in ("reliability", "generality", "locality"):
                v = last.loc[last["metric"] == metric, "value"]
                row[f"{metric}_wild"] = float(v.iloc[0]) if len(v) else None
            wp = agg[(agg["kind"] == "locality") & (agg["protocol"] == ev.WILD)]
            row["probe_locality_wild"] = float(wp.loc[wp["n_edits"].idxmax(), "value"]) if len(wp) else None
        w = df[df["kind"] == "weights"]
        fro_rel, cond_rel, layers = [], [], []
        drift: dict[str, list[float]] = {col: [] for col in DRIFT_COLUMNS}
        if len(w):
            last = w[w["n_edits"] == w["n_edits"].max()]
            for param, g in last.groupby("param"):
                ref = reference.get(param)
                vals = dict(zip(g["metric"], g["value"]))
                if ref is None or "fro" not in vals or "cond" not in vals:
                    continue
                fro_rel.append(vals["fro"] / ref["fro"] if ref["fro"] > 0 else math.nan)
                cond_rel.append(vals["cond"] / ref["cond"] if math.isfinite(ref["cond"]) and ref["cond"] > 0
                                else math.nan)
                layers.append(int(g["layer"].iloc[0]) if g["layer"].notna().any() else -1)
                for col, metric in DRIFT_COLUMNS.items():
                    if metric in vals and math.isfinite(vals[metric]):
                        drift[col].append(float(vals[metric]))
        row["fro_rel"] = float(sum(fro_rel) / len(fro_rel)) if fro_rel else None
        row["cond_rel"] = float(sum(cond_rel) / len(cond_rel)) if cond_rel else None
        row["fro_rel_max"] = max(fro_rel, key=lambda v: abs(v - 1)) if fro_rel else None
        row["cond_rel_max"] = max(cond_rel, key=lambda v: abs(v - 1)) if cond_rel else None
        for col, vals_ in drift.items():
            row[col] = float(sum(vals_) / len(vals_)) if vals_ else None
            row[f"{col}_max"] = max(vals_) if vals_ else None
        row["layers"] = ",".join(str(x) for x in sorted(layers))
        rows.append(row)
    columns = list(TABLE_COLUMNS)
    if wild:
        columns[7:7] = WILD_COLUMNS  # after probe_locality
    return pd.DataFrame(rows, columns=columns)


def format_table(df: pd.DataFrame) -> str:
    """The study table as text (retention metrics to 3 decimals, ratios to 4)."""
    if df.empty:
        return "(no runs)"
    view = df.copy()
    for col in ("reliability", "generality", "locality", "probe_locality", *WILD_COLUMNS):
        if col not in view.columns:
            continue
        view[col] = view[col].map(lambda v: "n/a" if v is None or pd.isna(v) else f"{v:.3f}")
    for col in ("fro_rel", "cond_rel", "fro_rel_max", "cond_rel_max", "drift", "drift_max", "preserve",
                "preserve_max"):
        view[col] = view[col].map(lambda v: "n/a" if v is None or pd.isna(v) else f"{v:.4f}")
    view["seconds_per_edit"] = view["seconds_per_edit"].map(lambda v: "n/a" if v is None or pd.isna(v)
                                                            else f"{v:.1f}")
    view = view.rename(columns={"seconds_per_edit": "s/edit", "probe_locality": "probe_loc",
                                "probe_locality_wild": "probe_loc_wild"})
    return view.to_string(index=False)


def _resume_unfinished(store: RunStore, method: str, label: str, lm, progress) -> str | None:
    """Resume the newest unfinished run (interrupted, failed, cancelled) of ``method`` with ``label`` that has a
    resume snapshot; its id, or None when there is none (the study then starts a new run)."""
    from .engine import RESUMABLE, resume_run
    from .snapshots import list_snapshots
    store.recover_interrupted()
    runs = store.list_runs(method=method, status=list(RESUMABLE))
    runs = runs[runs["label"] == label] if len(runs) else runs
    for run_id in (runs.sort_values("created")["run_id"].iloc[::-1] if len(runs) else ()):
        if list_snapshots(store.runs_dir, str(run_id)):
            log.info("%s: resuming unfinished run %s", method, run_id)
            return resume_run(store, str(run_id), lm=lm, progress=progress)
    return None


def collapse_study(methods: Sequence[str] = DEFAULT_METHODS, n: int = 200, data: str = DEFAULT_DATA,
                   runs_dir: str = "runs", *, eval_every: int | None = None, model: str = "default",
                   seed: int = 0, device: str | None = None, general: str = "none",
                   locality_probes: str = "builtin",
                   method_overrides: Mapping[str, Mapping[str, Any]] | None = None,
                   protocols: Sequence[str] | None = None, run_overrides: Mapping[str, Any] | None = None,
                   reuse: bool = True,
                   report_only: bool = False, lm=None, progress: Callable[[str, int, int, dict], None] | None = None
                   ) -> pd.DataFrame:
    """Run ``n`` sequential single edits per method into one run store and return the summary table.

    Args:
        methods: registry names, run in this order; ``name:variant`` runs a preset variant (its own row).
        n: edits per method (the first ``n`` requests of ``data``), one edit per step.
        data: request source of the engine ('counterfact:PATH', 'zsre:PATH', 'builtin', PATH).
        runs_dir: the run store's directory.
        eval_every: checkpoint (retention of all edits so far, locality probes, weights) every this many edits;
            None = every ``max(1, n // 10)``; the last edit is always a checkpoint.
        general: general-ability probes of the engine ('none' by default: the table does not use them).
        locality_probes: the engine's fixed locality probe set ('builtin' or 'none').
        method_overrides: ``{method: {field: value}}`` on top of each method's preset (keyed by the entry, e.g.
            ``"ultraedit:no_ln"``, or by the bare name for every variant of it).
        protocols: the runs' evaluation protocols (default: RunConfig's); with ``wild_gen`` the table gets the WILD
            columns :data:`WILD_COLUMNS`.
        run_overrides: other run fields ``{field: value}`` (e.g. ``checkpoint_schedule``), part of the label.
        reuse: skip a method whose finished run with this study's label is already in the store.
        report_only: run nothing; summarise the latest run of each method with this study's label, whatever its
            status (e.g. a study still running in another process: its last checkpoint).
        lm: an already loaded model (restored after every run); loaded once here otherwise.
        progress: ``callback(method, done, total, info)`` (the engine's progress, tagged with the method).

    Returns:
        the table of :func:`collapse_table` (one row per method).
    """
    entries = [split_method(m) for m in methods]
    methods = [get_editor_class(m).name + (f":{v}" if v else "") for m, v in entries]  # unknown names fail here
    run_fields = dict(run_overrides or {})
    if protocols is not None:
        run_fields["protocols"] = tuple(protocols)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    every = max(1, n // 10) if eval_every is None else int(eval_every)
    store = RunStore(runs_dir)
    if lm is None:
        from editors.models import load_model
        lm = load_model(model, device=device)
    run_ids: list[str] = []
    for method in methods:
        name, variant = split_method(method)
        mo = method_overrides or {}
        overrides = {**dict(mo.get(name, {})), **(dict(mo.get(method, {})) if variant else {})}
        label = study_label(method, n, data, seed, overrides, {k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in run_fields.items()})
        if report_only:
            found = store.list_runs(method=name)
            found = found[found["label"] == label] if len(found) else found
            if len(found):
                run_ids.append(str(found.sort_values("created")["run_id"].iloc[-1]))
            continue
        if reuse:
            done = store.list_runs(method=name, status="finished")
            done = done[done["label"] == label] if len(done) else done
            if len(done):
                run_id = str(done.sort_values("created")["run_id"].iloc[-1])
                log.info("%s: reusing finished run %s", method, run_id)
                run_ids.append(run_id)
                continue
        t0 = time.time()
        cb = (lambda done, total, info, _m=method: progress(_m, done, total, info)) if progress else None
        if reuse:  # an unfinished run of this study (killed, interrupted): continue it from its newest snapshot
            resumed = _resume_unfinished(store, name, label, lm, cb)
            if resumed is not None:
                log.info("%s: run %s resumed and done in %.0fs", method, resumed, time.time() - t0)
                run_ids.append(resumed)
                continue
        config = RunConfig(model=model, method=name, method_overrides=overrides, data=data, n_edits=n,
                           batch_size=1, eval_every=every, seed=seed, device=device, runs_dir=runs_dir,
                           general=general, locality_probes=locality_probes, label=label, preset_variant=variant)
        if run_fields:
            config = config.replace(**run_fields)
        try:
            run_id = run_sequential(config, store, lm=lm, progress=cb)
        except Exception as exc:  # one failing method must not lose the others; the store has the error
            log.error("%s failed: %s: %s", method, type(exc).__name__, exc)
            failed = store.list_runs(method=name)
            failed = failed[failed["label"] == label] if len(failed) else failed
            if not len(failed):
                raise
            run_id = str(failed.sort_values("created")["run_id"].iloc[-1])
        log.info("%s: run %s done in %.0fs", method, run_id, time.time() - t0)
        run_ids.append(run_id)
    params = sorted(set(store.metrics_frame(run_ids, kinds=["weights"])["param"].dropna())) if run_ids else []
    reference = unedited_matrix_stats(lm, params)
    return collapse_table(store, run_ids, reference)


__all__ = ["collapse_study", "collapse_table", "format_table", "unedited_matrix_stats", "study_label",
           "study_preset", "split_method", "STUDY_PRESETS", "DEFAULT_METHODS", "DEFAULT_DATA", "TABLE_COLUMNS",
           "WILD_COLUMNS", "DRIFT_COLUMNS"]
