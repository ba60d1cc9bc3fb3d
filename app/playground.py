"""The playground's edit, computed in the worker process (never in the web server).

One playground job = one edit on top of the edits the user already made in the playground (its "stack"):

1. the stacked edits are applied (their :class:`~editors.base.EditResult` come from the worker's in-memory cache, or
   are recomputed in order when the worker was restarted);
2. "before": the greedy continuation and the top-k next-token probabilities of the edit prompt, a paraphrase and a
   locality prompt, plus the probabilities of the new and the old target;
3. the new edit is computed by the method's editor and applied; "after": the same numbers;
4. every change is undone, bit for bit (the worker's model is shared by the next job).

The result is plain JSON (see :func:`playground_edit`), written into the job queue by the worker. The explanation
names the matrices the method changed, their layer, the rank of the change and its norm relative to the weight.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Mapping, MutableMapping, Sequence

import torch

from analysis import evaluation as ev
from editors.base import EditResult, apply_result
from editors.data import request_from_dict as _schema_request
from editors.presets import build_config
from editors.registry import get_editor_class
from editors.requests import EditRequest

ROLES = ("edit prompt", "paraphrase", "locality prompt")


def request_from_dict(d: Mapping[str, Any], source: str = "playground") -> EditRequest:
    """An :class:`EditRequest` from a JSON dict (the fields of :meth:`EditRequest.to_dict`), validated as a record of
    an uploaded file in the project's schema (:func:`editors.data.request_from_dict`): a missing or empty field, or
    a subject absent from the prompt, is a :class:`editors.data.RequestError` that names it."""
    return _schema_request(d, source, label=str(d.get("case_id", "edit")), default_case_id="playground")


def spec_key(model: str, specs: Sequence[Mapping[str, Any]]) -> str:
    """Cache key of the EditResult of the LAST spec given the ones before it (edits depend on their history)."""
    return json.dumps({"model": model, "specs": list(specs)}, sort_keys=True, default=str)


def _token_text(tok, token_id: int) -> str:
    return tok.decode([int(token_id)])


@torch.no_grad()
def next_token_view(lm, prompt: str, target_new: str, target_true: str, *, top_k: int = 5) -> dict[str, Any]:
    """Top-k next tokens after ``prompt`` with their probabilities, and the probability of each target (product over
    its tokens, teacher-forced) and of its first token."""
    tok = lm.tokenizer
    enc = tok(prompt, return_tensors="pt")
    logits = lm.model(input_ids=enc["input_ids"].to(lm.device)).logits[0, -1].float()
    probs = torch.softmax(logits, dim=-1)
    p, idx = probs.topk(top_k)
    out: dict[str, Any] = {"top": [{"token": _token_text(tok, int(i)), "prob": float(v)} for v, i in zip(p, idx)]}
    for name, target in (("new", target_new), ("true", target_true)):
        if not target:
            out[f"p_{name}"] = None
            out[f"p_{name}_first"] = None
            continue
        ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
        out[f"p_{name}_first"] = float(probs[ids[0]]) if ids else None
        tf = ev.teacher_forced(lm, [prompt], [target])[0]
        out[f"p_{name}"] = float(math.exp(tf.logprob))
    return out


def probe_prompts(req: EditRequest) -> list[tuple[str, str, str]]:
    """(role, prompt, target for the "new" probability) for the edit prompt, one paraphrase and one locality prompt."""
    out = [("edit prompt", req.prompt, req.target_new)]
    if req.rephrase_prompts:
        out.append(("paraphrase", req.rephrase_prompts[0], req.target_new))
    if req.locality_prompts:
        out.append(("locality prompt", req.locality_prompts[0],
                    req.locality_answers[0] if req.locality_answers else ""))
    return out


def measure(lm, req: EditRequest, *, top_k: int, max_new_tokens: int) -> list[dict[str, Any]]:
    probes = probe_prompts(req)
    texts = ev.greedy_continuations(lm, [p for _, p, _ in probes], max_new_tokens=max_new_tokens)
    out = []
    for (role, prompt, target), text in zip(probes, texts):
        # for the locality prompt "new" is its own answer and there is no "true" alternative
        true = req.target_true if role != "locality prompt" else ""
        view = next_token_view(lm, prompt, target, true, top_k=top_k)
        out.append({"role": role, "prompt": prompt, "target": target, "continuation": text, **view})
    return out


def explain(lm, result: EditResult, summary: str = "") -> dict[str, Any]:
    """Which matrices changed, at which layer, with what rank and norm (relative to the weight)."""
    params = dict(lm.model.named_parameters())
    rows = []
    for name in result.param_names:
        W = lm.spec.to_canonical(params[name].detach()).double()
        if name in result.deltas:
            D = lm.spec.to_canonical(result.deltas[name].detach()).double().to(W.device)
        else:
            R = result.factors[name].detach().double().to(W.device)
            D = R @ W - W
        s = torch.linalg.svdvals(D)
        tol = (s.max() * max(D.shape) * torch.finfo(torch.float32).eps) if s.numel() else 0.0
        rank = int((s > tol).sum()) if s.numel() else 0
        dn, wn = float(D.norm()), float(W.norm())
        rows.append({"param": name, "layer": lm.spec.layer_of(name), "shape": list(D.shape), "rank": rank,
                     "delta_norm": dn, "weight_norm": wn, "rel_norm": dn / wn if wn > 0 else None,
                     "spectral_norm": float(s.max()) if s.numel() else 0.0, "max_abs": float(D.abs().max()),
                     "kind": "additive" if name in result.deltas else "multiplicative (W <- R W)"})
    scalars = {k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool)) and
               not (isinstance(v, float) and not math.isfinite(v))}
    return {"method": result.method, "summary": summary, "params": rows, "info": scalars,
            "seconds": float(result.seconds), "config": result.config,
            "adaptor": result.adaptor.summary() if result.adaptor is not None else None}


def compute_result(lm, spec: Mapping[str, Any], *, cache_dir: str | None = None, seed: int = 0,
                   opened: list | None = None) -> EditResult:
    """One edit of ``spec`` (``{"method", "overrides", "request"}``) on ``lm`` as it is now, with the config a run of
    the method on this model would use (:func:`editors.presets.build_config`: preset, then the overrides).

    An editor whose result is an adaptor patch (GRACE) stays attached to the model so that the patch acts when it is
    applied: it is appended to ``opened`` for the caller to ``close()``, or closed here when ``opened`` is None."""
    config, _ = build_config(spec["method"], lm.name, spec.get("overrides"))
    editor = get_editor_class(spec["method"])(lm, config, cache_dir=cache_dir, seed=seed)
    editor.prepare()
    try:
        result = editor.edit([request_from_dict(spec["request"])])
    except BaseException:
        editor.close()
        raise
    if opened is not None:
        opened.append(editor)
    else:
        editor.close()
    return result


def playground_edit(lm, payload: Mapping[str, Any], cache: MutableMapping[str, EditResult] | None = None, *,
                    cache_size: int = 16, heartbeat: Callable[[], None] | None = None) -> dict[str, Any]:
    """Compute one playground edit (see the module docstring). ``payload``::

        {"model": str, "method": str, "overrides": {...}, "request": {EditRequest fields},
         "stack": [{"method", "overrides", "request"}, ...], "top_k": 5, "max_new_tokens": 12, "seed": 0,
         "stack_jobs": [job ids of the stacked edits]}

    (``stack_jobs`` is not read here: the web app keeps it so that the URL's job alone reopens the stack.)

    Returns ``{"probes": [{role, prompt, target, continuation, top, p_new, p_true, ...} before/after],
    "explanation": {...}, "stack_depth": int, "seconds": float}``. The model is left exactly as it was.
    """
    t0 = time.perf_counter()
    cache = {} if cache is None else cache
    model_name = str(payload.get("model", "default"))
    top_k = int(payload.get("top_k", 5))
    max_new = int(payload.get("max_new_tokens", 12))
    seed = int(payload.get("seed", 0))
    stack = [dict(s) for s in payload.get("stack", [])]
    spec = {"method": payload["method"], "overrides": dict(payload.get("overrides") or {}),
            "request": dict(payload["request"])}
    req = request_from_dict(spec["request"])
    get_editor_class(spec["method"])  # an unknown method fails before any model work
    undos = []
    opened: list = []  # editors with an adaptor attached (closed at the end; their results are not cached)
    try:
        for i, s in enumerate(stack):
            key = spec_key(model_name, stack[:i + 1])
            res = cache.get(key)
            if res is None:
                res = compute_result(lm, s, seed=seed, opened=opened)
                if res.adaptor is None:
                    cache[key] = res
            undos.append(apply_result(lm, res))
            if heartbeat:
                heartbeat()
        before = measure(lm, req, top_k=top_k, max_new_tokens=max_new)
        key = spec_key(model_name, [*stack, spec])
        result = cache.get(key)
        if result is None:
            result = compute_result(lm, spec, seed=seed, opened=opened)
            if result.adaptor is None:
                cache[key] = result
        if heartbeat:
            heartbeat()
        explanation = explain(lm, result, get_editor_class(spec["method"]).summary)
        undos.append(apply_result(lm, result))
        after = measure(lm, req, top_k=top_k, max_new_tokens=max_new)
    finally:
        for undo in reversed(undos):
            undo(lm.model)
        for editor in opened:
            editor.close()
    while len(cache) > cache_size:  # oldest first (dicts keep insertion order)
        cache.pop(next(iter(cache)))
    probes = [{"role": b["role"], "prompt": b["prompt"], "target": b["target"], "before": b, "after": a}
              for b, a in zip(before, after)]
    return {"probes": probes, "explanation": explanation, "stack_depth": len(stack) + 1,
            "request": req.to_dict(), "method": spec["method"], "seconds": time.perf_counter() - t0}


__all__ = ["playground_edit", "request_from_dict", "measure", "explain", "next_token_view", "ROLES"]
