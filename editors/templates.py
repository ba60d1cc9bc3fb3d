"""Context templates of the ROME / MEMIT family (METHODS.md 0.2): ``"{}"`` plus prefixes sampled from the model.

A template is a string with exactly one ``"{}"`` where an edit prompt goes. A config's ``context_templates`` value
is either a SPEC of templates to sample or the templates themselves (:func:`resolve_context_templates`):

* a spec: a name of :data:`TEMPLATE_SPECS` ("rome", "memit") or ``"length:n_gen,..."``;
  :func:`context_template_groups` samples ``"<text>. {}"`` prefixes (ROME / EasyEdit ``get_context_templates``),
  seeded, and caches them on disk under :func:`editors.cache.cache_root`, keyed by the unedited model's hash and
  every parameter;
* explicit templates (for a run that must use another implementation's templates, e.g. a reference comparison): a
  list (flat: one group, ROME's plain mean; a list of lists: MEMIT's groups), the same as a JSON string, or the path
  of a file (:func:`load_template_file`).

Sampling (EasyEdit ``generate_fast``, top-k 5): every row of every ``(length, n_gen)`` pair and start word goes into
ONE left-padded batch that grows by one token per step with the model's key/value cache, so a spec costs
``max length - 1`` forward calls (the ROME spec: 9) instead of one call per step per start word and length (65 in
format 1, the cause of slow first edits). The text is cleaned as the reference does (NFKD, ``"\n\n"`` -> space,
braces -> spaces).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from typing import Any, Sequence

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

#: 1: one sampling batch per (start word, length), whitespace collapsed; 2: one KV-cached batch for a whole spec,
#: the reference's text clean-up. A new version never reads an older version's cache files.
_TEMPLATE_FORMAT_VERSION = 2
#: file extensions :func:`load_template_file` reads (anything else in ``context_templates`` with a path separator
#: is also taken as a file)
TEMPLATE_FILE_EXTENSIONS = (".json", ".txt")


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
    """EasyEdit's clean-up of a sample (``generate_fast`` then ``get_context_templates``): NFKD, ``"\n\n"`` -> space,
    braces -> spaces (a template must keep exactly one ``"{}"``)."""
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    return text.replace("{", " ").replace("}", " ")


@torch.no_grad()
def _sample_rows(lm: LoadedModel, rows: Sequence[tuple[Sequence[int], int]], top_k: int, gen: torch.Generator
                 ) -> list[list[int]]:
    """Top-k samples for every ``(prompt ids, total length)`` row in ONE batch.

    The prompts are left-padded to a common width; each step feeds one new token per row with the model's key/value
    cache, and draws one ``[rows, k]`` multinomial on the CPU generator ``gen`` (the same draws on any device). A row
    keeps the first ``length - len(prompt)`` tokens drawn for it (the longest row sets the number of steps).
    """
    tok, model = lm.tokenizer, lm.model
    out = [list(p) for p, _ in rows]
    want = [max(0, int(n) - len(p)) for p, n in rows]
    n_steps = max(want, default=0)
    if n_steps == 0:
        return out
    B, width = len(rows), max(len(p) for p, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.full((B, width), pad, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for r, (p, _) in enumerate(rows):
        ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[r, width - len(p):] = 1
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    unembed = model.get_output_embeddings()
    cache = None
    for step in range(n_steps):
        o = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                             use_cache=True)
        cache = o.past_key_values
        logits = unembed(o.last_hidden_state[:, -1]).float()  # [B, vocab]
        top, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        probs = torch.softmax(top, dim=-1).cpu()
        pick = torch.multinomial(probs, 1, generator=gen).to(idx.device)
        new = idx.gather(1, pick)  # [B, 1]
        for r, t in enumerate(new[:, 0].tolist()):
            if step < want[r]:
                out[r].append(t)
        ids = new
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=mask.device)], dim=1)
        pos = pos[:, -1:] + 1
    return out


def context_template_groups(lm: LoadedModel, seed: int = 0, spec="rome", *,
                            starts: Sequence[str] = TEMPLATE_STARTS, top_k: int = 5,
                            cache_dir: str | None = None) -> list[list[str]]:
    """Sampled context templates in groups: ``[["{}"], [one group per (length, n_gen) of spec]]``.

    Each generated template is ``"<sampled text>. {}"``, the text cleaned as EasyEdit does (:func:`_clean_generation`).
    Sampling is top-k from the model in one KV-cached batch (module docstring), seeded with ``seed`` on a CPU
    generator, so it is deterministic for a given model, device and thread count. The result is cached on disk
    (``<cache>/context_templates/<model hash>/<key>.json``) keyed by the format version, the model hash, the seed,
    the spec, the start words and ``top_k``; a cached file is returned whatever the current weights.

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
    tok = lm.tokenizer
    prompt_ids = {s: tok(s, add_special_tokens=True)["input_ids"] for s in starts}
    # one row per sample, in the order the groups list them: (length, n_gen) pairs, then start words
    rows, where = [], []
    for g, (length, n_gen) in enumerate(pairs):
        for s in starts:
            for _ in range(n_gen // len(starts)):
                rows.append((prompt_ids[s], length))
                where.append(g)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    was_training = lm.model.training
    lm.model.eval()
    try:
        samples = _sample_rows(lm, rows, top_k, gen)
    finally:
        lm.model.train(was_training)
    sampled: list[list[str]] = [[] for _ in pairs]
    for g, ids in zip(where, samples):
        sampled[g].append(_clean_generation(tok.decode(ids, skip_special_tokens=True)) + ". {}")
    groups: list[list[str]] = [["{}"]] + [grp for grp in sampled if grp]
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"key": json.loads(key_src), "groups": groups}, fh, indent=1)
    os.replace(tmp, path)
    log.info("context templates (%s): %d generated, cached in %s", pairs, len(rows), path)
    return groups


def context_templates(lm: LoadedModel, seed: int = 0, spec="rome", *, starts: Sequence[str] = TEMPLATE_STARTS,
                      top_k: int = 5, cache_dir: str | None = None) -> list[str]:
    """Flat list of "{}"-templates, "{}" first (see :func:`context_template_groups`)."""
    groups = context_template_groups(lm, seed, spec, starts=starts, top_k=top_k, cache_dir=cache_dir)
    return [t for g in groups for t in g]


def load_template_file(path: str) -> list[list[str]]:
    """Template groups from a file.

    * ``.json``: a list of templates (one group), a list of lists (groups), or an object whose
      ``"context_templates"`` is one of those (e.g. ../shared/reference/rome_easyedit_cf0.json);
    * anything else: UTF-8 text, one template per line; a blank line starts a new group.

    Raises:
        ValueError: the file is missing or unreadable, or holds no valid templates (the message names the file).
    """
    if not os.path.isfile(path):
        raise ValueError(f"context-template file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"context-template file {path!r}: cannot read it ({exc})") from exc
    if path.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"context-template file {path!r}: not valid JSON ({exc})") from exc
        if isinstance(data, dict):
            if "context_templates" not in data:
                raise ValueError(f"context-template file {path!r}: a JSON object needs a 'context_templates' list")
            data = data["context_templates"]
    else:
        data, group = [], []
        for line in text.splitlines():
            if line.strip():
                group.append(line)
            elif group:
                data.append(group)
                group = []
        if group:
            data.append(group)
        if len(data) == 1:
            data = data[0]
    try:
        return as_template_groups(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"context-template file {path!r}: {exc}") from exc


def _explicit_templates(source: Any) -> list[list[str]] | None:
    """The groups ``source`` names explicitly (a list, a JSON list string, a file), or None for a sampling spec."""
    if isinstance(source, (list, tuple)):
        try:
            return as_template_groups(source)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"context templates: {exc}") from exc
    if not isinstance(source, str):
        raise ValueError(f"context templates must be a spec, a list of templates or a file path, got "
                         f"{type(source).__name__}")
    s = source.strip()
    if s.startswith("["):
        try:
            data = json.loads(s)
        except ValueError as exc:
            raise ValueError(f"context templates {source!r}: not a valid JSON list ({exc})") from exc
        return _explicit_templates(data)
    if s.lower().endswith(TEMPLATE_FILE_EXTENSIONS) or os.sep in s or "/" in s:
        return load_template_file(os.path.expanduser(s))
    return None


def check_template_source(source: Any) -> None:
    """Validate a config's ``context_templates`` without a model (configs call it in ``validate``).

    Raises:
        ValueError: an unknown spec, a malformed list, a missing or invalid file (the message says which).
    """
    if _explicit_templates(source) is None:
        parse_template_spec(source)


def resolve_context_templates(lm: LoadedModel, source: Any, seed: int = 0, *, cache_dir: str | None = None
                              ) -> list[list[str]]:
    """Template groups for a config's ``context_templates`` value (module docstring): the explicit templates it
    names, or the templates sampled for its spec by :func:`context_template_groups`. ROME flattens the groups (plain
    mean); the MEMIT family averages within groups, then over groups."""
    explicit = _explicit_templates(source)
    if explicit is not None:
        return explicit
    return context_template_groups(lm, seed, source, cache_dir=cache_dir)


def as_template_groups(templates) -> list[list[str]]:
    """A flat list is one group (ROME: plain mean); a list of lists is MEMIT's groups.

    Raises:
        ValueError: no templates, an empty group, a group that is not a list of strings, or a template without
            exactly one ``"{}"``.
    """
    templates = list(templates)
    if not templates:
        raise ValueError("at least one template is needed")
    if all(isinstance(t, str) for t in templates):
        groups = [templates]
    elif all(isinstance(g, (list, tuple)) for g in templates):
        groups = [list(g) for g in templates]
    else:
        raise ValueError("templates must be a list of strings or a list of lists of strings (groups), not a mix")
    for i, g in enumerate(groups):
        if not g:
            raise ValueError(f"template group {i} is empty")
        for t in g:
            if not isinstance(t, str):
                raise ValueError(f"template group {i} holds {t!r}, not a string")
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
    return groups


__all__ = ["TEMPLATE_STARTS", "TEMPLATE_SPECS", "TEMPLATE_FILE_EXTENSIONS", "parse_template_spec",
           "context_template_groups", "context_templates", "load_template_file", "check_template_source",
           "resolve_context_templates", "as_template_groups"]
