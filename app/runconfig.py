"""The run config: everything that defines one sequential run, validated before anything runs or is written.

A :class:`RunConfig` is stored verbatim as the run's ``config_json`` (:meth:`RunConfig.to_dict`), read back with
:meth:`RunConfig.from_dict`, and changed from text (``--set run.FIELD=VALUE``, forms) with :meth:`RunConfig.replace`;
names and values are checked by the same code as the method configs' (:mod:`editors.fields`). The method's own
config is made by :func:`editors.presets.build_config` (:meth:`RunConfig.method_config`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from analysis import evaluation as ev
from editors.base import ConfigError, EditorConfig
from editors.fields import check_choice, check_names, check_range, coerce, coerce_fields, field_help, help_meta
from editors.models import DTYPE_CHOICES
from editors.presets import build_config

#: values of ``RunConfig.locality_probes``
PROBE_CHOICES = ("builtin", "none")
#: GLUE tasks a run's ``general`` field may name (analysis.general)
GLUE_TASKS = ("sst2", "mrpc", "rte", "cola")


def general_tasks(spec: str) -> tuple[tuple[str, ...], str | None]:
    """(tasks, glue_dir) for :func:`analysis.general.general_abilities` from a run's ``general`` field: a comma list
    of "builtin", "builtin/<task>", "glue", GLUE task names, or "glue:DIR" (all GLUE tasks, files in DIR)."""
    tasks: list[str] = []
    glue_dir = None
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        if item.startswith("glue:"):
            glue_dir = item[5:]
            tasks.append("glue")
        else:
            tasks.append(item)
    return tuple(dict.fromkeys(tasks)), glue_dir


#: the cost / fidelity trade-off of the long-run fields, for ``python -m app methods`` and the README
LONG_RUN_NOTE = """\
Long runs (run fields, --set run.FIELD=VALUE or `run --checkpoints/--retention-sample/--dtype`):
  Exact retention (retention_sample=0) re-scores every edit made so far at every checkpoint: N edits with a
  checkpoint every E steps cost ~N^2/(2E) request evaluations (10,000 edits, E=10: 5 million).
  checkpoint_schedule=geometric checkpoints after steps 1,2,5,10,20,50,...: exact retention then costs ~1.9 N in
  all, but the curves have ~3 points per decade and a collapse is located only to within a factor 2-2.5.
  retention_sample=K re-scores K edits per checkpoint (one from each of K equal parts of the run, seeded): cost
  K per checkpoint, dense curves, but the retention means are estimates (standard error ~ sd/sqrt(K), at most
  0.5/sqrt(K) for a 0/1 score) and per-edit retention is known only for the sampled edits.
  Store rows follow the evaluations (a sample: ~5K per checkpoint). dtype=bfloat16 halves memory on a GPU; edit maths
  stays float32, and each update is rounded to bf16 once when applied (an update below bf16's resolution of a
  weight, ~0.4% of it, is lost for that weight)."""


def geometric_steps(n_steps: int) -> list[int]:
    """Steps 1, 2, 5, 10, 20, 50, ... ({1,2,5}·10^k) up to ``n_steps``, and ``n_steps`` itself."""
    out, k = set(), 1
    while k <= n_steps:
        out.update(m * k for m in (1, 2, 5) if m * k <= n_steps)
        k *= 10
    return sorted(out | {n_steps}) if n_steps >= 1 else []


def parse_schedule(spec: str) -> tuple[str, tuple[int, ...]]:
    """``("every", ())``, ``("geometric", ())`` or ``("list", steps)`` for a ``checkpoint_schedule`` value.

    Raises:
        ConfigError: anything else (the message lists the forms).
    """
    text = str(spec).strip()
    if text in ("every", "geometric"):
        return text, ()
    try:
        steps = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        steps = ()
    if not steps or steps[0] < 1:
        raise ConfigError(f"checkpoint_schedule must be 'every', 'geometric' or a comma list of step numbers >= 1, "
                          f"got {spec!r}")
    return "list", steps


def checkpoint_steps(config: "RunConfig", n_steps: int) -> list[int]:
    """The steps (1-based) after which a run of ``n_steps`` steps checkpoints; always includes ``n_steps``."""
    mode, steps = parse_schedule(config.checkpoint_schedule)
    if mode == "geometric":
        return geometric_steps(n_steps)
    if mode == "list":
        return sorted({s for s in steps if s <= n_steps} | {n_steps})
    every = config.eval_every
    return sorted(set(range(every, n_steps + 1, every) if every else ()) | {n_steps})


def retention_priorities(seed: int, n: int) -> np.ndarray:
    """Fixed per-edit priorities in [0, 1) for :func:`stratified_sample` (edit ``i`` gets the same one in every
    run with this seed, whatever ``n``)."""
    return np.random.default_rng([int(seed) % 2 ** 32, 0x5A3]).random(n)


def stratified_sample(n_done: int, k: int, priorities: np.ndarray) -> list[int]:
    """Indices (sorted) of the edits ``[0, n_done)`` a checkpoint re-scores: all when ``k == 0`` or ``n_done <= k``;
    else ``[0, n_done)`` is split into ``k`` ranges ``[floor(j n / k), floor((j + 1) n / k))`` and the edit with the
    smallest priority of each range is taken, one per range, so every part of the run's history keeps its share."""
    if k <= 0 or n_done <= k:
        return list(range(n_done))
    bounds = (np.arange(k + 1) * n_done) // k
    return [int(lo + np.argmin(priorities[lo:hi])) for lo, hi in zip(bounds[:-1], bounds[1:])]


@dataclass
class RunConfig:
    """Everything that defines one sequential run (stored verbatim as the run's ``config_json``)."""

    model: str = field(default="default", metadata=help_meta(
        "'default' (the embedded SmolLM2-135M-Instruct), a local model directory, or a Hugging Face hub id."))
    method: str = field(default="rome", metadata=help_meta(
        "Editing method (registry name, see `python -m app methods`)."))
    method_overrides: dict = field(default_factory=dict, metadata=help_meta(
        "Method config fields to change, {field: value}; values may be strings (coerced to the field's type)."))
    data: str = field(default="builtin", metadata=help_meta(
        "Edit requests: 'builtin', 'counterfact:PATH', 'zsre:PATH' or a PATH (JSON / JSONL of requests)."))
    n_edits: int = field(default=10, metadata=help_meta("How many edits to make (the first n requests of the data)."))
    batch_size: int = field(default=1, metadata=help_meta("Edits per step (one editor call per step)."))
    eval_every: int = field(default=10, metadata=help_meta(
        "Checkpoint every this many steps (retention, locality probes, general abilities, weights); the last step "
        "is always a checkpoint. 0 = only at the end."))
    checkpoint_schedule: str = field(default="every", metadata=help_meta(
        "When checkpoints happen: 'every' = every eval_every steps; 'geometric' = after steps 1, 2, 5, 10, 20, 50, "
        "100, ... ({1,2,5}x10^k; eval_every is ignored), so a run of N steps has ~3 log10(N) checkpoints and exact "
        "retention costs ~1.9 N request evaluations in all instead of ~N^2 / (2 eval_every); or an explicit comma "
        "list of step numbers, e.g. '1,3,10,30,100'. The last step is always a checkpoint."))
    retention_sample: int = field(default=0, metadata=help_meta(
        "0 = exact retention: every edit made so far is re-scored at every checkpoint (cost grows with the edits "
        "so far). K >= 1 = re-score a seeded, stratified sample of at most K of them: the edits so far split into K "
        "equal index ranges, one edit drawn from each with priorities fixed by the seed (early edits stay "
        "represented; the same edits are drawn whenever the count is the same); the retention means are then "
        "estimates with a standard error of about sd / sqrt(K). Cost per checkpoint: K evaluations."))
    snapshot_every: int = field(default=0, metadata=help_meta(
        "Resume snapshots (app/snapshots.py: the edited matrices, the editor's state, the RNG states; the newest two "
        "are kept, deleted when the run finishes): K >= 1 = after every K-th step and at every checkpoint; 0 = at "
        "checkpoints only; -1 = never. A killed, interrupted or cancelled run continues from its newest snapshot "
        "with `python -m app resume RUN_ID` (rows after it are dropped and made again). Cost per snapshot: the "
        "edited matrices in float32 (ROME on the default model 3.5 MB, MEMIT 17.7 MB) written to disk."))
    seed: int = field(default=0, metadata=help_meta("Seed of torch / numpy / random and of the editor."))
    device: str | None = field(default=None, metadata=help_meta(
        "'cpu', 'cuda', 'cuda:1', 'mps'; None = the best available."))
    dtype: str = field(default="auto", metadata=help_meta(
        "Weights' dtype: 'auto' (bfloat16 on a CUDA GPU with bf16 support, float32 elsewhere), 'float32', "
        "'bfloat16', 'float16'. Edit maths is float32 (float64 where a method needs it) whatever this is; updates "
        "are rounded to this dtype once, when applied."))
    runs_dir: str = field(default="runs", metadata=help_meta("Directory of the run store (runs.sqlite)."))
    protocols: tuple[str, ...] = field(default=(ev.TF, ev.MARGIN), metadata=help_meta(
        "Evaluation protocols of edit and retention metrics: tf_token_acc, prob_margin, gen_exact "
        "(EVALUATION.md), wild_gen (WILD: free generation to the first '.', newline or end token, exact match and "
        "token-F1 (wild_gen_f1) of the normalised answer; locality against the unedited model's generation). "
        "Locality is tf_token_acc agreement with the unedited model, plus wild_gen's when it is selected."))
    immediate_protocols: tuple[str, ...] = field(default=(), metadata=help_meta(
        "Protocols of the IMMEDIATE evaluation (each edit scored right after it is made); () = all of "
        "`protocols`. A subset keeps the others for checkpoints (retention): at 1,000 edits on a CPU, wild_gen "
        "after every edit is ~85% of the run's time (13 free generations of up to 50 tokens per CounterFact "
        "record), so the lifelong study preset scores edits immediately with the teacher-forced protocols and "
        "with wild_gen at its checkpoints."))
    wild_context: str = field(default="none", metadata=help_meta(
        "wild_gen input: 'none' = the raw prompt (the WILD authors' default, question-only), 'qa' = their QA "
        "instruction, 'chat' = the chat template with a system prompt (what EasyEdit's WILD evaluation uses)."))
    wild_max_tokens: int = field(default=ev.WILD_MAX_TOKENS, metadata=help_meta(
        "wild_gen: at most this many generated tokens when no stop token comes (WILD authors: 50; EasyEdit: 512)."))
    wild_retention_max: int = field(default=200, metadata=help_meta(
        "wild_gen retention at intermediate checkpoints scores a fixed, seeded subset of at most this many of the "
        "planned requests (the same ones at every checkpoint, those already edited); the last checkpoint scores every "
        "edit. 0 = every edit at every checkpoint. Teacher-forced protocols always score every edit."))
    eval_batch_size: int = field(default=64, metadata=help_meta("Prompts per forward pass during evaluation."))
    locality_probes: str = field(default="builtin", metadata=help_meta(
        "Fixed locality probe set scored at every checkpoint against the unedited model: 'builtin' or 'none'."))
    general: str = field(default="builtin", metadata=help_meta(
        "General-ability probes at the start and at every checkpoint: 'none' or a comma list of 'builtin', "
        "'builtin/<task>', 'glue' (../shared/data/glue), 'glue:DIR', 'sst2', 'mrpc', 'rte', 'cola'."))
    general_n: int | None = field(default=None, metadata=help_meta("Examples per general task (None = all)."))
    weights: bool = field(default=True, metadata=help_meta(
        "Weight diagnostics of every edited matrix at checkpoints (norms, condition numbers, effective rank of W "
        "and of W - W0) plus their singular values as an artifact."))
    update_angles: bool = field(default=True, metadata=help_meta(
        "After every step: angles between the step's update of each matrix and its previous update (flat and "
        "between dominant singular directions) and the change accumulated before it (interference)."))
    hidden_states: bool = field(default=False, metadata=help_meta(
        "Store the probe prompts' last-token hidden states at the edited layers (before their first edit and at "
        "every checkpoint) as artifacts, with projection-free shift numbers (kind='hidden_shift'); projections are "
        "computed later by the analysis layer."))
    pre_eval: bool = field(default=True, metadata=help_meta(
        "Score every planned request on the unedited model first (kind='pre', n_edits=0)."))
    use_preset: bool = field(default=True, metadata=help_meta(
        "Start from the (method, model) preset when one exists; method_overrides apply on top."))
    preset_variant: str = field(default="", metadata=help_meta(
        "A named variant of the method's preset applied on top of it, e.g. 'reference' (what the reference "
        "implementation computes; `python -m app methods NAME` lists a method's variants and what they change); "
        "'' = none."))
    cache_dir: str | None = field(default=None, metadata=help_meta(
        "Cache root for statistics (covariances, ...); None = $EDITBENCH_CACHE or ~/.cache/editbench."))
    label: str = field(default="", metadata=help_meta("Free-text name shown in run lists."))

    # ---- validation --------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`~editors.registry.UnknownMethodError` for an unknown method and :class:`ConfigError`
        for an unknown method field or a bad value (messages list the valid choices)."""
        self.method_config()
        for name in ("n_edits", "batch_size", "eval_batch_size", "wild_max_tokens"):
            check_range(name, getattr(self, name), 1, integer=True)
        for name in ("eval_every", "wild_retention_max"):
            check_range(name, getattr(self, name), 0, integer=True)
        parse_schedule(self.checkpoint_schedule)
        check_range("retention_sample", self.retention_sample, 0, integer=True, note="0 = every edit")
        check_range("snapshot_every", self.snapshot_every, -1, integer=True, note="0 = at checkpoints, -1 = never")
        check_choice("dtype", self.dtype, DTYPE_CHOICES)
        bad = [p for p in self.protocols if p not in ev.PROTOCOLS]
        if bad or not self.protocols:
            raise ConfigError(f"unknown protocol {bad[0] if bad else '(none given)'!r}; valid: "
                              f"{', '.join(ev.PROTOCOLS)}")
        extra = [p for p in self.immediate_protocols if p not in self.protocols]
        if extra:
            raise ConfigError(f"immediate_protocols: {extra[0]!r} is not one of the run's protocols "
                              f"({', '.join(self.protocols)}); immediate_protocols must be a subset of them")
        check_choice("wild_context", self.wild_context, ev.WILD_CONTEXTS)
        check_choice("locality_probes", self.locality_probes, PROBE_CHOICES)
        if self.general != "none":
            tasks, glue_dir = general_tasks(self.general)
            bad = [t for t in tasks if not (t in ("builtin", "glue", *GLUE_TASKS) or t.startswith("builtin/"))]
            if bad or not tasks:
                raise ConfigError(f"general: unknown task {bad[0] if bad else self.general!r}; valid: none, or a "
                                  f"comma list of builtin, builtin/<task>, glue, glue:DIR, {', '.join(GLUE_TASKS)}")
            if glue_dir is not None and not os.path.isdir(glue_dir):
                raise ConfigError(f"general: GLUE folder {glue_dir!r} does not exist")
        if not str(self.data).strip():
            raise ConfigError("data must name a source: builtin, counterfact:PATH, zsre:PATH or PATH")
        check_range("general_n", self.general_n, 1, optional=True)

    def method_config(self, model_name: str | None = None) -> tuple[EditorConfig, int | None]:
        """The method config this run uses and the preset version (None without a preset):
        :func:`editors.presets.build_config` for ``model_name`` (default: the run's ``model``)."""
        return build_config(self.method, model_name or self.model, self.method_overrides,
                            use_preset=self.use_preset, variant=self.preset_variant)

    # ---- conversions -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["protocols"] = list(self.protocols)
        d["immediate_protocols"] = list(self.immediate_protocols)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` listing the fields."""
        check_names(cls, d, what="run field")
        kw = dict(d)
        if "protocols" in kw:
            kw["protocols"] = coerce(kw["protocols"], (), "tuple[str, ...]")
        if "immediate_protocols" in kw:
            kw["immediate_protocols"] = coerce(kw["immediate_protocols"] or (), (), "tuple[str, ...]")
        if kw.get("method_overrides") is None:
            kw["method_overrides"] = {}
        return cls(**kw)

    @classmethod
    def field_help(cls) -> list[dict]:
        """[{name, type, default, help}] of every field (for forms and ``--help``)."""
        return field_help(cls)

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with run fields changed; string values are coerced to the field's type."""
        return dataclasses.replace(self, **coerce_fields(type(self), changes, self, what="run field"))


__all__ = ["RunConfig", "general_tasks", "PROBE_CHOICES", "GLUE_TASKS", "ConfigError", "DTYPE_CHOICES",
           "geometric_steps", "parse_schedule", "checkpoint_steps", "retention_priorities", "stratified_sample",
           "LONG_RUN_NOTE"]
