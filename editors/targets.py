"""Target values z / v* (METHODS.md 0.4): the shared optimisation of the ROME / MEMIT family.

:func:`compute_target_values` finds, per request, the vector that, written at the subject's last token of the edit
layer, makes the model predict the new target (ROME ``compute_v`` / MEMIT ``compute_z``). Nothing here changes the
model's weights.

Speed of the z / v* optimisation (the dominant cost of every method of the family). Each step differs from the
previous one only in ``delta``, which is added at the subject's last token of every prompt, and the model is causal.
So everything that does not depend on ``delta`` is computed once, without gradients:

1. the prompts of one request are LEFT-padded so that their subject tokens share one column ``S``;
2. columns ``[0, S)`` (everything before the subject's last token, in every layer) run once and are kept as the
   model's own key/value cache;
3. columns ``[S, width)`` run once through the layers below the edit site; the input of the first layer that
   depends on ``delta`` is kept, together with the exact keyword arguments (masks, rotary embeddings, ...) the model
   passed to that layer;
4. each optimisation step calls only the decoder layers from the edit site up to the loss layer, on the columns from
   the subject onwards, with a fresh copy of the prefix cache, and computes logits only at the target positions and
   the KL position.

``fast=False`` runs the plain reference (full forward of every prompt, right padding, a hook adding ``delta``); the
unit tests check that both give the same values.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .hooks import StopForward, Trace
from .keys import encode_with_subject, fill_template, site_module, target_token_ids
from .models import LoadedModel
from .requests import EditRequest
from .templates import as_template_groups

log = logging.getLogger(__name__)

#: the KL prompt of ROME / MEMIT (``kl_prompts = ["{} is a"]``)
KL_PROMPT = "{} is a"
#: PMET's adaptive NLL (compute_zs): the NLL weight once the target is the argmax everywhere, and the KL-term level
#: at which the optimisation then stops
ADAPTIVE_NLL_FACTOR = 0.1
ADAPTIVE_KL_STOP = 0.01


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class _Prompts:
    """One request's rewriting prompts (+ the KL prompt, last row) in the subject-aligned, left-padded layout."""

    ids: torch.Tensor  # [B, width]
    mask: torch.Tensor  # [B, width]
    pos: torch.Tensor  # [B, width] position ids (left padding)
    S: int  # the column of every row's subject-last token
    n_rewrite: int
    target: torch.Tensor  # [T] target token ids
    tgt_rows: torch.Tensor  # [n_rewrite * T] row of each target prediction
    tgt_cols: torch.Tensor  # [n_rewrite * T] its column relative to S


def _build_prompts(lm: LoadedModel, req: EditRequest, templates: Sequence[str]) -> _Prompts:
    tok = lm.tokenizer
    target = target_token_ids(tok, req.target_new)
    seqs, subj, plen = [], [], []
    for t in templates:
        text, start = fill_template(t, req)
        ids, idx = encode_with_subject(tok, text, req.subject, start)
        seqs.append(ids + target[:-1])
        subj.append(idx)
        plen.append(len(ids))
    kl_text = KL_PROMPT.replace("{}", req.subject)
    kl_ids, kl_idx = encode_with_subject(tok, kl_text, req.subject, 0)
    seqs.append(kl_ids[:kl_idx + 1])  # only the logits at the subject's last token are used
    subj.append(kl_idx)
    S = max(subj)
    width = S + max(len(s) - i for s, i in zip(seqs, subj))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    B = len(seqs)
    ids = torch.full((B, width), pad, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    rows, cols = [], []
    for r, (s, i) in enumerate(zip(seqs, subj)):
        off = S - i
        ids[r, off:off + len(s)] = torch.tensor(s)
        mask[r, off:off + len(s)] = 1
        if r < len(templates):
            for j in range(len(target)):
                rows.append(r)
                cols.append(plen[r] - 1 + j - i)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    dev = lm.device
    return _Prompts(ids.to(dev), mask.to(dev), pos.to(dev), S, len(templates), torch.tensor(target, device=dev),
                    torch.tensor(rows, device=dev), torch.tensor(cols, device=dev))


class _Capture:
    """Forward pre-hook on one decoder layer: keeps its positional/keyword arguments and stops the forward."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.args: tuple = ()
        self.kwargs: dict = {}

    def __enter__(self) -> "_Capture":
        def hook(module, args, kwargs):
            self.args, self.kwargs = tuple(args), dict(kwargs)
            raise StopForward()
        self._handle = self.module.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._handle.remove()
        return exc_type is StopForward


class _SuffixRunner:
    """Runs decoder layers ``start..stop`` on the columns from the subject onwards, from cached inputs.

    Built once per request without gradients (passes 2 and 3 of the module docstring); :meth:`hidden` then returns
    the pre-norm hidden state after layer ``stop`` for any ``delta`` (added by the caller's hook or to the cached
    input), with gradients.
    """

    def __init__(self, lm: LoadedModel, P: _Prompts, start: int, stop: int):
        self.lm, self.start, self.stop = lm, start, stop
        base = lm.model.base_model
        layers = lm.model.get_submodule(lm.spec.layers_path)
        self.layers = layers
        with torch.no_grad():
            cache = None
            if P.S > 0:
                cache = base(input_ids=P.ids[:, :P.S], attention_mask=P.mask[:, :P.S],
                             position_ids=P.pos[:, :P.S], use_cache=True).past_key_values
            suffix = dict(input_ids=P.ids[:, P.S:], attention_mask=P.mask, position_ids=P.pos[:, P.S:],
                          past_key_values=cache, use_cache=cache is not None)
            if start < lm.spec.n_layers:
                with _Capture(layers[start]) as cap:
                    base(**suffix)
                if cap.args:
                    self.h0, self.args, self.kwargs, self.h_kw = cap.args[0], cap.args[1:], cap.kwargs, False
                else:
                    self.h0, self.args, self.h_kw = cap.kwargs["hidden_states"], (), True
                    self.kwargs = {k: v for k, v in cap.kwargs.items() if k != "hidden_states"}
            else:  # the edit site is the last layer's output: nothing left to run
                last = lm.spec.layer(lm.spec.n_layers - 1)
                with Trace(lm.model, [last], retain_output=True, stop_after=last) as tr:
                    base(**suffix)
                self.h0, self.args, self.kwargs, self.h_kw = tr.outputs[last], (), {}, False
        self.h0 = self.h0.detach()

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        if self.start > self.stop:
            return h
        # a fresh copy of the prefix cache per step: attention appends to it
        args, kwargs = copy.deepcopy((self.args, self.kwargs))
        for i in range(self.start, self.stop + 1):
            if self.h_kw:
                out = self.layers[i](hidden_states=h, *args, **kwargs)
            else:
                out = self.layers[i](h, *args, **kwargs)
            h = _first(out)
        return h


def compute_target_values(lm: LoadedModel, requests: Sequence[EditRequest], layer: int, *, site: str = "mlp_out",
                          templates=("{}",), steps: int = 25, lr: float = 0.5, weight_decay: float = 1e-3,
                          clamp_norm_factor: float = 4.0, kl_factor: float = 0.0625, loss_layer: int | None = None,
                          early_stop_loss: float = 5e-2, early_stop_prob: float | None = None, fast: bool = True,
                          attn_delta: bool = False, adaptive_nll: bool = False) -> tuple[torch.Tensor, dict]:
    """z / v*: the value at the edit site that makes the model predict ``target_new`` (METHODS.md 0.4).

    For each request (independently, on the model as it is now) a vector ``delta [d]`` is added at the subject's
    last token of every rewriting prompt ``template.format(prompt) + target[:-1]`` and of the KL prompt
    "{subject} is a", at ``site`` of layer ``layer`` (``"mlp_out"``: the MLP's output, ROME; ``"residual"``: the
    decoder layer's output, MEMIT). Loss per forward::

        nll = mean over prompts of -sum_j log p(target_j) / len(target)      (logits: final_norm(h_loss_layer) W_U)
        kl  = kl_factor * KL(p_now || p_init) at the KL prompt's subject token
        wd  = weight_decay * ||delta|| / ||v_init||^2                        (the reference's norm, not squared)

    Adam(lr); at most ``steps`` forward passes (the last one is not followed by a step, as in the reference); stop
    early when the loss < ``early_stop_loss`` or the mean target probability >= ``early_stop_prob``; after each step
    ``||delta|| <= clamp_norm_factor * ||v_init||``. ``v_init`` is the site's value at the first template's prompt
    ("{}": the prompt itself in ROME/MEMIT); the result is ``Z = v_init + delta``.

    PMET's target optimisation (EasyEdit / xpq-tech PMET ``compute_zs``), for ``site="mlp_out"``:

    * ``attn_delta``: a second vector ``delta_attn`` is added at the same positions to the OUTPUT of layer
      ``layer``'s attention (its output projection) and optimised jointly (one Adam over both), with its own
      weight decay ``weight_decay * ||delta_attn|| / ||a_init||^2`` added to the loss and its own clamp to
      ``clamp_norm_factor * ||a_init||``; ``Z`` is still ``v_init + delta`` (the MLP output target);
    * ``adaptive_nll``: once the target is the argmax at every target position of every rewriting prompt, the NLL
      of the NEXT forward is weighted by :data:`ADAPTIVE_NLL_FACTOR` (back to 1 otherwise) and the optimisation
      stops when the KL term (``kl_factor`` included, as compute_zs does) is <= :data:`ADAPTIVE_KL_STOP`.

    Args:
        templates: flat list (or groups, flattened) of "{}"-templates; the first should be "{}".
        loss_layer: layer whose output is read for the logits (None: the last layer).
        fast: subject-aligned cached computation (module docstring); False: plain full forwards.
        attn_delta, adaptive_nll: PMET's joint attention delta and adaptive NLL (above).

    Returns:
        ``Z [n, d]`` fp32 and ``info`` with per-request lists ``steps, loss, nll, kl, target_prob, delta_norm,
        init_norm, seconds`` (with ``attn_delta`` also ``attn_delta_norm, attn_init_norm``) and ``init``
        (``[n, d]``, the values before optimisation).
    """
    spec = lm.spec
    site_module(lm, layer, site)
    if attn_delta and site != "mlp_out":
        raise ValueError("attn_delta (PMET's joint attention target) needs site='mlp_out'")
    loss_layer = spec.n_layers - 1 if loss_layer is None or loss_layer < 0 else loss_layer
    if not layer <= loss_layer < spec.n_layers:
        raise ValueError(f"loss layer {loss_layer} must lie in [{layer}, {spec.n_layers - 1}]")
    flat = [t for g in as_template_groups(templates) for t in g]
    keys = ("steps", "loss", "nll", "kl", "target_prob", "delta_norm", "init_norm", "seconds")
    info: dict[str, Any] = {k: [] for k in keys + (("attn_delta_norm", "attn_init_norm") if attn_delta else ())}
    Z, inits = [], []
    model = lm.model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for req in requests:
            t0 = time.perf_counter()
            z, init, rec = _optimise_one(lm, req, layer, site, flat, loss_layer, steps=steps, lr=lr,
                                         weight_decay=weight_decay, clamp_norm_factor=clamp_norm_factor,
                                         kl_factor=kl_factor, early_stop_loss=early_stop_loss,
                                         early_stop_prob=early_stop_prob, fast=fast, attn_delta=attn_delta,
                                         adaptive_nll=adaptive_nll)
            Z.append(z)
            inits.append(init)
            for k, v in rec.items():
                info[k].append(v)
            info["seconds"].append(time.perf_counter() - t0)
            log.debug("z for %s: %s", req.case_id, rec)
    finally:
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    d = spec.hidden_size
    info["init"] = torch.stack(inits) if inits else torch.zeros((0, d), device=lm.device)
    return (torch.stack(Z) if Z else torch.zeros((0, d), device=lm.device)), info


def _optimise_one(lm: LoadedModel, req: EditRequest, layer: int, site: str, templates: list[str], loss_layer: int,
                  *, steps: int, lr: float, weight_decay: float, clamp_norm_factor: float, kl_factor: float,
                  early_stop_loss: float, early_stop_prob: float | None, fast: bool, attn_delta: bool = False,
                  adaptive_nll: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    spec, model = lm.spec, lm.model
    final_norm = model.get_submodule(spec.final_norm)
    unembed = model.get_output_embeddings()
    P = _build_prompts(lm, req, templates)
    T = int(P.target.numel())
    B = P.ids.shape[0]
    # the optimised vectors by the module they are added to (the site; PMET's attention output too)
    edit_name = site_module(lm, layer, site)
    deltas = {edit_name: torch.zeros(spec.hidden_size, device=lm.device, requires_grad=True)}
    if attn_delta:
        deltas[spec.attn_out_module(layer)] = torch.zeros(spec.hidden_size, device=lm.device, requires_grad=True)
    delta = deltas[edit_name]
    inits: dict[str, torch.Tensor] = {}  # module name -> its output at row 0's subject token before any change

    if fast:
        start = layer if site == "mlp_out" else layer + 1
        runner = _SuffixRunner(lm, P, start, loss_layer)
        width = runner.h0.shape[1]
        at_subject = torch.zeros((B, width, 1), device=lm.device)
        at_subject[:, 0] = 1.0  # the subject's last token is column 0 of the suffix in every row
        sel_rows = torch.cat([P.tgt_rows, torch.tensor([B - 1], device=lm.device)])
        sel_cols = torch.cat([P.tgt_cols, torch.tensor([0], device=lm.device)])
        if site == "residual":
            inits[edit_name] = runner.h0[0, 0].detach().float().clone()

        def forward() -> torch.Tensor:
            if site == "residual":
                h = runner.hidden(_plus(runner.h0, at_subject * delta))
                return h[sel_rows, sel_cols]

            def add(name, output):
                out = _first(output)
                if name not in inits:
                    inits[name] = out[0, 0].detach().float().clone()
                new = _plus(out, at_subject * deltas[name])
                return (new, *output[1:]) if isinstance(output, tuple) else new

            with Trace(model, list(deltas), edit_output=add):
                h = runner.hidden(runner.h0)
            return h[sel_rows, sel_cols]
    else:
        forward = _reference_forward(lm, P, loss_layer, deltas, inits)

    opt = torch.optim.Adam(list(deltas.values()), lr=lr)
    kl_init = None
    rec: dict[str, float] = {}
    n_steps = 0
    nll_factor = 1.0
    targets_all = P.target.repeat(P.n_rewrite)[:, None]  # [n_rewrite*T, 1]
    for it in range(max(1, steps)):
        opt.zero_grad()
        h_sel = forward()  # [n_rewrite*T + 1, d] pre-norm hidden states at the needed positions
        logits = unembed(final_norm(h_sel)).float()
        logp = torch.log_softmax(logits, dim=-1)
        tok_lp = logp[:-1].gather(1, targets_all).squeeze(1)
        nll_each = -tok_lp.view(P.n_rewrite, T).sum(1) / T  # per prompt, averaged over the target's tokens
        nll = nll_each.mean()
        kl_logp = logp[-1:]
        if kl_init is None:
            kl_init = kl_logp.detach().clone()
        # KL(p_now || p_init) at the KL prompt's subject token (ROME: kl_div(init, now, log_target=True))
        kl = kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
        wd = sum(weight_decay * d.norm() / inits[name].norm() ** 2 for name, d in deltas.items())
        loss = nll_factor * nll + kl + wd
        # ONE host sync per step: the numbers the stopping rules need (and the record), read together
        watched = [loss, nll, kl, torch.exp(-nll_each).mean()]
        if adaptive_nll:  # PMET compute_zs: max_prob == prob, i.e. the target is the argmax at every target position
            watched.append((tok_lp == logp[:-1].max(dim=-1).values).all().to(loss.dtype))
        values = torch.stack([w.detach().to(torch.float32) for w in watched]).tolist()
        prob = values[3]
        rec = {"steps": n_steps, "loss": values[0], "nll": values[1], "kl": values[2], "target_prob": prob}
        if log.isEnabledFor(logging.DEBUG):
            log.debug("z step %d: loss %.4f = %g * nll %.4f + kl %.4f + wd %.4f, p(target) %.3f, |delta| %.2f", it,
                      rec["loss"], nll_factor, rec["nll"], rec["kl"], float(wd.detach()), prob,
                      delta.detach().norm().item())
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"z optimisation for {req.case_id!r}: the loss became {rec['loss']}")
        if rec["loss"] < early_stop_loss or (early_stop_prob is not None and prob >= early_stop_prob):
            break
        if adaptive_nll:
            if values[4] > 0.5:
                nll_factor = ADAPTIVE_NLL_FACTOR
                if rec["kl"] <= ADAPTIVE_KL_STOP:
                    break
            else:
                nll_factor = 1.0
        if it == steps - 1:
            break
        loss.backward()
        opt.step()
        n_steps += 1
        with torch.no_grad():
            for name, d in deltas.items():  # the norm clamp, without a host sync: scale 1 when inside
                max_norm = clamp_norm_factor * inits[name].norm()
                norm = d.norm()
                d.mul_(torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm)))
    init = inits[edit_name].float()
    rec["delta_norm"] = delta.detach().norm().item()
    rec["init_norm"] = init.norm().item()
    if attn_delta:
        attn_name = spec.attn_out_module(layer)
        rec["attn_delta_norm"] = deltas[attn_name].detach().norm().item()
        rec["attn_init_norm"] = inits[attn_name].norm().item()
    return (init + delta.detach()).float(), init, rec


def _plus(h: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """``h + add`` formed in float32 and rounded to ``h``'s dtype once (the fp32 ``delta`` of the optimisation meets
    the activations of a bfloat16 / float16 model; for a float32 model this is plain ``h + add``)."""
    if h.dtype == add.dtype:
        return h + add
    return (h.to(add.dtype) + add).to(h.dtype)


def _reference_forward(lm: LoadedModel, P: _Prompts, loss_layer: int, deltas: Mapping[str, torch.Tensor],
                       inits: dict) -> Callable[[], torch.Tensor]:
    """Plain full forwards of right-padded prompts with hooks adding each of ``deltas`` (module name -> vector) at
    the subject's last token (the test oracle for ``fast``); ``inits`` receives each module's first output at row
    0's subject token."""
    spec, model = lm.spec, lm.model
    B = P.ids.shape[0]
    # undo the left alignment: row r starts at its first real token
    lens = P.mask.sum(1)
    offs = P.mask.argmax(1)
    width = int(lens.max())
    ids = torch.zeros((B, width), dtype=torch.long, device=lm.device)
    mask = torch.zeros((B, width), dtype=torch.long, device=lm.device)
    for r in range(B):
        n, o = int(lens[r]), int(offs[r])
        ids[r, :n] = P.ids[r, o:o + n]
        mask[r, :n] = 1
    subj = P.S - offs  # [B] subject-last index in each right-padded row
    at_subject = torch.zeros((B, width, 1), device=lm.device)
    at_subject[torch.arange(B, device=lm.device), subj] = 1.0
    rows = torch.cat([P.tgt_rows, torch.tensor([B - 1], device=lm.device)])
    cols = torch.cat([P.tgt_cols, torch.tensor([0], device=lm.device)]) + subj[rows]
    read_name = spec.layer(loss_layer)

    def add(name, output):
        if name not in deltas:
            return None
        out = _first(output)
        if name not in inits:
            inits[name] = out[0, subj[0]].detach().float().clone()
        new = _plus(out, at_subject * deltas[name])
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def forward() -> torch.Tensor:
        names = list(deltas) + ([read_name] if read_name not in deltas else [])
        with Trace(model, names, edit_output=add, retain_output=True, detach=False, stop_after=read_name) as tr:
            model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        return tr.outputs[read_name][rows, cols]

    return forward


def target_value_summary(z_info: Mapping[str, Any]) -> dict[str, Any]:
    """Means of the per-request records of :func:`compute_target_values`' ``info`` (plus the lists themselves when
    short), for an edit's ``info["z"]``."""
    out: dict[str, Any] = {}
    for k in ("steps", "loss", "nll", "kl", "target_prob", "delta_norm", "init_norm", "seconds"):
        vals = list(z_info.get(k, []))
        if vals:
            out[f"{k}_mean"] = float(sum(vals) / len(vals))
            if k == "target_prob":
                out["target_prob_min"] = float(min(vals))
            if len(vals) <= 16:
                out[k] = [float(v) for v in vals]
    return out


__all__ = ["KL_PROMPT", "ADAPTIVE_NLL_FACTOR", "ADAPTIVE_KL_STOP", "compute_target_values", "target_value_summary"]
