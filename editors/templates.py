"""Context templates of the ROME / MEMIT family (METHODS.md 0.2): ``"{}"`` plus prefixes sampled from the model.

A template is a string with exactly one ``"{}"`` where an edit prompt goes. :func:`context_template_groups` samples
``"<text>. {}"`` prefixes (ROME ``get_context_templates``), seeded and cached on disk under
:func:`editors.cache.cache_root`, keyed by the unedited model's hash and every parameter; :func:`parse_template_spec`
reads a spec ("rome", "memit", "length:n_gen,..."); :func:`as_template_groups` turns a flat list (one group, ROME's
plain mean) or a list of lists (MEMIT's groups) into groups.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Sequence

import torch

from .cache import cache_path
from .models import LoadedModel

log = logging.getLogger(__name__)

#: words the template generations start from (EasyEdit rome_main.py / memit_main.py ``get_context_templates``)
TEMPLATE_STARTS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
#: named template specs: ``(length, n_gen)`` pairs; ``length`` counts the start word's tokens too (``generate_fast``
#: ``max_out_len``), ``n_gen`` is split evenly over the start words. ROME: 10 of length 5 + 10 of length 10 (21
#: templates with "{}"); MEMIT/AlphaEdit/EMMET/PMET: 5 of length 10 (6 templates, in two groups).
TEMPLATE_SPECS: dict[str, tuple[tuple[int, int], ...]] = {"rome": ((5, 10), (10, 10)), "memit": ((10, 5),)}

_TEMPLATE_FORMAT_VERSION = 1


def parse_template_spec(spec) -> tuple[tuple[int, int], ...]:
    """``(length, n_gen)`` pairs of a spec: a name of :data:`TEMPLATE_SPECS`, ``"length:n_gen,..."`` or pairs.

    Raises:
        ValueError: an unknown name, a malformed string, a length < 1 or a negative count.
    """
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
    pairs = parse_template_spec(spec)
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


def as_template_groups(templates) -> list[list[str]]:
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


__all__ = ["TEMPLATE_STARTS", "TEMPLATE_SPECS", "parse_template_spec", "context_template_groups", "context_templates",
           "as_template_groups"]
