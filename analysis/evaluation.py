"""Edit evaluation as in ../shared/guides/EVALUATION.md (EasyEdit definitions), batched.

Protocols (every stored number carries one):
  * ``tf_token_acc``: feed ``prompt + " " + target`` (teacher forcing); at each target position take the argmax of
    the previous position's logits; score = mean(argmax == target token). Reliability (edit prompt, target_new),
    generality (rephrases, target_new) and locality (locality prompt: argmax tokens at the answer positions compared
    with the UNEDITED model's argmax tokens at the same positions).
  * ``prob_margin``: CounterFact success, 1 if log P(target_new) > log P(target_true) (sum over target tokens).
  * ``gen_exact``: greedy generation starts with the target (what a person sees in the playground).

Logits are computed only at the positions the metric needs (the unembedding is the most expensive matmul of a
small model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from editors.models import LoadedModel
from editors.requests import EditRequest

TF = "tf_token_acc"
MARGIN = "prob_margin"
GEN = "gen_exact"
PROTOCOLS = (TF, MARGIN, GEN)


@dataclass(frozen=True)
class TFOut:
    """Teacher-forced result for one (prompt, target) pair."""

    target_ids: tuple[int, ...]
    argmax_ids: tuple[int, ...]
    logprob: float  # sum of log p(target token | prefix)

    @property
    def token_acc(self) -> float:
        if not self.target_ids:
            return 0.0
        return sum(a == t for a, t in zip(self.argmax_ids, self.target_ids)) / len(self.target_ids)


def encode_pair(tok, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``" " + target`` (target without its leading space)."""
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    t = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    return list(p), list(t)


@torch.no_grad()
def teacher_forced(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 64
                   ) -> list[TFOut]:
    """Teacher-forced argmax and log-probability of each target after its prompt (batched, right-padded)."""
    assert len(prompts) == len(targets)
    model, tok = lm.model, lm.tokenizer
    base = model.base_model
    unembed = model.get_output_embeddings()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    pairs = [encode_pair(tok, p, t) for p, t in zip(prompts, targets)]
    out: list[TFOut | None] = [None] * len(pairs)
    # sort by length so that batches pad little
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seqs = [pairs[i][0] + pairs[i][1][:-1] for i in idx]  # the last target token is never an input
        width = max(len(s) for s in seqs)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        rows, cols = [], []
        for r, (i, s) in enumerate(zip(idx, seqs)):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
            lp, lt = len(pairs[i][0]), len(pairs[i][1])
            for j in range(lt):
                rows.append(r)
                cols.append(lp - 1 + j)
        dev = lm.device
        h = base(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
        logits = unembed(h[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]).float()
        logp = torch.log_softmax(logits, dim=-1)
        # every target token of the batch at once: one transfer of argmaxes and one of per-prompt sums (no
        # host sync per prompt)
        tgt_all = torch.tensor([t for i in idx for t in pairs[i][1]], device=dev)
        seg = torch.tensor([r for r, i in enumerate(idx) for _ in pairs[i][1]], device=dev)
        tok_lp = logp.gather(1, tgt_all[:, None]).squeeze(1)
        sums = torch.zeros(len(idx), device=dev, dtype=tok_lp.dtype).index_add_(0, seg, tok_lp).tolist()
        am_all = logits.argmax(-1).tolist()
        k = 0
        for r, i in enumerate(idx):
            tgt = pairs[i][1]
            out[i] = TFOut(tuple(tgt), tuple(am_all[k:k + len(tgt)]), float(sums[r]))
            k += len(tgt)
    return out  # type: ignore[return-value]


@torch.no_grad()
def greedy_continuations(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 8, *,
                         batch_size: int = 32) -> list[str]:
    """Greedy continuation text of each prompt (left-padded batches; padding side restored afterwards)."""
    model, tok = lm.model, lm.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    texts: list[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            chunk = list(prompts[s:s + batch_size])
            enc = tok(chunk, return_tensors="pt", padding=True).to(lm.device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                texts.append(tok.decode(row, skip_special_tokens=True))
    finally:
        tok.padding_side = side
    return texts


def starts_with_target(text: str, target: str) -> bool:
    return text.strip().lower().startswith(target.strip().lower())


# ---------------------------------------------------------------------------------------------------------------
# locality reference: the UNEDITED model's argmax tokens at the answer positions
# ---------------------------------------------------------------------------------------------------------------
LocalityReference = dict[tuple[str, str], tuple[int, ...]]


def locality_pairs(requests: Iterable[EditRequest]) -> list[tuple[str, str]]:
    pairs = []
    for r in requests:
        pairs.extend(zip(r.locality_prompts, r.locality_answers))
    return pairs


def locality_reference(lm: LoadedModel, pairs: Sequence[tuple[str, str]], *, batch_size: int = 64
                       ) -> LocalityReference:
    """Argmax tokens of the (unedited) model at each locality answer's positions. Compute BEFORE any edit."""
    uniq = list(dict.fromkeys(pairs))
    outs = teacher_forced(lm, [p for p, _ in uniq], [a for _, a in uniq], batch_size=batch_size)
    return {pair: o.argmax_ids for pair, o in zip(uniq, outs)}


def locality_scores(lm: LoadedModel, pairs: Sequence[tuple[str, str]], reference: LocalityReference, *,
                    batch_size: int = 64) -> list[float]:
    """Agreement of the current model's argmax tokens with ``reference`` at each pair's answer positions."""
    missing = [p for p in pairs if p not in reference]
    if missing:
        raise KeyError(f"locality pair {missing[0]!r} has no reference from the unedited model")
    outs = teacher_forced(lm, [p for p, _ in pairs], [a for _, a in pairs], batch_size=batch_size)
    scores = []
    for pair, o in zip(pairs, outs):
        ref = reference[pair]
        scores.append(sum(a == b for a, b in zip(o.argmax_ids, ref)) / max(1, len(ref)))
    return scores


# ---------------------------------------------------------------------------------------------------------------
# per-request evaluation in long form
# ---------------------------------------------------------------------------------------------------------------
def evaluate_requests(lm: LoadedModel, requests: Sequence[EditRequest], reference: LocalityReference, *,
                      protocols: Sequence[str] = (TF,), batch_size: int = 64, gen_tokens: int = 8) -> list[dict]:
    """Rows ``{case_id, metric, protocol, value}`` for every request: metric in reliability / generality / locality.

    Generality averages over a request's rephrases; locality over its locality prompts. Requests without
    rephrases or locality prompts simply have no row for that metric.
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol {unknown[0]!r}; valid: {', '.join(PROTOCOLS)}")
    rows: list[dict] = []
    # one teacher-forced pass over every prompt that needs target_new (and target_true for the margin)
    rel_prompts = [(r, "reliability", r.prompt) for r in requests]
    gen_prompts = [(r, "generality", p) for r in requests for p in r.rephrase_prompts]
    items = rel_prompts + gen_prompts
    if TF in protocols or MARGIN in protocols:
        new = teacher_forced(lm, [p for _, _, p in items], [r.target_new for r, _, _ in items], batch_size=batch_size)
        true = None
        if MARGIN in protocols:
            with_true = [i for i, (r, _, _) in enumerate(items) if r.target_true]
            t_out = teacher_forced(lm, [items[i][2] for i in with_true], [items[i][0].target_true for i in with_true],
                                   batch_size=batch_size)
            true = dict(zip(with_true, t_out))
        acc: dict[tuple[str, str, str], list[float]] = {}
        for i, (r, metric, _) in enumerate(items):
            if TF in protocols:
                acc.setdefault((r.case_id, metric, TF), []).append(new[i].token_acc)
            if true is not None and i in true:
                acc.setdefault((r.case_id, metric, MARGIN), []).append(float(new[i].logprob > true[i].logprob))
        rows.extend({"case_id": c, "metric": m, "protocol": p, "value": sum(v) / len(v)}
                    for (c, m, p), v in acc.items())
    if GEN in protocols:
        texts = greedy_continuations(lm, [p for _, _, p in items], max_new_tokens=gen_tokens)
        acc = {}
        for (r, metric, _), text in zip(items, texts):
            acc.setdefault((r.case_id, metric), []).append(float(starts_with_target(text, r.target_new)))
        rows.extend({"case_id": c, "metric": m, "protocol": GEN, "value": sum(v) / len(v)} for (c, m), v in acc.items())
    # locality (tf protocol only: agreement with the unedited model)
    lp = [(r, p, a) for r in requests for p, a in zip(r.locality_prompts, r.locality_answers)]
    if lp:
        scores = locality_scores(lm, [(p, a) for _, p, a in lp], reference, batch_size=batch_size)
        acc2: dict[str, list[float]] = {}
        for (r, _, _), s in zip(lp, scores):
            acc2.setdefault(r.case_id, []).append(s)
        rows.extend({"case_id": c, "metric": "locality", "protocol": TF, "value": sum(v) / len(v)}
                    for c, v in acc2.items())
    return rows


def summarize(rows: Sequence[dict]) -> dict[tuple[str, str], float]:
    """Mean value per (metric, protocol)."""
    acc: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        acc.setdefault((row["metric"], row["protocol"]), []).append(row["value"])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def editing_score(reliability: float, generality: float, locality: float) -> float:
    """AGRADE's Editing Score: harmonic mean of the three (0 if any is 0)."""
    vals = (reliability, generality, locality)
    if min(vals) <= 0:
        return 0.0
    return 3.0 / sum(1.0 / v for v in vals)
