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

from analysis import evaluation as ev
from editors.base import ConfigError, EditorConfig
from editors.fields import check_names, coerce, coerce_fields, field_help, help_meta
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
    seed: int = field(default=0, metadata=help_meta("Seed of torch / numpy / random and of the editor."))
    device: str | None = field(default=None, metadata=help_meta(
        "'cpu', 'cuda', 'cuda:1', 'mps'; None = the best available."))
    runs_dir: str = field(default="runs", metadata=help_meta("Directory of the run store (runs.sqlite)."))
    protocols: tuple[str, ...] = field(default=(ev.TF, ev.MARGIN), metadata=help_meta(
        "Evaluation protocols of edit and retention metrics: tf_token_acc, prob_margin, gen_exact "
        "(EVALUATION.md). Locality is always tf_token_acc agreement with the unedited model."))
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
        for name in ("n_edits", "batch_size", "eval_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError(f"eval_every must be an integer >= 0, got {self.eval_every!r}")
        bad = [p for p in self.protocols if p not in ev.PROTOCOLS]
        if bad or not self.protocols:
            raise ConfigError(f"unknown protocol {bad[0] if bad else '(none given)'!r}; valid: "
                              f"{', '.join(ev.PROTOCOLS)}")
        if self.locality_probes not in PROBE_CHOICES:
            raise ConfigError(f"locality_probes must be one of {', '.join(PROBE_CHOICES)}, "
                              f"got {self.locality_probes!r}")
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
        if self.general_n is not None and self.general_n < 1:
            raise ConfigError(f"general_n must be >= 1 or None, got {self.general_n!r}")

    def method_config(self, model_name: str | None = None) -> tuple[EditorConfig, int | None]:
        """The method config this run uses and the preset version (None without a preset):
        :func:`editors.presets.build_config` for ``model_name`` (default: the run's ``model``)."""
        return build_config(self.method, model_name or self.model, self.method_overrides,
                            use_preset=self.use_preset, variant=self.preset_variant)

    # ---- conversions -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["protocols"] = list(self.protocols)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` listing the fields."""
        check_names(cls, d, what="run field")
        kw = dict(d)
        if "protocols" in kw:
            kw["protocols"] = coerce(kw["protocols"], (), "tuple[str, ...]")
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


__all__ = ["RunConfig", "general_tasks", "PROBE_CHOICES", "GLUE_TASKS", "ConfigError"]
