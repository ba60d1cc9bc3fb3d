"""General abilities by label-word scoring: does editing break what the model could do besides the edited facts?

Every item is a prompt with candidate answers; the prediction is the candidate with the highest log-probability of
``" " + candidate`` after the prompt (summed over its tokens; tokenised as :func:`analysis.evaluation.encode_pair`).
When all candidates of an item are single tokens one forward pass per prompt scores them all.

Two sources:

* the BUILT-IN probe set ``analysis/resources/general_probes.json`` (shipped with the project; tasks sentiment,
  entailment, arithmetic, knowledge). Items were written for this project and kept only where the unedited default
  model (SmolLM2-135M-Instruct) answers correctly, with each task's answers balanced over the candidate positions
  so a constant guess stays at chance: the baseline is near 1 and a fall towards chance is what editing did. Tasks
  the default model could not do above chance were left out.
* GLUE subsets read BY PATH from ``../shared/data/glue/{sst2,mrpc,rte,cola}.jsonl`` (200 class-balanced validation
  examples each; see ../shared/data/README.md), zero- or k-shot, metrics accuracy, F1 (MRPC, positive class
  "equivalent") and Matthews correlation (CoLA) as in GLUE.

``general_abilities`` returns long-form rows ``task, metric, value, n, chance`` (``chance`` = expected accuracy of a
uniform guess, for the collapse floor).
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from analysis.evaluation import encode_pair, teacher_forced
from analysis.weights import cpu_threads
from editors.models import LoadedModel

log = logging.getLogger(__name__)

RESOURCES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resources")
BUILTIN_PATH = os.path.join(RESOURCES, "general_probes.json")
GLUE_TASKS = ("sst2", "mrpc", "rte", "cola")
#: ../shared/data/glue beside the repository root (override with $EDITBENCH_GLUE_DIR or ``glue_dir=``)
DEFAULT_GLUE_DIR = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                                                "data", "glue"))


@dataclass(frozen=True)
class ProbeItem:
    """One multiple-choice item: ``candidates[answer]`` is correct; ``task`` groups items."""

    task: str
    prompt: str
    candidates: tuple[str, ...]
    answer: int


# ---------------------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def score_candidates(lm: LoadedModel, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *,
                     batch_size: int = 32) -> list[list[float]]:
    """Summed log-probability of ``" " + c`` after each prompt for each of its candidates ``c``."""
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    tok = lm.tokenizer
    scores: list[list[float]] = [[0.0] * len(c) for c in candidates]
    single, multi = [], []
    enc: list[tuple[list[int], list[list[int]]]] = []
    for i, (p, cands) in enumerate(zip(prompts, candidates)):
        pairs = [encode_pair(tok, p, c) for c in cands]
        enc.append((pairs[0][0], [t for _, t in pairs]))
        (single if all(len(t) == 1 for _, t in pairs) else multi).append(i)
    # single-token candidates: one pass per prompt, read the next-token distribution at its last position
    model = lm.model
    base, unembed = model.base_model, model.get_output_embeddings()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = sorted(single, key=lambda i: len(enc[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(enc[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            p = enc[i][0]
            ids[r, :len(p)] = torch.tensor(p)
            mask[r, :len(p)] = 1
        h = base(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).last_hidden_state
        last = mask.sum(1) - 1
        logp = torch.log_softmax(unembed(h[torch.arange(len(idx)), last.to(h.device)]).float(), dim=-1).cpu()
        for r, i in enumerate(idx):
            scores[i] = [float(logp[r, t[0]]) for t in enc[i][1]]
    # multi-token candidates: teacher forcing over every (prompt, candidate) pair
    flat = [(i, j) for i in multi for j in range(len(candidates[i]))]
    if flat:
        outs = teacher_forced(lm, [prompts[i] for i, _ in flat], [candidates[i][j] for i, j in flat],
                              batch_size=batch_size)
        for (i, j), o in zip(flat, outs):
            scores[i][j] = o.logprob
    return scores


def predict(lm: LoadedModel, items: Sequence[ProbeItem], *, batch_size: int = 32) -> np.ndarray:
    """Index of the highest-scoring candidate of every item."""
    sc = score_candidates(lm, [it.prompt for it in items], [it.candidates for it in items], batch_size=batch_size)
    return np.array([int(np.argmax(s)) for s in sc], dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------------
# built-in probes
# ---------------------------------------------------------------------------------------------------------------
def load_builtin(path: str | None = None) -> list[ProbeItem]:
    """Items of the built-in probe set (or of a file with the same format)."""
    with open(path or BUILTIN_PATH, encoding="utf-8") as f:
        data = json.load(f)
    items = []
    for k, rec in enumerate(data["items"]):
        cands = tuple(rec["candidates"])
        ans = int(rec["answer"])
        if not 0 <= ans < len(cands) or len(cands) < 2:
            raise ValueError(f"{path or BUILTIN_PATH}: item {k} has answer {ans} for {len(cands)} candidates")
        items.append(ProbeItem(rec["task"], rec["prompt"], cands, ans))
    return items


# ---------------------------------------------------------------------------------------------------------------
# GLUE
# ---------------------------------------------------------------------------------------------------------------
#: per task: (instruction-free template for one example, label words indexed by the GLUE label)
_GLUE_FORMAT = {
    "sst2": (lambda ex: f"Review: {ex['sentence'].strip()}\nSentiment:", ("negative", "positive")),
    "mrpc": (lambda ex: f"Sentence 1: {ex['sentence1'].strip()}\nSentence 2: {ex['sentence2'].strip()}\n"
                        f"Question: Do both sentences mean the same thing?\nAnswer:", ("no", "yes")),
    "rte": (lambda ex: f"{ex['sentence1'].strip()}\nQuestion: {ex['sentence2'].strip()} True or False?\nAnswer:",
            ("True", "False")),  # label 0 = entailment
    "cola": (lambda ex: f"Sentence: {ex['sentence'].strip()}\nQuestion: Is this sentence grammatically correct?\n"
                        f"Answer:", ("no", "yes")),
}


def glue_dir_default() -> str:
    return os.environ.get("EDITBENCH_GLUE_DIR", DEFAULT_GLUE_DIR)


def load_glue(task: str, glue_dir: str | None = None, *, n: int | None = None) -> list[dict]:
    """Records of ``{glue_dir}/{task}.jsonl`` (first ``n`` if given): dicts with ``sentence`` or
    ``sentence1``/``sentence2``, ``label`` and ``idx``."""
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; valid: {', '.join(GLUE_TASKS)}")
    path = os.path.join(glue_dir or glue_dir_default(), f"{task}.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"GLUE subset not found: {path} (pass glue_dir= or set $EDITBENCH_GLUE_DIR)")
    recs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                recs.append(json.loads(line))
            if n is not None and len(recs) >= n:
                break
    return recs


def glue_items(task: str, records: Sequence[dict], *, k_shot: int = 0, demos: Sequence[dict] | None = None,
               seed: int = 0) -> list[ProbeItem]:
    """Label-word items for GLUE records; with ``k_shot`` > 0 each prompt starts with k solved examples drawn
    class-balanced from ``demos`` (default: the other records of the same file), never the query itself."""
    fmt, words = _GLUE_FORMAT[task]
    pool = list(demos if demos is not None else records)
    rng = random.Random(seed)
    items = []
    for ex in records:
        prefix = ""
        if k_shot > 0:
            others = [d for d in pool if d.get("idx") != ex.get("idx")]
            by_label = {lab: [d for d in others if d["label"] == lab] for lab in range(len(words))}
            shots = []
            for j in range(k_shot):
                bucket = by_label[j % len(words)] or others
                shots.append(rng.choice(bucket))
            rng.shuffle(shots)
            prefix = "".join(f"{fmt(d)} {words[d['label']]}\n\n" for d in shots)
        items.append(ProbeItem(task, prefix + fmt(ex), tuple(words), int(ex["label"])))
    return items


# ---------------------------------------------------------------------------------------------------------------
# metrics and the entry point
# ---------------------------------------------------------------------------------------------------------------
def _metric_rows(task: str, items: Sequence[ProbeItem], pred: np.ndarray, extra: Sequence[str] = ()) -> list[dict]:
    from sklearn.metrics import f1_score, matthews_corrcoef
    y = np.array([it.answer for it in items])
    n = len(items)
    chance = float(np.mean([1.0 / len(it.candidates) for it in items])) if n else float("nan")
    rows = [{"task": task, "metric": "accuracy", "value": float((pred == y).mean()) if n else float("nan"), "n": n,
             "chance": chance}]
    if "f1" in extra:
        rows.append({"task": task, "metric": "f1", "value": float(f1_score(y, pred, pos_label=1, zero_division=0)),
                     "n": n, "chance": float("nan")})
    if "mcc" in extra:
        rows.append({"task": task, "metric": "mcc", "value": float(matthews_corrcoef(y, pred)), "n": n,
                     "chance": 0.0})
    return rows


def general_abilities(lm: LoadedModel, tasks: Sequence[str] = ("builtin",), n: int | None = None,
                      glue_dir: str | None = None, *, k_shot: int = 0, seed: int = 0, batch_size: int = 32,
                      builtin_path: str | None = None, threads: int | None = None) -> pd.DataFrame:
    """Scores of the current model on general-ability probes, all items of all tasks scored in one batched pass.

    Args:
        tasks: "builtin" (every built-in task plus an overall ``builtin`` row), "builtin/<task>" for one built-in
            task, GLUE task names ("sst2", "mrpc", "rte", "cola") or "glue" for all four.
        n: at most this many items per task (the first ones of the file); None = all. The built-in set (72
            items, one forward pass each) takes a few seconds on a CPU; each GLUE file has 200.
        glue_dir: folder of the GLUE ``.jsonl`` files (default ``../shared/data/glue`` or $EDITBENCH_GLUE_DIR).
        k_shot: solved examples in front of each GLUE prompt (0 = zero-shot).
        threads: cap on torch CPU threads for the call (``analysis.weights.cpu_threads``; None = as set). On the
            shared 2-core machine under load the built-in set took 4 s of CPU with one thread and 30 s with two.

    Returns:
        columns ``task, metric, value, n, chance``; metric "accuracy" for every task, plus "f1" (mrpc) and "mcc"
        (cola).
    """
    expanded: list[str] = []
    for t in tasks:
        expanded.extend(GLUE_TASKS if t == "glue" else [t])
    builtin = None
    groups: list[tuple[str, list[ProbeItem], tuple[str, ...]]] = []
    for t in dict.fromkeys(expanded):
        if t == "builtin" or t.startswith("builtin/"):
            builtin = builtin if builtin is not None else load_builtin(builtin_path)
            names = list(dict.fromkeys(it.task for it in builtin))
            want = names if t == "builtin" else [t.split("/", 1)[1]]
            for name in want:
                its = [it for it in builtin if it.task == name]
                if not its:
                    raise ValueError(f"unknown built-in task {name!r}; valid: {', '.join(names)}")
                groups.append((f"builtin/{name}", its[:n] if n is not None else its, ()))
            if t == "builtin":
                groups.append(("builtin", [], ()))  # overall row, filled below
        elif t in GLUE_TASKS:
            recs = load_glue(t, glue_dir)
            query = recs[:n] if n is not None else recs
            extra = ("f1",) if t == "mrpc" else ("mcc",) if t == "cola" else ()
            groups.append((t, glue_items(t, query, k_shot=k_shot, demos=recs, seed=seed), extra))
        else:
            raise ValueError(f"unknown task {t!r}; valid: builtin, builtin/<task>, glue, {', '.join(GLUE_TASKS)}")
    all_items = [it for _, its, _ in groups for it in its]
    with cpu_threads(threads if lm.device.type == "cpu" else None):
        pred = predict(lm, all_items, batch_size=batch_size) if all_items else np.zeros(0, dtype=np.int64)
    rows: list[dict] = []
    k = 0
    overall_items: list[ProbeItem] = []
    overall_pred: list[np.ndarray] = []
    for name, its, extra in groups:
        if name == "builtin":
            continue
        p = pred[k:k + len(its)]
        k += len(its)
        rows.extend(_metric_rows(name, its, p, extra))
        if name.startswith("builtin/"):
            overall_items.extend(its)
            overall_pred.append(p)
    if any(name == "builtin" for name, _, _ in groups) and overall_items:
        rows.extend(_metric_rows("builtin", overall_items, np.concatenate(overall_pred)))
    return pd.DataFrame(rows, columns=["task", "metric", "value", "n", "chance"])


__all__ = ["ProbeItem", "score_candidates", "predict", "load_builtin", "load_glue", "glue_items",
           "general_abilities", "GLUE_TASKS", "BUILTIN_PATH", "DEFAULT_GLUE_DIR"]
