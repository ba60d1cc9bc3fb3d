"""Edit evaluation as in ../shared/guides/EVALUATION.md (EasyEdit definitions), batched.

Protocols (every stored number carries one):
  * ``tf_token_acc``: feed ``prompt + " " + target`` (teacher forcing); at each target position take the argmax of
    the previous position's logits; score = mean(argmax == target token). Reliability (edit prompt, target_new),
    generality (rephrases, target_new) and locality (locality prompt: argmax tokens at the answer positions compared
    with the UNEDITED model's argmax tokens at the same positions).
  * ``prob_margin``: CounterFact success, 1 if log P(target_new) > log P(target_true) (sum over target tokens).
  * ``gen_exact``: greedy generation starts with the target (what a person sees in the playground).
  * ``wild_gen`` (WILD, Yang et al., "The Mirage of Model Editing", ACL 2025; the authors' code
    WanliYoung/Revisit-Editing-Evaluation ``test_prediction_acc_real``): free greedy generation with no teacher
    forcing and no truncation to the target's length, stopped after the first token whose text holds "." or a
    newline, an end-of-sequence token, or ``wild_max_tokens``; scored by exact match of the SQuAD-normalised answer
    (``wild_gen``) and by its token-F1 (``wild_gen_f1``, ours: the paper's main score is an LLM judge, which needs a
    network). Locality: the generated token ids equal the UNEDITED model's (``wild_gen``), F1 of the two texts
    (``wild_gen_f1``). Selecting ``wild_gen`` gives rows of both labels.

Logits are computed only at the positions the metric needs (the unembedding is the most expensive matmul of a
small model).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import string
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from editors.models import LoadedModel, weights_fingerprint
from editors.requests import EditRequest

TF = "tf_token_acc"
MARGIN = "prob_margin"
GEN = "gen_exact"
WILD = "wild_gen"
WILD_F1 = "wild_gen_f1"
#: protocols a run may select
PROTOCOLS = (TF, MARGIN, GEN, WILD)
#: every protocol label a stored row may carry (selecting ``wild_gen`` also gives ``wild_gen_f1`` rows)
PROTOCOL_LABELS = (TF, MARGIN, GEN, WILD, WILD_F1)
#: one line per label, for forms and pages
PROTOCOL_HELP = {
    TF: "teacher-forced token accuracy (EasyEdit)",
    MARGIN: "P(new) > P(old) (CounterFact success)",
    GEN: "greedy generation (8 tokens) starts with the target",
    WILD: "WILD: free greedy generation to the first '.', newline or end token (at most wild_max_tokens), exact "
          "match of the normalised answer; locality: same tokens as the unedited model",
    WILD_F1: "WILD generation scored by token-F1 of the normalised answer (locality: F1 against the unedited "
             "model's text)",
}
#: input contexts of ``wild_gen``: the raw prompt (the WILD authors' default 'question-only'), their QA instruction,
#: or the tokenizer's chat template with a system prompt (what EasyEdit's WILD evaluation always uses)
WILD_CONTEXTS = ("none", "qa", "chat")
#: the WILD authors' generation budget (EasyEdit: 512)
WILD_MAX_TOKENS = 50


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
                      protocols: Sequence[str] = (TF,), batch_size: int = 64, gen_tokens: int = 8,
                      wild: Mapping[str, WildOut] | None = None, wild_context: str = "none",
                      wild_max_tokens: int = WILD_MAX_TOKENS) -> list[dict]:
    """Rows ``{case_id, metric, protocol, value}`` for every request: metric in reliability / generality / locality.

    Generality averages over a request's rephrases; locality over its locality prompts. Requests without
    rephrases or locality prompts simply have no row for that metric. ``wild`` is the unedited model's WILD
    generation of the locality prompts (:func:`wild_reference`), needed for WILD locality (KeyError without it).
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
    lp = [(r, p, a) for r in requests for p, a in zip(r.locality_prompts, r.locality_answers)]
    if WILD in protocols:
        rows.extend(_wild_rows(lm, items, lp, wild or {}, wild_context, wild_max_tokens, batch_size))
    # locality (tf protocol: agreement with the unedited model)
    if lp and (TF in protocols or MARGIN in protocols or GEN in protocols):
        scores = locality_scores(lm, [(p, a) for _, p, a in lp], reference, batch_size=batch_size)
        acc2: dict[str, list[float]] = {}
        for (r, _, _), s in zip(lp, scores):
            acc2.setdefault(r.case_id, []).append(s)
        rows.extend({"case_id": c, "metric": "locality", "protocol": TF, "value": sum(v) / len(v)}
                    for c, v in acc2.items())
    return rows


# ---------------------------------------------------------------------------------------------------------------
# WILD: free generation, normalised answers
# ---------------------------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation (the WILD authors' fallback scorer): lower case, drop punctuation, drop the
    articles a / an / the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD v1.1 token-F1 of the normalised strings (whitespace tokens, multiset overlap); two empty strings score
    1, one empty string 0."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    overlap = sum((Counter(p) & Counter(g)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(p), overlap / len(g)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class WildOut:
    """One WILD generation: the generated token ids up to and including the stop token, and the answer text
    (decoded, then one trailing ".", one newline and the end-of-sequence text stripped, in the authors' order)."""

    ids: tuple[int, ...]
    text: str


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids = set()
    for src in (lm.tokenizer.eos_token_id, getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return ids


def wild_stop_mask(lm: LoadedModel) -> torch.Tensor:
    """Boolean ``[vocab]``: the tokens after which a WILD generation stops (their text holds "." or a newline, as
    HF ``stop_strings=[".", "\\n"]`` fires for single characters, or they end a sequence)."""
    tok = lm.tokenizer
    n = max(len(tok), lm.model.get_output_embeddings().weight.shape[0])
    eos = frozenset(_eos_ids(lm))
    # decoding the whole vocabulary is ~0.4 s (49k tokens): kept per tokenizer, for its size, n and end tokens
    # (an immediate WILD evaluation after every edit of a 1,000-edit run asked for it 1,000 times)
    key = (len(tok), n, eos)
    try:
        hit = _STOP_MASKS.get(tok)
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        hit = None
    if hit is not None and hit[0] == key:
        return hit[1].clone()
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[i for i, t in enumerate(texts) if "." in t or "\n" in t]] = True
    for i in eos:
        if i < n:
            mask[i] = True
    try:
        _STOP_MASKS[tok] = (key, mask.clone())
    except TypeError:
        pass
    return mask


_STOP_MASKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _StopAfterMask(StoppingCriteria):
    """Per row: the last token is in the stop mask."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, input_ids, scores, **kwargs):
        return self.mask.to(input_ids.device)[input_ids[:, -1]]


def wild_inputs(lm: LoadedModel, prompt: str, context: str = "none") -> list[int]:
    """Token ids WILD generation starts from: the raw prompt, the authors' QA instruction, or the chat template."""
    tok = lm.tokenizer
    if context == "none":
        return list(tok(prompt, add_special_tokens=True)["input_ids"])
    if context == "qa":
        return list(tok(f"Please answer the question:\n\nQ: {prompt}\nA:", add_special_tokens=True)["input_ids"])
    if context == "chat":
        text = tok.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."},
                                        {"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])
    raise ValueError(f"unknown wild context {context!r}; valid: {', '.join(WILD_CONTEXTS)}")


def wild_answer_text(lm: LoadedModel, ids: Sequence[int]) -> str:
    text = lm.tokenizer.decode(list(ids), skip_special_tokens=False)
    eos = lm.tokenizer.eos_token or ""
    for tail in (".", "\n", eos):
        if tail and text.endswith(tail):
            text = text[:-len(tail)]
    return text


@torch.no_grad()
def wild_generate(lm: LoadedModel, prompts: Sequence[str], *, context: str = "none",
                  max_new_tokens: int = WILD_MAX_TOKENS, batch_size: int = 64,
                  stop_mask: torch.Tensor | None = None) -> list[WildOut]:
    """Greedy WILD generation for each prompt: batches of similar length, LEFT-padded (the padding side is
    restored afterwards, also after an error), KV cache, each row cut after its first stop token."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model, tok = lm.model, lm.tokenizer
    mask = wild_stop_mask(lm) if stop_mask is None else stop_mask
    stop_list = StoppingCriteriaList([_StopAfterMask(mask)])
    inputs = [wild_inputs(lm, p, context) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    out: list[WildOut | None] = [None] * len(inputs)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(inputs[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(inputs[i]):] = torch.tensor(inputs[i])
                att[r, width - len(inputs[i]):] = 1
            gen = model.generate(input_ids=ids.to(lm.device), attention_mask=att.to(lm.device),
                                 max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                                 stopping_criteria=stop_list)
            for r, i in enumerate(idx):
                row = gen[r, width:].tolist()
                cut = next((j for j, t in enumerate(row) if bool(mask[t])), len(row) - 1)
                kept = tuple(row[:cut + 1])
                out[i] = WildOut(kept, wild_answer_text(lm, kept))
    finally:
        tok.padding_side = side
    return out  # type: ignore[return-value]


WildReference = dict[str, WildOut]


def wild_reference(lm: LoadedModel, prompts: Iterable[str], *, context: str = "none",
                   max_new_tokens: int = WILD_MAX_TOKENS, batch_size: int = 64,
                   cache_root: str | None = None) -> WildReference:
    """The UNEDITED model's WILD generation of each prompt (compute before any edit): WILD locality compares with it.

    With ``cache_root`` the result is kept in ``<cache_root>/wild_reference/`` and reused by the next call with the
    same weights (their fingerprint NOW, not at load time), prompts in the same order, settings, batch size, device,
    dtype, torch version and thread count (every input of the batched greedy generation, so a hit is what a new
    generation would give): 1,000 CounterFact records are ~10,000 generations, the same for every method of a study.
    An unreadable or mismatched cache file is regenerated (and overwritten), never trusted.
    """
    uniq = list(dict.fromkeys(prompts))
    path = None
    if cache_root is not None:
        dtype = next(lm.model.parameters()).dtype
        key = {"format": 1, "weights": weights_fingerprint(lm.model), "prompts": uniq, "context": context,
               "max_new_tokens": int(max_new_tokens), "batch_size": int(batch_size), "device": str(lm.device),
               "dtype": str(dtype), "torch": torch.__version__, "threads": torch.get_num_threads()}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        path = os.path.join(cache_root, "wild_reference", f"{digest}.json")
        cached = _read_wild_cache(path, key)
        if cached is not None:
            return cached
    outs = wild_generate(lm, uniq, context=context, max_new_tokens=max_new_tokens, batch_size=batch_size)
    ref = dict(zip(uniq, outs))
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"key": key, "ids": [list(o.ids) for o in outs], "text": [o.text for o in outs]}, f)
        os.replace(tmp, path)
    return ref


def _read_wild_cache(path: str, key: dict) -> WildReference | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        if data["key"] != key or not (len(data["ids"]) == len(data["text"]) == len(key["prompts"])):
            raise ValueError("its key or length differs from this call's")
        return {p: WildOut(tuple(int(t) for t in ids), str(text))
                for p, ids, text in zip(key["prompts"], data["ids"], data["text"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logging.getLogger(__name__).warning("WILD reference cache %s ignored (%s); generating again", path, exc)
        return None


def wild_locality_scores(lm: LoadedModel, prompts: Sequence[str], reference: Mapping[str, WildOut], *,
                         context: str = "none", max_new_tokens: int = WILD_MAX_TOKENS, batch_size: int = 64,
                         stop_mask: torch.Tensor | None = None) -> list[tuple[float, float]]:
    """(same token ids as the reference, token-F1 of the two texts) for each prompt."""
    missing = [p for p in prompts if p not in reference]
    if missing:
        raise KeyError(f"locality prompt {missing[0]!r} has no WILD reference from the unedited model")
    outs = wild_generate(lm, prompts, context=context, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         stop_mask=stop_mask)
    return [(float(o.ids == reference[p].ids), token_f1(o.text, reference[p].text)) for p, o in zip(prompts, outs)]


def _wild_rows(lm, items, lp, reference, context, max_tokens, batch_size) -> list[dict]:
    mask = wild_stop_mask(lm)
    outs = wild_generate(lm, [p for _, _, p in items], context=context, max_new_tokens=max_tokens,
                         batch_size=batch_size, stop_mask=mask)
    acc: dict[tuple[str, str, str], list[float]] = {}
    for (r, metric, _), o in zip(items, outs):
        acc.setdefault((r.case_id, metric, WILD), []).append(exact_match(o.text, r.target_new))
        acc.setdefault((r.case_id, metric, WILD_F1), []).append(token_f1(o.text, r.target_new))
    if lp:
        scores = wild_locality_scores(lm, [p for _, p, _ in lp], reference, context=context,
                                      max_new_tokens=max_tokens, batch_size=batch_size, stop_mask=mask)
        for (r, _, _), (same, f1) in zip(lp, scores):
            acc.setdefault((r.case_id, "locality", WILD), []).append(same)
            acc.setdefault((r.case_id, "locality", WILD_F1), []).append(f1)
    return [{"case_id": c, "metric": m, "protocol": p, "value": sum(v) / len(v)} for (c, m, p), v in acc.items()]


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
