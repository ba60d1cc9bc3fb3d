"""The subject and its keys (METHODS.md 0.3): where the subject's last token is, and what the model holds there.

* :func:`subject_token_index` / :func:`encode_with_subject` -- the subject's last token (``fact_token: subject_last``);
* :func:`fill_template` -- a context template with the request's prompt in its slot; :func:`target_token_ids`;
* :func:`compute_keys` -- k*: the input of the MLP output projection at the subject's last token, averaged over
  templates (ROME ``compute_u`` / MEMIT ``compute_ks``), ``[n, d_ff]``;
* :func:`current_values` -- the value at the edit site now (MEMIT's ``cur_zs``), ``[n, d]``; :func:`site_module`
  names the module of an edit site.

Everything is computed on the model as it is now, fp32 on ``lm.device``; nothing changes the weights.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .hooks import Trace
from .models import LoadedModel
from .requests import EditRequest
from .templates import as_template_groups


def subject_token_index(tok, text: str, subject: str, start: int | None = None) -> int:
    """Index of the subject's last token in ``tok(text)`` (special tokens included, as the model sees it).

    Uses the fast tokenizer's offset mapping: the last token whose character span overlaps the subject occurrence
    ``text[start:start+len(subject)]``. Without ``start`` the last occurrence of ``subject`` is used; callers that
    fill a template pass the position of the template's subject slot. A token that straddles the subject's end
    (e.g. "Tower" + "s") counts as the subject's last token.

    Raises:
        ValueError: ``subject`` does not occur (at ``start``), or no token covers it.
    """
    ids, idx = encode_with_subject(tok, text, subject, start)
    return idx


def encode_with_subject(tok, text: str, subject: str, start: int | None = None) -> tuple[list[int], int]:
    """``(input_ids, index of the subject's last token)`` of ``tok(text)``; see :func:`subject_token_index`."""
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
                ids, idx = encode_with_subject(tok, text, req.subject, start)
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
    return _reprs_at_subject(lm, lm.spec.mlp_out_module(layer), requests, as_template_groups(templates), use_input=True,
                             batch_size=batch_size)


def current_values(lm: LoadedModel, layer: int, requests: Sequence[EditRequest], *, site: str = "residual",
                   templates=("{}",), batch_size: int = 64) -> torch.Tensor:
    """The value at the edit site now, at the subject's last token, ``[n, d]`` (MEMIT's ``cur_zs``).

    ``site="residual"``: output of decoder layer ``layer``; ``site="mlp_out"``: output of its MLP.
    """
    module = site_module(lm, layer, site)
    if not requests:
        return torch.zeros((0, lm.spec.hidden_size), device=lm.device)
    return _reprs_at_subject(lm, module, requests, as_template_groups(templates), use_input=False,
                             batch_size=batch_size)


def site_module(lm: LoadedModel, layer: int, site: str) -> str:
    """The module whose output is the edit site: decoder layer ``layer`` ("residual") or its MLP ("mlp_out").

    Raises:
        ValueError: the layer is out of range or the site unknown.
    """
    if not 0 <= layer < lm.spec.n_layers:
        raise ValueError(f"layer {layer} out of range: the model has {lm.spec.n_layers} layers")
    if site == "residual":
        return lm.spec.layer(layer)
    if site == "mlp_out":
        return lm.spec.mlp_module(layer)
    raise ValueError(f"unknown edit site {site!r}; valid: residual, mlp_out")


__all__ = ["subject_token_index", "encode_with_subject", "fill_template", "target_token_ids", "compute_keys",
           "current_values", "site_module"]
