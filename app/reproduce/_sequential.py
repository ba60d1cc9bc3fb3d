"""What the AdaEdit, MOSE and AGRADE reproductions share (not a paper module: the leading ``_`` keeps it out of
``papers()``): a plain sequential-editing loop with the papers' own metric definitions, evaluated at chosen edit
counts, and the small bookkeeping of the long table.

:func:`sequential_run` edits ``requests`` one batch after another with one method (the config from
:func:`editors.presets.build_config`, with a preset variant and overrides), applies every result exactly as the
engine does (:func:`editors.base.apply_result`, then ``after_apply``), and at each checkpoint records

* ``metrics``: the papers' CounterFact metrics over EVERY request edited so far (retention), under
  ``prob_margin`` -- efficacy / generalisation = share of prompts / paraphrases with log P(new) > log P(true),
  specificity = share of neighbourhood prompts with log P(true) > log P(new) (ROME's CounterFact suite, which
  AdaEdit's Table 2 uses) -- and under ``tf_token_acc`` (reliability, generality, and locality as agreement with the
  unedited model: MOSE's Eq. 25-27 and AGRADE's ES / GS / LS);
* ``weights``: per edited matrix, :func:`analysis.weights.matrix_stats` against the unedited matrix (Frobenius
  norm, condition number, max / min / mean / median, ‖ΔW‖/‖W0‖) and the preserved outputs' change.

The model is restored bit for bit afterwards (also on errors). Nothing is written to a run store: a reproduction is
a table, and the edits here are few.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from analysis import evaluation as ev
from analysis.weights import matrix_stats, preserved_output_change
from editors.base import apply_result
from editors.presets import build_config
from editors.registry import get_editor_class
from editors.requests import EditRequest

log = logging.getLogger(__name__)


def margin_metrics(lm, requests: Sequence[EditRequest], *, batch_size: int = 32) -> dict[str, float]:
    """ROME's CounterFact suite (prob_margin): ``efficacy``, ``generalization``, ``specificity`` (means over requests of
    per-request shares; 0-1)."""
    eff, gen, spec = [], [], []
    for r in requests:
        prompts = [r.prompt, *r.rephrase_prompts]
        new = ev.teacher_forced(lm, prompts, [r.target_new] * len(prompts), batch_size=batch_size)
        true = ev.teacher_forced(lm, prompts, [r.target_true] * len(prompts), batch_size=batch_size)
        wins = [float(a.logprob > b.logprob) for a, b in zip(new, true)]
        eff.append(wins[0])
        if len(wins) > 1:
            gen.append(sum(wins[1:]) / (len(wins) - 1))
        if r.locality_prompts:
            loc = list(r.locality_prompts)
            n_new = ev.teacher_forced(lm, loc, [r.target_new] * len(loc), batch_size=batch_size)
            n_true = ev.teacher_forced(lm, loc, list(r.locality_answers), batch_size=batch_size)
            spec.append(sum(float(b.logprob > a.logprob) for a, b in zip(n_new, n_true)) / len(loc))
    mean = lambda x: float(sum(x) / len(x)) if x else math.nan  # noqa: E731
    return {"efficacy": mean(eff), "generalization": mean(gen), "specificity": mean(spec)}


def tf_metrics(lm, requests: Sequence[EditRequest], reference) -> dict[str, float]:
    """``reliability``, ``generality``, ``locality`` (tf_token_acc; locality = agreement with the unedited model)."""
    rows = ev.evaluate_requests(lm, requests, reference, protocols=(ev.TF,))
    means = ev.summarize(rows)
    return {m: float(means.get((m, ev.TF), math.nan)) for m in ("reliability", "generality", "locality")}


def sequential_run(lm, method: str, requests: Sequence[EditRequest], *, checkpoints: Sequence[int],
                   batch_size: int = 1, variant: str = "", overrides: Mapping[str, Any] | None = None,
                   seed: int = 0, covariances: Mapping[int, torch.Tensor] | None = None,
                   margin: bool = True, tf: bool = True,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Edit ``requests`` in order (batches of ``batch_size``) and evaluate at every edit count in ``checkpoints``.

    Args:
        covariances: ``{layer: C}`` for the preserved-output change (default: none, the metric is left out).
    Returns:
        ``{"method", "variant", "config", "seconds_per_edit", "checkpoints": [{"n_edits", "metrics": {...},
        "weights": {param: {stat: value}}}], "infos": [result.info of every step]}``.
    """
    requests = list(requests)
    cfg, _ = build_config(method, lm.name, dict(overrides or {}), variant=variant)
    editor = get_editor_class(method)(lm, cfg, seed=seed)
    t0 = time.perf_counter()
    editor.prepare()
    prep = time.perf_counter() - t0
    pairs = [(p, a) for r in requests for p, a in zip(r.locality_prompts, r.locality_answers)]
    reference = ev.locality_reference(lm, pairs) if tf else {}
    params = dict(lm.model.named_parameters())
    W0: dict[str, torch.Tensor] = {}
    out: dict[str, Any] = {"method": method, "variant": variant, "config": cfg.to_dict(), "checkpoints": [],
                           "infos": [], "prepare_seconds": prep}
    wanted = sorted({int(c) for c in checkpoints if 0 < int(c) <= len(requests)} | {len(requests)})
    edit_seconds, done = 0.0, 0
    try:
        for start in range(0, len(requests), batch_size):
            batch = requests[start:start + batch_size]
            t1 = time.perf_counter()
            result = editor.edit(batch)
            for name in result.param_names:
                if name not in W0:
                    W0[name] = params[name].detach().clone()
            apply_result(lm, result, keep_undo=False)
            editor.after_apply(batch, result)
            edit_seconds += time.perf_counter() - t1
            done += len(batch)
            out["infos"].append(result.info)
            if progress:
                progress(f"{method}{'/' + variant if variant else ''}: {done}/{len(requests)} edits")
            if wanted and done >= wanted[0]:
                while wanted and done >= wanted[0]:
                    wanted.pop(0)
                metrics: dict[str, float] = {}
                if margin:
                    metrics.update(margin_metrics(lm, requests[:done]))
                if tf:
                    metrics.update(tf_metrics(lm, requests[:done], reference))
                weights = {}
                for name, w0 in W0.items():
                    W = lm.spec.to_canonical(params[name].detach()).float()
                    W0c = lm.spec.to_canonical(w0).float()
                    stats = {k: float(v) for k, v in matrix_stats(W, W0c).items()}
                    stats["fro0"] = float(W0c.double().norm())
                    stats["cond0"] = float(matrix_stats(W0c)["cond"])
                    layer = lm.spec.layer_of(name)
                    if covariances is not None and layer in covariances:
                        stats["preserve_change"] = preserved_output_change(W, W0c, covariances[layer])
                    weights[name] = stats
                out["checkpoints"].append({"n_edits": done, "metrics": metrics, "weights": weights})
    finally:
        with torch.no_grad():
            for name, w0 in W0.items():
                params[name].copy_(w0)
    out["seconds_per_edit"] = edit_seconds / max(1, done)
    return out


def row(table: str, row_: str, metric: str, paper: float, ours: float, note: str = "", **extra) -> dict:
    """One line of the long table (the interface's columns plus extras such as ``n``, ``variant``, ``unit``)."""
    return {"table": table, "row": row_, "metric": metric, "paper": paper, "ours": ours, "note": note, **extra}


def option(args, key: str, default, cast=str):
    """``args.options[key]`` cast, or ``default``; a bad value raises ReproduceError naming the key."""
    from . import ReproduceError
    raw = (getattr(args, "options", None) or {}).get(key)
    if raw is None:
        return default
    try:
        return cast(raw)
    except (TypeError, ValueError) as exc:
        raise ReproduceError(f"--option {key}={raw!r}: {exc}") from exc


def check_options(args, known: Sequence[str]) -> None:
    from . import ReproduceError
    bad = sorted(set(getattr(args, "options", None) or {}) - set(known))
    if bad:
        raise ReproduceError(f"unknown --option {bad[0]!r} for --paper {args.paper}; valid: {', '.join(known)}")


def method_sets(args) -> dict[str, dict[str, Any]]:
    """``--set METHOD.KEY=VALUE`` as ``{method: {key: value}}``."""
    from . import ReproduceError
    out: dict[str, dict[str, Any]] = {}
    for item in getattr(args, "sets", None) or ():
        key, sep, value = str(item).partition("=")
        method, dot, field_ = key.partition(".")
        if not sep or not dot or not field_:
            raise ReproduceError(f"--set must be METHOD.KEY=VALUE, got {item!r}")
        out.setdefault(method.strip(), {})[field_.strip()] = value.strip()
    return out


__all__ = ["sequential_run", "margin_metrics", "tf_metrics", "row", "option", "check_options", "method_sets"]
