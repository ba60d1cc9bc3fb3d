"""Shared locate-then-edit machinery of the ROME / MEMIT family, as plain functions named after the papers' steps.

The steps (see ../shared/guides/METHODS.md, section 0):

* :func:`context_templates` -- random prefixes sampled from the model ("{}" plus ``"<text>. {}"``), 0.2;
* :func:`subject_token_index` -- the subject's last token (``fact_token: subject_last``), 0.3;
* :func:`compute_keys` -- k*: the input of the MLP output projection at the subject's last token, averaged over
  templates (ROME ``compute_u`` / MEMIT ``compute_ks``);
* :func:`compute_target_values` -- v* / z: the vector that, written at the subject's last token of the edit layer,
  makes the model predict the new target (ROME ``compute_v`` / MEMIT ``compute_z``), 0.4;
* :func:`layer_covariance` / :func:`layer_covariances` -- C = E[k kᵀ] over a text corpus on the UNEDITED model, 0.1;
* :func:`current_values` -- the value at the edit site now (MEMIT's ``cur_zs``); :func:`spread_residual` -- the
  multi-layer spread of a residual (MEMIT linear, PMET square root).

Notation (METHODS.md): ``n`` requests, ``d`` hidden size, ``d_ff`` MLP width, ``K`` keys ``[n, d_ff]`` (rows),
``Z`` target values ``[n, d]``, ``C`` ``[d_ff, d_ff]``. Every tensor lives on ``lm.device`` and is fp32; linear
solves are done by the callers in float64. Nothing here changes the model's weights; caches (templates, statistics)
live on disk under :func:`editors.cache.cache_root`, keyed by the unedited model's hash and the parameters.

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
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .cache import cache_path
from .hooks import StopForward, Trace
from .models import LoadedModel, weights_fingerprint
from .requests import EditRequest

log = logging.getLogger(__name__)

#: words the template generations start from (EasyEdit rome_main.py / memit_main.py ``get_context_templates``)
TEMPLATE_STARTS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
#: named template specs: ``(length, n_gen)`` pairs; ``length`` counts the start word's tokens too (``generate_fast``
#: ``max_out_len``), ``n_gen`` is split evenly over the start words. ROME: 10 of length 5 + 10 of length 10 (21
#: templates with "{}"); MEMIT/AlphaEdit/EMMET/PMET: 5 of length 10 (6 templates, in two groups).
TEMPLATE_SPECS: dict[str, tuple[tuple[int, int], ...]] = {"rome": ((5, 10), (10, 10)), "memit": ((10, 5),)}
#: the KL prompt of ROME / MEMIT (``kl_prompts = ["{} is a"]``)
KL_PROMPT = "{} is a"

_TEMPLATE_FORMAT_VERSION = 1
_STATS_FORMAT_VERSION = 1


# =================================================================================================================
# 0.2 context templates
# =================================================================================================================
def _parse_template_spec(spec) -> tuple[tuple[int, int], ...]:
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in TEMPLATE_SPECS:
            return TEMPLATE_SPECS[key]
        # "5:10,10:10" -> ((5, 10), (10, 10))
        try:
            pairs = tuple(tuple(int(x) for x in part.split(":")) for part in key.split(",") if part.strip())
        except ValueError:
            pairs = ()
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ValueError(f"unknown context-template spec {spec!r}; use {', '.join(TEMPLATE_SPECS)} or "
                             f"'length:n_gen,...' such as '5:10,10:10'")
        spec = pairs
    out = tuple((int(a), int(b)) for a, b in spec)
    if any(length < 1 or n < 0 for length, n in out):
        raise ValueError(f"context-template spec {spec!r}: lengths must be >= 1 and counts >= 0")
    return out


def _clean_generation(text: str) -> str:
    text = text.replace("{", " ").replace("}", " ")
    return " ".join(text.split())


@torch.no_grad()
def _sample_prefixes(lm: LoadedModel, start: str, n: int, length: int, top_k: int, gen: torch.Generator
                     ) -> list[str]:
    """``n`` top-k samples continuing ``start`` to ``length`` tokens in all (CPU generator: same draws anywhere)."""
    tok, model = lm.tokenizer, lm.model
    prompt = tok(start, add_special_tokens=True)["input_ids"]
    ids = torch.tensor([prompt] * n, device=lm.device)
    unembed = model.get_output_embeddings()
    for _ in range(max(0, length - len(prompt))):
        h = model.base_model(input_ids=ids).last_hidden_state[:, -1]
        logits = unembed(h).float()
        top, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        probs = torch.softmax(top, dim=-1).cpu()
        pick = torch.multinomial(probs, 1, generator=gen).to(idx.device)
        ids = torch.cat([ids, idx.gather(1, pick)], dim=1)
    return [tok.decode(row, skip_special_tokens=True) for row in ids]


def context_template_groups(lm: LoadedModel, seed: int = 0, spec="rome", *,
                            starts: Sequence[str] = TEMPLATE_STARTS, top_k: int = 5,
                            cache_dir: str | None = None) -> list[list[str]]:
    """Context templates in groups: ``[["{}"], [one group per (length, n_gen) of spec]]``.

    Each generated template is ``"<sampled text>. {}"`` with braces removed from the text (ROME
    ``get_context_templates``). Sampling is top-k (k=5) from the model, seeded with ``seed`` on a CPU generator, so
    it is deterministic. The result is cached on disk keyed by the model hash and every parameter.

    Args:
        spec: "rome" (``((5,10),(10,10))``, 21 templates), "memit" (``((10,5),)``, 6 templates), a string
            "length:n_gen,..." or a sequence of ``(length, n_gen)`` pairs.
        starts: the words generations start from; ``n_gen`` is divided evenly over them.
    """
    pairs = _parse_template_spec(spec)
    starts = tuple(starts)
    if not starts:
        raise ValueError("context templates need at least one start word")
    key_src = json.dumps({"v": _TEMPLATE_FORMAT_VERSION, "model": lm.model_hash, "seed": int(seed),
                          "spec": pairs, "starts": starts, "top_k": int(top_k)}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = cache_path("context_templates", lm.model_hash or "unhashed", f"{key}.json", root=cache_dir)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                return [list(g) for g in json.load(fh)["groups"]]
        except (OSError, ValueError, KeyError):
            log.warning("ignoring unreadable template cache %s", path)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    groups: list[list[str]] = [["{}"]]
    was_training = lm.model.training
    lm.model.eval()
    try:
        for length, n_gen in pairs:
            per_start = n_gen // len(starts)
            group: list[str] = []
            for start in starts:
                if per_start == 0:
                    continue
                for text in _sample_prefixes(lm, start, per_start, length, top_k, gen):
                    group.append(_clean_generation(text) + ". {}")
            if group:
                groups.append(group)
    finally:
        lm.model.train(was_training)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"key": json.loads(key_src), "groups": groups}, fh, indent=1)
    os.replace(tmp, path)
    log.info("context templates (%s): %d generated, cached in %s", pairs, sum(map(len, groups)) - 1, path)
    return groups


def context_templates(lm: LoadedModel, seed: int = 0, spec="rome", *, starts: Sequence[str] = TEMPLATE_STARTS,
                      top_k: int = 5, cache_dir: str | None = None) -> list[str]:
    """Flat list of "{}"-templates, "{}" first (see :func:`context_template_groups`)."""
    groups = context_template_groups(lm, seed, spec, starts=starts, top_k=top_k, cache_dir=cache_dir)
    return [t for g in groups for t in g]


def _as_groups(templates) -> list[list[str]]:
    """A flat list is one group (ROME: plain mean); a list of lists is MEMIT's groups."""
    templates = list(templates)
    if not templates:
        raise ValueError("at least one template is needed")
    if all(isinstance(t, str) for t in templates):
        groups = [templates]
    else:
        groups = [list(g) for g in templates]
    for g in groups:
        for t in g:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
    return groups


# =================================================================================================================
# 0.3 subject token
# =================================================================================================================
def subject_token_index(tok, text: str, subject: str, start: int | None = None) -> int:
    """Index of the subject's last token in ``tok(text)`` (special tokens included, as the model sees it).

    Uses the fast tokenizer's offset mapping: the last token whose character span overlaps the subject occurrence
    ``text[start:start+len(subject)]``. Without ``start`` the last occurrence of ``subject`` is used; callers that
    fill a template pass the position of the template's subject slot. A token that straddles the subject's end
    (e.g. "Tower" + "s") counts as the subject's last token.

    Raises:
        ValueError: ``subject`` does not occur (at ``start``), or no token covers it.
    """
    ids, idx = _encode_with_subject(tok, text, subject, start)
    return idx


def _encode_with_subject(tok, text: str, subject: str, start: int | None = None) -> tuple[list[int], int]:
    if start is None:
        start = text.rfind(subject)
        if start < 0:
            raise ValueError(f"subject {subject!r} does not occur in {text!r}")
    elif text[start:start + len(subject)] != subject:
        raise ValueError(f"subject {subject!r} is not at character {start} of {text!r}")
    end = start + len(subject)
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    idx = -1
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and a < end and b > start:
            idx = i
    if idx < 0:
        raise ValueError(f"no token covers subject {subject!r} in {text!r} (is the tokenizer a fast one?)")
    return list(enc["input_ids"]), idx


def fill_template(template: str, request: EditRequest) -> tuple[str, int]:
    """``(text, subject_start)``: the template with ``request.prompt`` in its slot, and where the subject begins.

    The subject occurrence is the one ``request.prompt_template`` replaces (its first occurrence in the prompt).
    """
    slot = template.index("{}")
    text = template[:slot] + request.prompt + template[slot + 2:]
    return text, slot + request.prompt.index(request.subject)


def target_token_ids(tok, target: str) -> list[int]:
    """Token ids of ``" " + target`` without special tokens (targets carry no leading space)."""
    ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return list(ids)


# =================================================================================================================
# keys and current values at the subject
# =================================================================================================================
def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def _reprs_at_subject(lm: LoadedModel, module: str, requests: Sequence[EditRequest], groups: list[list[str]], *,
                      use_input: bool, batch_size: int) -> torch.Tensor:
    """Mean over groups of the mean within each group of ``module``'s input/output at the subject's last token.

    Sequences are cut after the subject's last token (the model is causal, so nothing later matters there) and the
    forward stops after ``module``. Returns ``[n, width]`` fp32.
    """
    tok, model = lm.tokenizer, lm.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows: list[tuple[int, int, list[int]]] = []  # (request, group, ids cut after subject)
    for r, req in enumerate(requests):
        for g, group in enumerate(groups):
            for t in group:
                text, start = fill_template(t, req)
                ids, idx = _encode_with_subject(tok, text, req.subject, start)
                rows.append((r, g, ids[:idx + 1]))
    sums: dict[tuple[int, int], torch.Tensor] = {}
    counts: dict[tuple[int, int], int] = {}
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][2]))
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            chunk = [rows[i] for i in order[s:s + batch_size]]
            width = max(len(c[2]) for c in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, (_, _, seq) in enumerate(chunk):
                ids[j, :len(seq)] = torch.tensor(seq)
                mask[j, :len(seq)] = 1
            with Trace(model, [module], retain_input=use_input, retain_output=not use_input,
                       stop_after=module) as tr:
                model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            h = tr.inputs[module] if use_input else tr.outputs[module]
            last = torch.tensor([len(c[2]) - 1 for c in chunk], device=h.device)
            picked = h[torch.arange(len(chunk), device=h.device), last].float()
            for j, (r, g, _) in enumerate(chunk):
                key = (r, g)
                sums[key] = sums[key] + picked[j] if key in sums else picked[j].clone()
                counts[key] = counts.get(key, 0) + 1
    finally:
        model.train(was_training)
    out = []
    for r in range(len(requests)):
        per_group = [sums[(r, g)] / counts[(r, g)] for g in range(len(groups))]
        out.append(torch.stack(per_group).mean(0))
    return torch.stack(out).to(lm.device)


def compute_keys(lm: LoadedModel, layer: int, requests: Sequence[EditRequest], templates=("{}",), *,
                 batch_size: int = 64) -> torch.Tensor:
    """k*: the input of layer ``layer``'s MLP output projection at the subject's last token, ``[n, d_ff]``.

    Averaged over ``templates``: a flat list is averaged plainly (ROME ``compute_u``), a list of groups is averaged
    within each group and then over groups (MEMIT ``compute_ks``). Computed on the model as it is now; the forward
    stops after the traced projection, so no layer above it runs.
    """
    if not requests:
        return torch.zeros((0, lm.spec.mlp_size), device=lm.device)
    return _reprs_at_subject(lm, lm.spec.mlp_out_module(layer), requests, _as_groups(templates), use_input=True,
                             batch_size=batch_size)


def current_values(lm: LoadedModel, layer: int, requests: Sequence[EditRequest], *, site: str = "residual",
                   templates=("{}",), batch_size: int = 64) -> torch.Tensor:
    """The value at the edit site now, at the subject's last token, ``[n, d]`` (MEMIT's ``cur_zs``).

    ``site="residual"``: output of decoder layer ``layer``; ``site="mlp_out"``: output of its MLP.
    """
    module = _site_module(lm, layer, site)
    if not requests:
        return torch.zeros((0, lm.spec.hidden_size), device=lm.device)
    return _reprs_at_subject(lm, module, requests, _as_groups(templates), use_input=False, batch_size=batch_size)


def _site_module(lm: LoadedModel, layer: int, site: str) -> str:
    if not 0 <= layer < lm.spec.n_layers:
        raise ValueError(f"layer {layer} out of range: the model has {lm.spec.n_layers} layers")
    if site == "residual":
        return lm.spec.layer(layer)
    if site == "mlp_out":
        return lm.spec.mlp_module(layer)
    raise ValueError(f"unknown edit site {site!r}; valid: residual, mlp_out")


# =================================================================================================================
# 0.4 target values (z / v*)
# =================================================================================================================
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
        ids, idx = _encode_with_subject(tok, text, req.subject, start)
        seqs.append(ids + target[:-1])
        subj.append(idx)
        plen.append(len(ids))
    kl_text = KL_PROMPT.replace("{}", req.subject)
    kl_ids, kl_idx = _encode_with_subject(tok, kl_text, req.subject, 0)
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
                          early_stop_loss: float = 5e-2, early_stop_prob: float | None = None, fast: bool = True
                          ) -> tuple[torch.Tensor, dict]:
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

    Args:
        templates: flat list (or groups, flattened) of "{}"-templates; the first should be "{}".
        loss_layer: layer whose output is read for the logits (None: the last layer).
        fast: subject-aligned cached computation (module docstring); False: plain full forwards.

    Returns:
        ``Z [n, d]`` fp32 and ``info`` with per-request lists ``steps, loss, nll, kl, target_prob, delta_norm,
        init_norm, seconds`` and ``init`` (``[n, d]``, the values before optimisation).
    """
    spec = lm.spec
    _site_module(lm, layer, site)
    loss_layer = spec.n_layers - 1 if loss_layer is None or loss_layer < 0 else loss_layer
    if not layer <= loss_layer < spec.n_layers:
        raise ValueError(f"loss layer {loss_layer} must lie in [{layer}, {spec.n_layers - 1}]")
    flat = [t for g in _as_groups(templates) for t in g]
    info: dict[str, Any] = {k: [] for k in ("steps", "loss", "nll", "kl", "target_prob", "delta_norm", "init_norm",
                                            "seconds")}
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
                                         early_stop_prob=early_stop_prob, fast=fast)
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
                  early_stop_loss: float, early_stop_prob: float | None, fast: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    spec, model = lm.spec, lm.model
    final_norm = model.get_submodule(spec.final_norm)
    unembed = model.get_output_embeddings()
    P = _build_prompts(lm, req, templates)
    T = int(P.target.numel())
    B = P.ids.shape[0]
    delta = torch.zeros(spec.hidden_size, device=lm.device, requires_grad=True)
    state: dict[str, torch.Tensor] = {}

    if fast:
        start = layer if site == "mlp_out" else layer + 1
        runner = _SuffixRunner(lm, P, start, loss_layer)
        width = runner.h0.shape[1]
        at_subject = torch.zeros((B, width, 1), device=lm.device)
        at_subject[:, 0] = 1.0  # the subject's last token is column 0 of the suffix in every row
        sel_rows = torch.cat([P.tgt_rows, torch.tensor([B - 1], device=lm.device)])
        sel_cols = torch.cat([P.tgt_cols, torch.tensor([0], device=lm.device)])
        if site == "residual":
            state["init"] = runner.h0[0, 0].detach().clone()
        mlp_name = spec.mlp_module(layer)

        def forward() -> torch.Tensor:
            if site == "residual":
                h = runner.hidden(runner.h0 + at_subject * delta)
                return h[sel_rows, sel_cols]

            def add(name, output):
                out = _first(output)
                if "init" not in state:
                    state["init"] = out[0, 0].detach().clone()
                new = out + at_subject * delta
                return (new, *output[1:]) if isinstance(output, tuple) else new

            with Trace(model, [mlp_name], edit_output=add):
                h = runner.hidden(runner.h0)
            return h[sel_rows, sel_cols]
    else:
        forward = _reference_forward(lm, P, layer, site, loss_layer, delta, state)

    opt = torch.optim.Adam([delta], lr=lr)
    kl_init = None
    rec: dict[str, float] = {}
    n_steps = 0
    for it in range(max(1, steps)):
        opt.zero_grad()
        h_sel = forward()  # [n_rewrite*T + 1, d] pre-norm hidden states at the needed positions
        logits = unembed(final_norm(h_sel)).float()
        logp = torch.log_softmax(logits, dim=-1)
        tok_lp = logp[:-1].gather(1, P.target.repeat(P.n_rewrite)[:, None]).squeeze(1)
        nll_each = -tok_lp.view(P.n_rewrite, T).sum(1) / T
        nll = nll_each.mean()
        kl_logp = logp[-1:]
        if kl_init is None:
            kl_init = kl_logp.detach().clone()
        kl = kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
        init = state["init"]
        wd = weight_decay * delta.norm() / init.norm() ** 2
        loss = nll + kl + wd
        prob = torch.exp(-nll_each).mean().item()
        rec = {"steps": n_steps, "loss": loss.item(), "nll": nll.item(), "kl": kl.item(), "target_prob": prob}
        log.debug("z step %d: loss %.4f = nll %.4f + kl %.4f + wd %.4f, p(target) %.3f, |delta| %.2f", it,
                  rec["loss"], rec["nll"], rec["kl"], wd.item(), prob, delta.detach().norm().item())
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"z optimisation for {req.case_id!r}: the loss became {rec['loss']}")
        if loss.item() < early_stop_loss or (early_stop_prob is not None and prob >= early_stop_prob):
            break
        if it == steps - 1:
            break
        loss.backward()
        opt.step()
        n_steps += 1
        with torch.no_grad():
            max_norm = clamp_norm_factor * init.norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    init = state["init"].float()
    rec["delta_norm"] = delta.detach().norm().item()
    rec["init_norm"] = init.norm().item()
    return (init + delta.detach()).float(), init, rec


def _reference_forward(lm: LoadedModel, P: _Prompts, layer: int, site: str, loss_layer: int,
                       delta: torch.Tensor, state: dict) -> Callable[[], torch.Tensor]:
    """Plain full forwards of right-padded prompts with a hook adding ``delta`` (the test oracle for ``fast``)."""
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
    edit_name = _site_module(lm, layer, site)
    read_name = spec.layer(loss_layer)

    def add(name, output):
        if name != edit_name:
            return None
        out = _first(output)
        if "init" not in state:
            state["init"] = out[0, subj[0]].detach().clone()
        new = out + at_subject * delta
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def forward() -> torch.Tensor:
        names = [edit_name] if edit_name == read_name else [edit_name, read_name]
        with Trace(model, names, edit_output=add, retain_output=True, detach=False, stop_after=read_name) as tr:
            model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        return tr.outputs[read_name][rows, cols]

    return forward


# =================================================================================================================
# 0.1 second-moment statistics
# =================================================================================================================
#: default size of the covariance sample (tokens). For d_ff = 1536 (SmolLM2) this gives a full-rank C with a
#: stable C^{-1}k (see the ROME config's docstring) in well under two minutes on two CPU threads for five layers.
DEFAULT_MOM2_TOKENS = 40_000
DEFAULT_MOM2_SEQ_LEN = 256


def builtin_corpus_text() -> str:
    """The default covariance corpus: the English prose of Python's own documentation topics
    (``pydoc_data.topics.topics``, about 465k characters, shipped with every CPython).

    ROME/MEMIT use Wikipedia (100k articles); no hub is reachable on our machines, so the default is a corpus that
    is always present. It is technical English rather than encyclopaedic prose: for statistics closer to the
    reference, pass ``corpus=`` the path of your own UTF-8 text file.
    """
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def float64_device(device: torch.device) -> torch.device:
    """Where float64 maths runs for tensors on ``device``: the device itself, or the CPU for MPS (no float64)."""
    return torch.device("cpu") if torch.device(device).type == "mps" else torch.device(device)


def _corpus(corpus: str) -> tuple[str, str]:
    """(text, id) where the id names the corpus and hashes its content."""
    if corpus == "builtin":
        text, name = builtin_corpus_text(), "pydoc"
    else:
        if not os.path.isfile(corpus):
            raise FileNotFoundError(f"covariance corpus {corpus!r} is neither 'builtin' nor a readable text file")
        with open(corpus, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        name = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(corpus))[0])[:40]
    digest = hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()[:12]
    return text, f"{name}-{digest}"


def _stats_path(lm: LoadedModel, layer: int, corpus_id: str, n_tokens: int, seq_len: int,
                cache_dir: str | None) -> str:
    name = f"mom2_v{_STATS_FORMAT_VERSION}_{corpus_id}_n{n_tokens}_len{seq_len}_layer{layer}.safetensors"
    return cache_path("stats", lm.model_hash or "unhashed", name, root=cache_dir)


def layer_covariances(lm: LoadedModel, layers: Sequence[int], *, corpus: str = "builtin",
                      n_tokens: int = DEFAULT_MOM2_TOKENS, seq_len: int = DEFAULT_MOM2_SEQ_LEN,
                      batch_size: int = 8, cache_dir: str | None = None, dtype: torch.dtype = torch.float32
                      ) -> dict[int, torch.Tensor]:
    """C_l = E[k kᵀ] (uncentred) of layer l's MLP-output-projection input over a corpus, ``{l: [d_ff, d_ff]}``.

    The corpus is tokenised once and cut into ``seq_len``-token windows spread evenly over it (no padding); the
    first ``n_tokens`` tokens' worth of windows are used (fewer if the corpus is shorter). Per batch, ``KᵀK`` is
    formed in fp32 and added to a float64 sum. One forward per batch serves every requested layer and stops after
    the highest one. Statistics are of the UNEDITED model: computing them raises ``RuntimeError`` when the weights
    no longer match ``lm.model_hash``; cached results (safetensors, keyed by model hash, layer, corpus id and size)
    are returned whatever the current weights.

    Args:
        corpus: "builtin" (:func:`builtin_corpus_text`) or the path of a UTF-8 text file.
        dtype: of the returned tensors (float64 for solves that need it; the cache holds float64). Float64
            results live on :func:`float64_device` (the CPU for MPS), others on ``lm.device``.
    """
    spec = lm.spec
    layers = sorted(set(int(x) for x in layers))
    for layer in layers:
        if not 0 <= layer < spec.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {spec.n_layers} layers")
    text, corpus_id = _corpus(corpus)
    out: dict[int, torch.Tensor] = {}
    missing = []
    for layer in layers:
        path = _stats_path(lm, layer, corpus_id, n_tokens, seq_len, cache_dir)
        if os.path.exists(path):
            from safetensors.torch import load_file
            out[layer] = load_file(path)["mom2"].to(float64_device(lm.device) if dtype == torch.float64
                                                   else lm.device).to(dtype)
        else:
            missing.append(layer)
    if not missing:
        return out
    if lm.model_hash and weights_fingerprint(lm.model) != lm.model_hash:
        raise RuntimeError("covariance statistics must be computed on the unedited model (the weights no longer "
                           "match the model hash); compute them before the first edit (Editor.prepare)")
    t0 = time.perf_counter()
    windows = _corpus_windows(lm.tokenizer, text, n_tokens, seq_len)
    names = {layer: spec.mlp_out_module(layer) for layer in missing}
    top = names[max(missing)]
    d_ff = spec.mlp_size
    acc_device = float64_device(lm.device)
    sums = {layer: torch.zeros((d_ff, d_ff), dtype=torch.float64, device=acc_device) for layer in missing}
    count = 0
    model = lm.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, windows.shape[0], batch_size):
                ids = windows[s:s + batch_size].to(lm.device)
                with Trace(model, list(names.values()), retain_input=True, stop_after=top) as tr:
                    model(input_ids=ids, use_cache=False)
                for layer, name in names.items():
                    K = tr.inputs[name].reshape(-1, d_ff).float()
                    sums[layer] += (K.T @ K).to(acc_device, torch.float64)
                count += ids.numel()
    finally:
        model.train(was_training)
    from safetensors.torch import save_file
    for layer in missing:
        C = sums[layer] / max(count, 1)
        C = (C + C.T) / 2
        path = _stats_path(lm, layer, corpus_id, n_tokens, seq_len, cache_dir)
        tmp = f"{path}.{os.getpid()}.tmp"
        save_file({"mom2": C.cpu().contiguous(), "count": torch.tensor([count])}, tmp,
                  metadata={"model_hash": lm.model_hash, "layer": str(layer), "corpus": corpus_id,
                            "n_tokens": str(count), "seq_len": str(seq_len)})
        os.replace(tmp, path)
        out[layer] = C.to(dtype) if dtype == torch.float64 else C.to(lm.device, dtype)
    log.info("covariance of layers %s: %d tokens of %s in %.1fs", missing, count, corpus_id, time.perf_counter() - t0)
    return out


def layer_covariance(lm: LoadedModel, layer: int, *, corpus: str = "builtin", n_tokens: int = DEFAULT_MOM2_TOKENS,
                     seq_len: int = DEFAULT_MOM2_SEQ_LEN, cache_dir: str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """C = E[k kᵀ] of one layer, ``[d_ff, d_ff]`` (see :func:`layer_covariances`)."""
    return layer_covariances(lm, [layer], corpus=corpus, n_tokens=n_tokens, seq_len=seq_len, cache_dir=cache_dir,
                             dtype=dtype)[layer]


def _corpus_windows(tok, text: str, n_tokens: int, seq_len: int) -> torch.Tensor:
    """``[n_windows, seq_len]`` token windows spread evenly over the corpus."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n_all = len(ids) // seq_len
    if n_all == 0:
        raise ValueError(f"the covariance corpus has {len(ids)} tokens, fewer than one window of {seq_len}")
    want = max(1, min(n_all, math.ceil(n_tokens / seq_len)))
    if want < math.ceil(n_tokens / seq_len):
        log.warning("covariance corpus holds %d tokens; using all of them (asked for %d)", n_all * seq_len, n_tokens)
    picks = sorted(set(int(i * n_all / want) for i in range(want)))
    return torch.tensor([ids[i * seq_len:(i + 1) * seq_len] for i in picks], dtype=torch.long)


# =================================================================================================================
# multi-layer spread
# =================================================================================================================
def spread_residual(R: torch.Tensor, i: int, n_layers: int, mode: str = "linear") -> torch.Tensor:
    """The share of residual ``R`` (``[n, d]`` or ``[d, n]``) that layer ``i`` of ``n_layers`` edited layers takes.

    MEMIT (memit_main.py): ``R / (n_layers - i)`` ("linear": the remaining residual is split evenly over the layers
    still to edit); PMET: ``R / sqrt(n_layers - i)`` ("sqrt").
    """
    if not 0 <= i < n_layers:
        raise ValueError(f"layer position {i} out of range for {n_layers} layers")
    remaining = n_layers - i
    if mode == "linear":
        return R / remaining
    if mode == "sqrt":
        return R / math.sqrt(remaining)
    raise ValueError(f"unknown spread mode {mode!r}; valid: linear, sqrt")


__all__ = [
    "TEMPLATE_STARTS", "TEMPLATE_SPECS", "KL_PROMPT", "DEFAULT_MOM2_TOKENS", "DEFAULT_MOM2_SEQ_LEN",
    "context_templates", "context_template_groups", "subject_token_index", "fill_template", "target_token_ids",
    "compute_keys", "current_values", "compute_target_values", "layer_covariance", "layer_covariances",
    "builtin_corpus_text", "spread_residual", "float64_device",
]
