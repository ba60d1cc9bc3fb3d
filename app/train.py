"""Hypernetwork training: :func:`train_hypernet` (the command ``python -m app train --method agrade|malmen --data
SOURCE [--steps N]`` of :mod:`app.cli`).

MALMEN / AGRADE (editors/malmen.py, editors/agrade.py) edit with a trained hypernetwork. This trains one on edit
records (CounterFact train or zsRE), shows a tqdm bar, evaluates held-out batch edits every ``eval_every`` steps
(ES / GS / LS with the teacher-forced token-accuracy protocol, and AGRADE's Editing Score) and checkpoints to
``editors.cache.cache_root()/hypernets/<model_hash>/<method>-<config hash>/`` (``hypernet.safetensors``,
``optimizer.pt``, ``config.json``). Running the same command again resumes from the last checkpoint; editing with
the same model and config later finds the checkpoint automatically.

Data order is a function of the step only (step s uses records ``[s·n_edits, (s+1)·n_edits)`` modulo the training
records), so a resumed run sees the same batches as an uninterrupted one. The last ``n_val`` loaded records are held
out for validation.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Sequence

log = logging.getLogger(__name__)

#: the registry's family "hypernetwork" (editors.registry.methods_in_family), spelled out so that building the CLI
#: parser imports no editor; tests/unit/test_registry.py checks that the two agree
HYPERNET_METHODS = ("malmen", "agrade")


def validate_edits(lm, editor, requests: Sequence) -> dict:
    """Batch-edit ``requests``, score ES / GS / LS (tf_token_acc), undo. Returns a dict with the Editing Score."""
    from analysis.evaluation import editing_score, evaluate_requests, locality_pairs, locality_reference, summarize
    from editors.base import apply_result

    ref = locality_reference(lm, locality_pairs(requests))
    result = editor.edit(list(requests))
    undo = apply_result(lm, result)
    try:
        summary = summarize(evaluate_requests(lm, requests, ref))
    finally:
        undo(lm.model)
    es = summary.get(("reliability", "tf_token_acc"), float("nan"))
    gs = summary.get(("generality", "tf_token_acc"), float("nan"))
    ls = summary.get(("locality", "tf_token_acc"), float("nan"))
    score = editing_score(es, gs, ls) if all(x == x for x in (es, gs, ls)) else float("nan")
    return {"ES": es, "GS": gs, "LS": ls, "score": score}


def batch_scores(lm, editor, records: Sequence, size: int) -> dict:
    """Batch editing (the papers' setting): :func:`validate_edits` on each ``size`` records in turn (the model is
    back to the unedited one for the next batch). ES / GS / LS are means over batches weighted by batch size; the
    Editing Score is that of the means."""
    from analysis.evaluation import editing_score

    totals, n = {"ES": 0.0, "GS": 0.0, "LS": 0.0}, 0
    for i in range(0, len(records), size):
        batch = records[i:i + size]
        row = validate_edits(lm, editor, batch)
        for k in totals:
            totals[k] += row[k] * len(batch)
        n += len(batch)
    out = {k: v / n for k, v in totals.items()}
    out["score"] = editing_score(out["ES"], out["GS"], out["LS"])
    return out


def train_hypernet(lm, method: str, overrides: dict | None, data: str, *, steps: int = 200, eval_every: int = 50,
                   n_val: int = 16, seed: int = 0, cache_dir: str | None = None, progress: bool = True,
                   on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train (or resume) the hypernetwork of ``method`` for ``lm`` up to ``steps`` meta steps in total.

    Returns ``{"path", "step", "history", "seconds", "resumed_from"}``. ``history`` holds per-step training losses
    and validation rows.
    """
    import torch

    from editors.data import load_requests
    from editors.hypernet import build_hypernet, checkpoint_dir, load_checkpoint, save_checkpoint
    from editors.presets import build_config
    from editors.registry import get_editor_class

    if method not in HYPERNET_METHODS:
        raise ValueError(f"train: method must be one of {', '.join(HYPERNET_METHODS)}, got {method!r}")
    if steps < 1 or eval_every < 1 or n_val < 0:
        raise ValueError("steps and eval_every must be >= 1, n_val >= 0")
    cls = get_editor_class(method)
    cfg, _ = build_config(method, lm.name, overrides)  # as a run of the method would make it: preset, overrides
    cfg.allow_untrained = True  # the trainer builds the net; allow_untrained is not part of the checkpoint key
    editor = cls(lm, cfg, seed=seed, cache_dir=cache_dir)
    records = load_requests(data, steps * cfg.n_edits + n_val, skip_invalid=True)
    if len(records) < cfg.n_edits + n_val:
        raise ValueError(f"train: {data} gave {len(records)} records; need at least n_edits + n_val = "
                         f"{cfg.n_edits + n_val}")
    val = records[len(records) - n_val:] if n_val else []
    train = records[:len(records) - n_val]

    net, layers, modules, _ = build_hypernet(lm, method, cfg, seed=seed, cache_dir=cache_dir, require_trained=False)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.meta_lr)
    path = checkpoint_dir(lm, method, cfg, cache_dir)
    meta = load_checkpoint(path, net, optimizer)
    start = int(meta["step"]) if meta else 0
    history = list(meta.get("history", [])) if meta else []
    seconds = float(meta.get("seconds", 0.0)) if meta else 0.0
    if meta and meta.get("data") != data:
        log.warning("resuming %s trained on %s with data %s", path, meta.get("data"), data)

    def checkpoint(step: int) -> None:
        save_checkpoint(path, net, {"format": 1, "method": method, "config": cfg.to_dict(), "model": lm.name,
                                    "model_hash": lm.model_hash, "step": step, "data": data, "seconds": seconds,
                                    "history": history}, optimizer)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=min(start, steps), desc=f"train {method}", unit="step")
    torch.manual_seed(seed + start)
    completed = start
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            i0 = (step * cfg.n_edits) % len(train)
            batch = [train[(i0 + j) % len(train)] for j in range(cfg.n_edits)]
            net.train()
            loss, stats = editor.train_step(net, batch, layers, modules)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
            optimizer.step()
            completed = step + 1
            seconds += time.perf_counter() - t0
            row = {"step": step + 1, **stats}
            done = step + 1
            if val and (done % eval_every == 0 or done == steps):
                net.eval()
                checkpoint(done)  # the editor below loads the net from the checkpoint
                row.update({f"val_{k}": v for k, v in validate_edits(lm, _trained_editor(cls, lm, cfg, seed,
                                                                                          cache_dir), val).items()})
            history.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in ("loss", "val_ES", "val_score")})
            if on_step is not None:
                on_step(done, row)
            if done % eval_every == 0 or done == steps:
                checkpoint(done)
    except KeyboardInterrupt:
        checkpoint(completed)  # resumable: the next run with the same command continues from here
        log.warning("interrupted after step %d; checkpoint in %s", completed, path)
        raise
    finally:
        if bar is not None:
            bar.close()
    return {"path": path, "step": max(start, steps), "history": history, "seconds": seconds, "resumed_from": start}


def _trained_editor(cls, lm, cfg, seed, cache_dir):
    """An editor of ``cfg`` that loads the trained net from its checkpoint (``allow_untrained`` off)."""
    return cls(lm, dataclasses.replace(cfg, allow_untrained=False), seed=seed, cache_dir=cache_dir)
