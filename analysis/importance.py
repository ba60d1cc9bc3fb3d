"""Where an update lands and which weights matter: per-neuron magnitudes of the accumulated update, gradient×weight
importance on a probe set, and GeoEdit's Fig. 4 (task-vector magnitude next to the importance-guided weights α, β).

Neurons: in the canonical ``[d_out, d_in]`` orientation an OUTPUT neuron is a row (GeoEdit's definition, a row of a
weight matrix) and an INPUT neuron is a column (for an MLP output projection, the column of one hidden MLP unit).

Importance (GeoEdit Eq. 12-13, after Molchanov et al. 2019): s(w) = |w · ∂L/∂w| with L the teacher-forced
cross-entropy of the answers, averaged over a neuron's parameters. The EMA smoothing GeoEdit applies during its
fine-tuning belongs to the editor; this is the single-shot score of the current weights.
"""
from __future__ import annotations

from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from analysis.evaluation import encode_pair
from editors.models import LoadedModel

AXES = ("out", "in")


def _t64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _axes(axis: str) -> tuple[str, ...]:
    if axis == "both":
        return AXES
    if axis not in AXES:
        raise ValueError(f"unknown axis {axis!r}; valid: out, in, both")
    return (axis,)


def neuron_norms(delta, axis: str = "out") -> np.ndarray:
    """L2 norm of every row (``axis="out"``) or column (``"in"``) of a canonical ``[d_out, d_in]`` matrix."""
    D = _t64(delta)
    return D.norm(dim=1 if axis == "out" else 0).cpu().numpy()


def neuron_magnitude_frame(deltas: Mapping[Hashable, torch.Tensor], *, axis: str = "out",
                           to_canonical: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           normalise: str | None = None) -> pd.DataFrame:
    """Layer × neuron heatmap data of an update's per-neuron magnitude.

    Args:
        deltas: layer (or any label) -> ΔW (canonical ``[d_out, d_in]``; pass ``to_canonical=lm.spec.to_canonical``
            for parameter-layout GPT-2 deltas), typically the ACCUMULATED update W − W0.
        axis: "out" (row norms), "in" (column norms) or "both".
        normalise: None (raw L2 norms), "layer" (divide by each layer's maximum) or "global" (by the overall max).

    Returns:
        columns ``layer, axis, neuron, value``.
    """
    if normalise not in (None, "layer", "global"):
        raise ValueError(f"unknown normalise {normalise!r}; valid: None, 'layer', 'global'")
    conv = to_canonical or (lambda t: t)
    frames = []
    for layer, D in deltas.items():
        D = conv(_t64(D))
        for ax in _axes(axis):
            v = neuron_norms(D, ax)
            if normalise == "layer" and v.max() > 0:
                v = v / v.max()
            frames.append(pd.DataFrame({"layer": [layer] * v.size, "axis": ax, "neuron": np.arange(v.size),
                                        "value": v}))
    if not frames:
        return pd.DataFrame(columns=["layer", "axis", "neuron", "value"])
    df = pd.concat(frames, ignore_index=True)
    if normalise == "global":
        for ax, idx in df.groupby("axis").groups.items():
            top = df.loc[idx, "value"].max()
            if top > 0:
                df.loc[idx, "value"] = df.loc[idx, "value"] / top
    return df


def grad_x_weight_importance(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str],
                             params: Sequence[str], *, axis: str = "out", batch_size: int = 16) -> pd.DataFrame:
    """Gradient×weight importance |w · ∂L/∂w| of ``params`` on a probe set, averaged per neuron.

    L is the mean over examples of the summed teacher-forced cross-entropy of ``" " + answer`` after ``prompt``
    (tokenised as :func:`analysis.evaluation.encode_pair`). Only the named parameters get gradients; every
    parameter's ``requires_grad`` flag and the ``.grad`` of the named ones are restored afterwards, the training flag
    too, and the weights are not changed.

    Returns:
        columns ``param, layer, axis, neuron, value`` (canonical orientation: "out" = rows, "in" = columns).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("no probe prompts")
    model, tok, spec = lm.model, lm.tokenizer, lm.spec
    named = dict(model.named_parameters())
    missing = [p for p in params if p not in named]
    if missing:
        raise KeyError(f"unknown parameter {missing[0]!r}")
    flags = {n: p.requires_grad for n, p in named.items()}
    old_grads = {n: named[n].grad for n in params}
    was_training = model.training
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    pairs = [encode_pair(tok, p, a) for p, a in zip(prompts, answers)]
    total = len(pairs)
    grads = {n: torch.zeros_like(named[n], dtype=torch.float32) for n in params}
    try:
        for p in named.values():
            p.requires_grad_(False)
        for n in params:
            named[n].requires_grad_(True)
            named[n].grad = None
        model.eval()
        base = model.base_model
        unembed = model.get_output_embeddings()
        with torch.enable_grad():
            for start in range(0, total, batch_size):
                chunk = pairs[start:start + batch_size]
                seqs = [pp + tt[:-1] for pp, tt in chunk]
                width = max(len(s) for s in seqs)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                rows, cols, tgts = [], [], []
                for r, ((pp, tt), s) in enumerate(zip(chunk, seqs)):
                    ids[r, :len(s)] = torch.tensor(s)
                    mask[r, :len(s)] = 1
                    for j, t in enumerate(tt):
                        rows.append(r)
                        cols.append(len(pp) - 1 + j)
                        tgts.append(t)
                h = base(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).last_hidden_state
                logits = unembed(h[torch.tensor(rows), torch.tensor(cols)]).float()
                loss = torch.nn.functional.cross_entropy(logits, torch.tensor(tgts, device=logits.device),
                                                         reduction="sum") / total
                loss.backward()
                for n in params:
                    grads[n] += named[n].grad.float()
                    named[n].grad = None
    finally:
        for n, p in named.items():
            p.requires_grad_(flags[n])
        for n in params:
            named[n].grad = old_grads[n]
        model.train(was_training)
    frames = []
    for n in params:
        s = (named[n].detach().float() * grads[n]).abs()
        s = spec.to_canonical(s)
        for ax in _axes(axis):
            v = s.mean(dim=1 if ax == "out" else 0).double().cpu().numpy()
            frames.append(pd.DataFrame({"param": n, "layer": spec.layer_of(n), "axis": ax,
                                        "neuron": np.arange(v.size), "value": v}))
    return pd.concat(frames, ignore_index=True)


def _minmax(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    lo, hi = np.nanmin(v), np.nanmax(v)
    return np.zeros_like(v) if hi <= lo else (v - lo) / (hi - lo)


def fusion_weights_frame(tau_old, tau_new, alpha, beta, *, normalise: bool = True) -> pd.DataFrame:
    """GeoEdit Fig. 4 data: per neuron the magnitude of τ_old / τ_new next to the importance weights α / β.

    ``tau_old`` / ``tau_new``: per-neuron magnitudes (1-D) or the task vectors themselves (``[n_neurons, ...]``,
    magnitude = row L2 norm); ``alpha`` / ``beta``: per-neuron weights (Eq. 11). With ``normalise`` every series is
    min-max scaled to [0, 1] as in the figure.

    Returns:
        columns ``neuron, task ("old" | "new"), quantity ("magnitude" | "importance"), label, value``.
    """
    def mags(t):
        a = _t64(t)
        return (a.reshape(a.shape[0], -1).norm(dim=1) if a.ndim > 1 else a.abs()).cpu().numpy()

    series = [("old", "magnitude", "|τ_old|", mags(tau_old)), ("new", "magnitude", "|τ_new|", mags(tau_new)),
              ("old", "importance", "α", _t64(alpha).reshape(-1).cpu().numpy()),
              ("new", "importance", "β", _t64(beta).reshape(-1).cpu().numpy())]
    n = {s[3].size for s in series}
    if len(n) != 1:
        raise ValueError(f"per-neuron series differ in length: {sorted(n)}")
    frames = [pd.DataFrame({"neuron": np.arange(v.size), "task": task, "quantity": q, "label": label,
                            "value": _minmax(v) if normalise else v}) for task, q, label, v in series]
    return pd.concat(frames, ignore_index=True)


__all__ = ["neuron_norms", "neuron_magnitude_frame", "grad_x_weight_importance", "fusion_weights_frame"]
