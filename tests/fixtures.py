"""Synthetic runs written straight into a run store (no model): for the app's tests, the page benchmark and demos.

The rows have the shapes the engine writes (:mod:`app.engine`): pre / edit / retention / locality / general /
weights / update_angle / timing / collapse metrics, edit rows, and ``singular_values`` / ``hidden_states`` artifacts.
The numbers follow a plausible collapse: retention falls off a cliff after ``collapse_at`` edits while the condition
number of the edited matrices grows.
"""
from __future__ import annotations

import math

import numpy as np

from app.store import RunStore


def synthetic_run(store: RunStore, *, method: str = "rome", n_edits: int = 100, eval_every: int = 10,
                  layers: tuple[int, ...] = (4, 5), per_case: bool = True, hidden: bool = True,
                  d_out: int = 64, d_in: int = 128, n_probes: int = 32, collapse_at: int | None = None,
                  geoedit: bool = False, seed: int = 0, label: str = "", model: str = "tiny-llama",
                  status: str = "finished", method_config: dict | None = None) -> str:
    """Write one run of ``n_edits`` single-edit steps with checkpoints every ``eval_every`` edits; returns its id.

    ``geoedit``: every step also stores GeoEdit's per-neuron artifacts and info metrics under the keys
    :mod:`editors.geoedit` uses (angles raw / latent, classes, |τ|, α, β; class counts, norms, Spearman).
    ``method_config`` is merged into the stored method config (``{"layers": [...]}``)."""
    rng = np.random.default_rng(seed)
    collapse_at = collapse_at or max(2, int(n_edits * 0.6))
    config = {"model": model, "method": method, "data": "builtin", "n_edits": n_edits, "batch_size": 1,
              "eval_every": eval_every, "hidden_states": hidden, "runs_dir": store.runs_dir}
    run_id = store.create_run(status="running", method=method, model=model, data_source="builtin", config=config,
                              method_config={"layers": list(layers), **(method_config or {})},
                              n_edits_planned=n_edits, label=label or None,
                              device="cpu")

    def health(n: int) -> float:  # 1 before the collapse, falling to ~0.05 after it
        return 0.05 + 0.95 / (1 + math.exp((n - collapse_at) / max(1.0, n_edits / 40)))

    params = {layer: f"model.layers.{layer}.mlp.down_proj.weight" for layer in layers}
    sigma0 = {layer: np.sort(np.linalg.svd(rng.normal(0, 0.05, (d_out, d_in)), compute_uv=False))[::-1]
              for layer in layers}
    probes = np.array([f"probe prompt {i}" for i in range(n_probes)])
    base_states = {f"layer{layer}": rng.normal(0, 1, (n_probes, d_out)).astype(np.float32) for layer in layers}
    metric_rows, edit_rows = [], []
    for m in ("reliability", "generality", "locality"):
        for p in ("tf_token_acc", "prob_margin"):
            metric_rows.append({"n_edits": 0, "step": 0, "kind": "pre", "metric": m, "protocol": p,
                                "value": float(rng.uniform(0.0, 0.2) if m != "locality" else 1.0)})
    for task in ("sentiment", "nli"):
        metric_rows.append({"n_edits": 0, "step": 0, "kind": "general", "metric": f"{task}/accuracy",
                            "protocol": task, "value": 0.8})
    store.write_step(run_id, metric_rows=metric_rows)
    artifacts = []
    if hidden:
        artifacts.append(("hidden_states", {**base_states, "prompts": probes}, 0, 0))
    prev_norm = None
    pending_edits: list[dict] = []
    pending_metrics: list[dict] = []
    for n in range(1, n_edits + 1):
        h = health(n)
        metric_rows = []
        edit_rows = [{"idx": n - 1, "step": n, "n_edits": n, "case_id": f"case-{n - 1}",
                      "request": {"case_id": f"case-{n - 1}", "prompt": f"Subject {n - 1} is in", "subject":
                                  f"Subject {n - 1}", "target_new": f"Place {n - 1}"},
                      "seconds": 0.5, "peak_mem_mb": 900.0, "info": {"loss": float(rng.uniform(0, 1))}}]
        for m in ("reliability", "generality", "locality"):
            for p in ("tf_token_acc", "prob_margin"):
                v = float(np.clip(h * (0.98 if m == "reliability" else 0.7) + rng.normal(0, 0.02), 0, 1))
                metric_rows.append({"n_edits": n, "step": n, "kind": "edit", "metric": m, "protocol": p, "value": v})
                if per_case:
                    metric_rows.append({"n_edits": n, "step": n, "kind": "edit", "metric": m, "protocol": p,
                                        "value": v, "case_id": f"case-{n - 1}"})
        for layer in layers:
            norm = float(1.0 + 0.01 * n + rng.normal(0, 0.01))
            metric_rows.append({"n_edits": n, "step": n, "kind": "update_angle", "layer": layer,
                                "param": params[layer], "metric": "update_norm", "value": norm})
            if prev_norm is not None:
                cos = float(np.clip(rng.normal(0.0 if n < collapse_at else 0.4, 0.15), -1, 1))
                metric_rows.append({"n_edits": n, "step": n, "kind": "update_angle", "layer": layer,
                                    "param": params[layer], "metric": "angle_flat",
                                    "value": float(np.degrees(np.arccos(cos)))})
                metric_rows.append({"n_edits": n, "step": n, "kind": "update_angle", "layer": layer,
                                    "param": params[layer], "metric": "angle_accumulated",
                                    "value": float(np.degrees(np.arccos(np.clip(rng.normal(0.2, 0.1), -1, 1))))})
            prev_norm = norm
        metric_rows.append({"n_edits": n, "step": n, "kind": "info", "metric": "loss", "value": 0.1})
        artifacts_step = []
        if geoedit:
            raw = rng.normal(80, 6, d_in)
            latent = raw + rng.normal(0, 1, d_in)
            cls = np.where(latent < 85, 0, np.where(latent > 95, 2, 1))
            tau_old, tau_new = rng.lognormal(0, 0.5, d_in), rng.lognormal(0, 0.5, d_in)
            alpha, beta = rng.uniform(0, 1, d_in), rng.uniform(0, 1, d_in)
            artifacts_step.append(("editor", {"raw_angle": raw, "latent_angle": latent, "neuron_class": cls,
                                              "tau_old_norm": tau_old, "tau_new_norm": tau_new, "alpha": alpha,
                                              "beta": beta}, n, n))
            info = {f"class_counts.{c}": float((cls == i).sum()) for i, c in enumerate(("aligned", "orthogonal",
                                                                                         "conflicting"))}
            info.update({f"class_shares.{c[13:]}": v / d_in for c, v in info.items()})
            info.update({"tau_old_norm": float(np.linalg.norm(tau_old)), "tau_new_norm": float(np.linalg.norm(tau_new)),
                         "edit_to_new_norm": 0.96, "alpha_median": float(np.median(alpha)),
                         "beta_median": float(np.median(beta)), "angle_spearman": 0.99})
            metric_rows += [{"n_edits": n, "step": n, "kind": "info", "metric": k, "value": v} for k, v in info.items()]
        if n % eval_every == 0 or n == n_edits:
            for m in ("reliability", "generality", "locality"):
                for p in ("tf_token_acc", "prob_margin"):
                    vals = np.clip(h * (0.95 if m != "generality" else 0.6) + rng.normal(0, 0.05, n), 0, 1)
                    metric_rows.append({"n_edits": n, "step": n, "kind": "retention", "metric": m, "protocol": p,
                                        "value": float(vals.mean())})
                    if per_case:
                        metric_rows.extend({"n_edits": n, "step": n, "kind": "retention", "metric": m,
                                            "protocol": p, "value": float(v), "case_id": f"case-{i}"}
                                           for i, v in enumerate(vals))
            metric_rows.append({"n_edits": n, "step": n, "kind": "locality", "metric": "locality",
                                "protocol": "tf_token_acc", "value": float(0.3 + 0.7 * h)})
            for task in ("sentiment", "nli"):
                metric_rows.append({"n_edits": n, "step": n, "kind": "general", "metric": f"{task}/accuracy",
                                    "protocol": task, "value": float(0.5 + 0.3 * h)})
            svals = {}
            for layer in layers:
                growth = 1 + 50 * (1 - h)
                stats = {"fro": 3.0 + 0.01 * n * growth, "spectral": 1.0 * growth, "cond": 20.0 * growth ** 2,
                         "effective_rank": 60.0 / growth, "delta_fro": 0.02 * n * growth,
                         "delta_cond": 5.0 * growth, "delta_rank": float(min(n, d_out)),
                         "rel_change": 0.01 * n * growth / 3.0}
                for metric, value in stats.items():
                    metric_rows.append({"n_edits": n, "step": n, "kind": "weights", "layer": layer,
                                        "param": params[layer], "metric": metric, "value": float(value)})
                s = sigma0[layer] * np.linspace(growth, 1, sigma0[layer].size)
                svals[f"{params[layer]}|W"] = s
                svals[f"{params[layer]}|delta"] = np.sort(rng.exponential(0.02 * growth, d_out))[::-1]
            artifacts_step.append(("singular_values", svals, n, n))
            if hidden:
                states = {k: (v + rng.normal(0, 0.05 + 2 * (1 - h), v.shape)).astype(np.float32)
                          for k, v in base_states.items()}
                artifacts_step.append(("hidden_states", {**states, "prompts": probes}, n, n))
            metric_rows += [{"n_edits": n, "step": n, "kind": "timing", "metric": "seconds_per_edit", "value": 0.5},
                            {"n_edits": n, "step": n, "kind": "timing", "metric": "peak_mem_mb", "value": 900.0}]
        pending_edits += edit_rows
        pending_metrics += metric_rows
        artifacts += artifacts_step
        if n % eval_every == 0 or n == n_edits:  # one transaction per checkpoint interval (fsyncs are slow)
            store.write_step(run_id, edit_rows=pending_edits, metric_rows=pending_metrics, artifacts=artifacts,
                             n_edits_done=n)
            pending_edits, pending_metrics, artifacts = [], [], []
    if collapse_at <= n_edits:
        # as the engine stores analysis.collapse.detect_collapse's frame: events are value 1 at their n_edits
        depart = max(1, collapse_at - 2 * eval_every)
        store.add_metric_rows(run_id, [
            {"n_edits": collapse_at, "step": n_edits, "kind": "collapse",
             "metric": "collapse:retention/reliability", "value": 1.0},
            {"n_edits": depart, "step": n_edits, "kind": "collapse", "layer": layers[0], "param": params[layers[0]],
             "metric": "departure:weights/cond", "value": 1.0},
            {"n_edits": n_edits, "step": n_edits, "kind": "collapse", "metric": "collapse:locality", "value": 0.0}])
    store.update_status(run_id, status, n_edits_done=n_edits, seconds_total=0.5 * n_edits)
    return run_id


__all__ = ["synthetic_run"]
