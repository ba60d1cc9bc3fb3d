"""The sequential run engine: edit a model step by step, never rolling back, and record everything in the run store.

Protocol (../shared/guides/EVALUATION.md, "Sequential editing"):

* edits arrive in steps of ``batch_size``; after each step the model is NOT restored;
* after each step: the immediate metrics of the edits just made (``kind="edit"``);
* every ``eval_every`` steps and at the end: RETENTION of every edit made so far (``kind="retention"``), locality
  on a fixed probe set against the UNEDITED model (``kind="locality"``), general abilities (``kind="general"``),
  weight diagnostics of every edited matrix against its original (``kind="weights"``) and timings
  (``kind="timing"``); optionally update angles (``kind="update_angle"``) and captured hidden states (artifacts);
* a NaN/Inf in an update, in the weights or in the logits stops the run as ``diverged``; every row recorded until
  then stays;
* resume snapshots (:mod:`app.snapshots`) at checkpoints (and every ``snapshot_every`` steps): a run that was
  killed, interrupted or cancelled continues from its newest one with :func:`resume_run` (``python -m app resume``),
  making the same edits and rows an uninterrupted run makes.

Library code: usable from a notebook (``run_sequential(RunConfig(...), lm=lm)`` leaves ``lm`` exactly as it was),
from the CLI and from the app's worker. The run config is :class:`app.runconfig.RunConfig`.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import random
import re
import socket
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from analysis import evaluation as ev
from analysis import general
from analysis.angles import flat_angle, update_angles
from analysis.collapse import INDICATORS, PERFORMANCE, detect_collapse
from analysis.hidden import capture_states, shift_metrics
from analysis.weights import matrix_stats, preserved_output_change, singular_values
from editors import data
from editors.base import ConfigError, EditError, Editor, EditorConfig, apply_result
from editors.cache import cache_root
from editors.registry import UnknownMethodError, get_editor_class
from editors.requests import EditRequest

from . import snapshots as snaps
from .procs import Heartbeat
from .provenance import package_versions
from .runconfig import RunConfig, checkpoint_steps, general_tasks, retention_priorities, stratified_sample
from .store import TERMINAL, RunStore

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict], None]

#: the metric kinds collapse detection reads (analysis.collapse's performance signals and indicators)
COLLAPSE_KINDS = tuple(dict.fromkeys(s.kind for s in (*PERFORMANCE, *INDICATORS) if s.kind))

#: protocol label of general-ability rows: the candidate answer with the highest log-probability (analysis.general)
GENERAL_PROTOCOL = "logprob_choice"


def load_requests(source: str, n: int | None) -> list[EditRequest]:
    """The first ``n`` edit requests of the run's ``data`` source (:func:`editors.data.load_requests`)."""
    return list(data.load_requests(source, n))


#: token bounds of one request (``EDITBENCH_MAX_PROMPT_TOKENS`` / ``EDITBENCH_MAX_TARGET_TOKENS``): a prompt or a
#: target far beyond any fact is a broken record, and it would cost the editor's optimisation memory and time
DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_TARGET_TOKENS = 512, 64


def check_token_counts(requests: Sequence[EditRequest], tokenizer, *, source: str = "data") -> None:
    """Refuse a request whose prompt (or rephrase / locality prompt) or target has more tokens than the bounds.

    Raises:
        RequestError: naming the record (its case_id), the field, its token count and the bound.
    """
    from editors.requests import RequestError

    def bound(name: str, default: int) -> int:
        try:
            return max(1, int(os.environ.get(name, default)))
        except ValueError:
            return default
    max_prompt = bound("EDITBENCH_MAX_PROMPT_TOKENS", DEFAULT_MAX_PROMPT_TOKENS)
    max_target = bound("EDITBENCH_MAX_TARGET_TOKENS", DEFAULT_MAX_TARGET_TOKENS)
    for r in requests:
        fields = [("prompt", r.prompt, max_prompt, "EDITBENCH_MAX_PROMPT_TOKENS"),
                  ("target_new", " " + r.target_new, max_target, "EDITBENCH_MAX_TARGET_TOKENS"),
                  ("target_true", " " + r.target_true if r.target_true else "", max_target,
                   "EDITBENCH_MAX_TARGET_TOKENS")]
        fields += [(f"rephrase_prompts[{i}]", p, max_prompt, "EDITBENCH_MAX_PROMPT_TOKENS")
                   for i, p in enumerate(r.rephrase_prompts)]
        fields += [(f"locality_prompts[{i}]", p, max_prompt, "EDITBENCH_MAX_PROMPT_TOKENS")
                   for i, p in enumerate(r.locality_prompts)]
        for name, text, limit, env in fields:
            if text and len(text) > limit:  # a token has at least one character: shorter texts cannot be over
                n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
                if n > limit:
                    raise RequestError(source, f"case_id {r.case_id}", name,
                                       f"{n} tokens, over the limit of {limit} ({env})")


def builtin_probes() -> list[tuple[str, str]]:
    """The fixed locality probe set as ``(prompt, answer)`` pairs (:func:`editors.data.builtin_probes`)."""
    return [(str(p), str(a)) for p, a in data.builtin_probes()]


def general_abilities(lm, spec: str, n: int | None):
    """General-ability rows of :func:`analysis.general.general_abilities` for a run's ``general`` field."""
    tasks, glue_dir = general_tasks(spec)
    return general.general_abilities(lm, tasks=tasks, n=n, glue_dir=glue_dir)


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------
class Diverged(RuntimeError):
    """NaN/Inf in an update, the weights or the logits: the run stops as ``diverged``."""


class Cancelled(Exception):
    pass


_NONFINITE = re.compile(r"\b(nan|inf)\b", re.IGNORECASE)
#: messages of numeric blow-ups raised inside an editor (torch, numpy, Python floats)
_OVERFLOW = re.compile(r"overflow|\b(nan|inf)\b|non-?finite|not finite|infinit", re.IGNORECASE)


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if device.type == "mps":
        try:
            return torch.mps.driver_allocated_memory() / 2 ** 20
        except Exception:  # pragma: no cover
            return float("nan")
    try:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2 ** 20 if platform.system() == "Darwin" else rss / 2 ** 10
    except ImportError:  # pragma: no cover - Windows
        return float("nan")


def _flat_numbers(obj: Any, prefix: str = "", out: dict | None = None, limit: int = 200) -> dict[str, float]:
    """Numeric scalar leaves of nested dicts / lists, keyed by dotted path (at most ``limit``)."""
    out = {} if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flat_numbers(v, f"{prefix}.{k}" if prefix else str(k), out, limit)
    elif isinstance(obj, (list, tuple)) and len(obj) <= 64:
        for i, v in enumerate(obj):
            _flat_numbers(v, f"{prefix}.{i}", out, limit)
    elif isinstance(obj, bool):
        out[prefix] = float(obj)
    elif isinstance(obj, (int, float, np.number)):
        out[prefix] = float(obj)
    elif isinstance(obj, torch.Tensor) and obj.numel() == 1:
        out[prefix] = float(obj.item())
    return out


def _array_leaves(obj: Any, prefix: str = "", out: dict | None = None) -> dict[str, np.ndarray]:
    """Array-like leaves (tensors, arrays, numeric lists) of a nested mapping, keyed ``a|b|c``."""
    out = {} if out is None else out
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _array_leaves(v, f"{prefix}|{k}" if prefix else str(k), out)
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().to("cpu", torch.float32 if obj.is_floating_point() else obj.dtype).numpy()
    elif isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(x, (int, float)) for x in obj):
        out[prefix] = np.asarray(obj)
    return out


def _mean_rows(rows: Sequence[dict], **common: Any) -> list[dict]:
    """Aggregate rows (case_id NULL) from per-case evaluation rows, one per (metric, protocol)."""
    return [{**common, "metric": m, "protocol": p, "value": v, "case_id": None}
            for (m, p), v in ev.summarize(rows).items()]


class _LogitGuard:
    """Forward hook on the unembedding that notes non-finite logits during evaluation."""

    def __init__(self, lm):
        self.lm = lm
        self.bad = False
        self._handle = None

    def _hook(self, module, args, output):
        o = output[0] if isinstance(output, tuple) else output
        # NaN / Inf propagate into the sum; one reduction is far cheaper than isfinite().all() on [n, vocab]
        if isinstance(o, torch.Tensor) and o.numel() and not bool(torch.isfinite(o.detach().sum())):
            self.bad = True

    def __enter__(self):
        self.bad = False
        self._handle = self.lm.model.get_output_embeddings().register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


@torch.no_grad()
def _logits_finite(lm, prompts: Sequence[str]) -> bool:
    """Unpadded forward passes: are the logits finite? (confirms what the guard saw at padded positions)"""
    for p in prompts:
        ids = lm.tokenizer(p, return_tensors="pt")["input_ids"].to(lm.device)
        if not bool(torch.isfinite(lm.model(input_ids=ids).logits).all()):
            return False
    return True


def capture_hidden_states(lm, prompts: Sequence[str], layers: Sequence[int], *, batch_size: int = 32
                          ) -> dict[str, np.ndarray]:
    """Last-token residual-stream states after each decoder layer in ``layers``: ``{"layer{i}": [n, d]}``
    (:func:`analysis.hidden.capture_states`)."""
    return {f"layer{i}": capture_states(lm, list(prompts), i, "last", batch_size=batch_size) for i in layers}


class SequentialRun:
    """One run's state. Use :func:`run_sequential`; this class exists to keep the steps readable.

    Lifecycle: ``__init__`` stores the config (no model work); :meth:`execute` runs :meth:`setup` (requests, the
    model when none was given, the editor and its ``prepare``, the locality reference), then :meth:`edit_step` per
    step and :meth:`checkpoint` every ``eval_every`` steps, and at the end records the status and, when the model
    was given, :meth:`restore` s it. ``lm`` and ``editor`` are None until :meth:`setup` has made them.
    """

    heartbeat_every = 10.0

    def __init__(self, config: RunConfig, store: RunStore, run_id: str, method_config: EditorConfig, *, lm=None,
                 progress: ProgressFn | None = None, should_cancel: Callable[[], bool] | None = None,
                 resume: Mapping[str, Any] | None = None):
        self.config = config
        self.resume = resume  # a loaded snapshot (app.snapshots.load_snapshot) to continue from, or None
        self.store = store
        self.run_id = run_id
        self.method_config = method_config
        self.given_lm = lm
        self.lm = lm
        self.progress = progress
        self.should_cancel = should_cancel
        self.editor: Editor | None = None  # made by setup()
        self.requests: list[EditRequest] = []
        self.probes: list[tuple[str, str]] = []
        self.reference: ev.LocalityReference = {}
        self.wild_reference: ev.WildReference = {}  # the unedited model's WILD generations (wild_gen only)
        self.wild_subset: set[int] | None = None  # request indices of intermediate WILD retention (None = all)
        self.W0: dict[str, torch.Tensor] = {}  # exact copies of every edited parameter before the first edit
        self._preserve_refs: dict[str, tuple[torch.Tensor, float] | None] = {}  # param -> (C, tr(W0 C W0ᵀ))
        self.prev_update: dict[str, tuple[int, torch.Tensor]] = {}  # param -> (n_edits, last update)
        self.hidden_baseline: dict[int, np.ndarray] = {}  # layer -> states before it was first edited
        self.edit_seconds = 0.0
        self.diag_seconds = 0.0  # weight / angle / hidden-state diagnostics (not evaluation, not editing)
        self.eval_seconds_total = 0.0  # retention, locality probes, general abilities, immediate metrics
        self.peak_mem = 0.0
        self.n_done = 0  # edits applied to the model
        self.n_recorded = 0  # edits whose rows are committed to the store (what the run's n_edits_done says)
        self.step = 0
        self.started = time.time()
        self.priorities = np.zeros(0)  # per-edit priorities of the retention sample (setup)

    # ---- helpers ------------------------------------------------------------------------------------------
    def _notify(self, phase: str, **info: Any) -> None:
        if self.progress is not None:
            total = len(self.requests) or self.config.n_edits
            self.progress(self.n_done, total, {"run_id": self.run_id, "phase": phase, "step": self.step,
                                               "n_edits": self.n_done, **info})

    def _cancel_wanted(self) -> bool:
        if self.should_cancel is not None and self.should_cancel():
            return True
        return self.store.cancel_requested(self.run_id)

    def _edited_layers(self) -> list[int]:
        layers = {self.lm.spec.layer_of(n) for n in self.W0}
        return sorted(i for i in layers if i is not None)

    def _guarded(self, what: str, fn: Callable, *args, **kw):
        """Run an evaluation; non-finite logits (confirmed without padding) raise :class:`Diverged`."""
        with _LogitGuard(self.lm) as guard:
            out = fn(*args, **kw)
        if guard.bad:
            probe = [r.prompt for r in self.requests[:2]] or [p for p, _ in self.probes[:2]]
            if not _logits_finite(self.lm, probe):
                raise Diverged(f"non-finite logits during {what} after {self.n_done} edits (step {self.step})")
            log.warning("non-finite logits at padded positions during %s ignored (unpadded logits are finite)", what)
        return out

    def _evaluate(self, requests: Sequence[EditRequest], what: str, protocols: Sequence[str] | None = None
                  ) -> list[dict]:
        cfg = self.config
        protocols = tuple(cfg.protocols if protocols is None else protocols)
        if not requests or not protocols:
            return []
        return self._guarded(what, ev.evaluate_requests, self.lm, requests, self.reference,
                             protocols=protocols, batch_size=cfg.eval_batch_size, wild=self.wild_reference,
                             wild_context=cfg.wild_context, wild_max_tokens=cfg.wild_max_tokens)

    def _retention(self, indices: Sequence[int]) -> list[dict]:
        """Retention of the edits ``indices`` (every edit so far, or the run's retention sample); WILD at
        intermediate checkpoints on its own fixed subset (``wild_retention_max``) of the edits made so far."""
        done = [self.requests[i] for i in indices]
        if self.wild_subset is None or self.n_done >= len(self.requests):
            return self._evaluate(done, "retention evaluation")
        rest = [p for p in self.config.protocols if p != ev.WILD]
        sub = [self.requests[i] for i in sorted(self.wild_subset) if i < self.n_done]
        return self._evaluate(done, "retention evaluation", rest) + self._evaluate(sub, "WILD retention", (ev.WILD,))

    def _general_rows(self, step: int) -> list[dict]:
        if self.config.general == "none":
            return []
        df = self._guarded("general abilities", general_abilities, self.lm, self.config.general,
                           self.config.general_n)
        rows = []
        common = {"n_edits": self.n_done, "step": step, "kind": "general", "protocol": GENERAL_PROTOCOL}
        for r in df.to_dict("records"):
            task = str(r.get("task", ""))
            prefix = f"{task}/" if task else ""
            rows.append({**common, "metric": f"{prefix}{r['metric']}", "value": r["value"]})
            chance = r.get("chance")
            if r["metric"] == "accuracy" and chance is not None and not math.isnan(float(chance)):
                rows.append({**common, "metric": f"{prefix}chance", "value": float(chance)})
        return rows

    # ---- phases -------------------------------------------------------------------------------------------
    def setup(self) -> list[dict]:
        cfg = self.config
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2 ** 32)
        torch.manual_seed(cfg.seed)
        self.requests = load_requests(cfg.data, cfg.n_edits)
        if not self.requests:
            raise ConfigError(f"data source {cfg.data!r} gave no edit requests")
        if len(self.requests) < cfg.n_edits:
            log.warning("data source %s has %d requests; %d were asked for", cfg.data, len(self.requests),
                        cfg.n_edits)
        self.store.update_run(self.run_id, n_edits_planned=len(self.requests))
        if self.lm is None:
            from editors.models import load_model
            self._notify("load_model")
            self.lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        dtype = str(next(self.lm.model.parameters()).dtype).replace("torch.", "")
        if cfg.dtype != "auto" and dtype != cfg.dtype:
            raise ConfigError(f"the run asks for dtype {cfg.dtype} but the model given is {dtype}")
        versions = (self.store.get_run(self.run_id).get("package_versions") or {})
        self.store.update_run(self.run_id, model=self.lm.name, model_hash=self.lm.model_hash,
                              device=str(self.lm.device), package_versions={**versions, "model_dtype": dtype})
        self.priorities = retention_priorities(cfg.seed, len(self.requests))
        check_token_counts(self.requests, self.lm.tokenizer, source=cfg.data)
        editor_cls = get_editor_class(cfg.method)
        self.editor = editor_cls(self.lm, self.method_config, cache_dir=cfg.cache_dir, seed=cfg.seed)
        self._notify("prepare")
        self.editor.prepare()
        params = dict(self.lm.model.named_parameters())
        for name in self.editor.watched_params():  # matrices an adaptor sits on: their (flat) diagnostics
            if name in params:
                self.W0.setdefault(name, params[name].detach().clone())
        # the locality reference of the UNEDITED model: requests' locality prompts and the fixed probe set
        self.probes = builtin_probes() if cfg.locality_probes == "builtin" else []
        pairs = ev.locality_pairs(self.requests) + list(self.probes)
        self._notify("reference")
        self.reference = ev.locality_reference(self.lm, pairs, batch_size=cfg.eval_batch_size) if pairs else {}
        if ev.WILD in cfg.protocols:
            self.wild_reference = ev.wild_reference(self.lm, [p for p, _ in pairs], context=cfg.wild_context,
                                                    max_new_tokens=cfg.wild_max_tokens,
                                                    batch_size=cfg.eval_batch_size,
                                                    cache_root=cache_root(cfg.cache_dir))
            if cfg.wild_retention_max and len(self.requests) > cfg.wild_retention_max:
                rng = random.Random(cfg.seed)
                self.wild_subset = set(rng.sample(range(len(self.requests)), cfg.wild_retention_max))
        rows: list[dict] = []
        if self.resume is not None:  # the pre-edit rows of this run are already in the store
            return rows
        if cfg.pre_eval:
            self._notify("pre_eval")
            pre = self._evaluate(self.requests, "pre-edit evaluation")
            common = {"n_edits": 0, "step": 0, "kind": "pre"}
            rows += [{**common, **r} for r in pre] + _mean_rows(pre, **common)
        if cfg.general != "none":
            self._notify("general")
        rows += self._general_rows(0)
        return rows

    def _state_prompts(self) -> list[str]:
        return [p for p, _ in self.probes] or [r.prompt for r in self.requests[:64]]

    def edit_step(self, batch: Sequence[EditRequest]) -> None:
        cfg, lm = self.config, self.lm
        self.step += 1
        if lm.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(lm.device)
        t0 = time.perf_counter()
        try:
            result = self.editor.edit(batch)
        except EditError as exc:
            if _NONFINITE.search(str(exc)):
                raise Diverged(str(exc)) from exc
            raise
        except (RuntimeError, OverflowError, FloatingPointError, ValueError) as exc:
            # an overflow or a NaN inside the editor's own maths (e.g. torch's Adam with lr=3e38: "value cannot be
            # converted to type float without overflow") is a divergence, not a failure of the program
            if _OVERFLOW.search(str(exc)):
                raise Diverged(f"{type(exc).__name__} inside the edit: {exc}") from exc
            raise
        params = dict(lm.model.named_parameters())
        touched = result.param_names
        for name in touched:
            if name not in self.W0 and name in params:
                self.W0[name] = params[name].detach().clone()
        before = ({n: params[n].detach().clone() for n in touched if n in params} if cfg.update_angles else {})
        artifacts = []
        t_capture = time.perf_counter()
        if cfg.hidden_states:  # states of layers about to be edited for the first time, before this step
            new_layers = sorted({lm.spec.layer_of(n) for n in touched} - {None} - set(self.hidden_baseline))
            states = capture_hidden_states(lm, self._state_prompts(), new_layers,
                                           batch_size=cfg.eval_batch_size) if new_layers else None
            if states:
                self.hidden_baseline.update({int(k[5:]): v for k, v in states.items()})
                artifacts.append(("hidden_states", {**states, "prompts": np.asarray(self._state_prompts())},
                                  self.n_done, self.step - 1))
        t_capture = time.perf_counter() - t_capture  # diagnostics, not editing time
        self.diag_seconds += t_capture
        try:
            apply_result(lm, result, keep_undo=False)
        except EditError as exc:
            if not result.is_finite():  # NaN/Inf in the update: nothing was applied, the run has diverged
                raise Diverged(str(exc)) from exc
            raise
        self.editor.after_apply(batch, result)
        seconds = time.perf_counter() - t0 - t_capture
        self.edit_seconds += seconds
        peak = _peak_mem_mb(lm.device)
        self.peak_mem = max(self.peak_mem, peak) if not math.isnan(peak) else self.peak_mem
        first_idx = self.n_done
        self.n_done += len(batch)
        bad = [n for n in touched if n in params and not bool(torch.isfinite(params[n]).all())]

        edit_rows = [{"idx": first_idx + j, "step": self.step, "n_edits": self.n_done, "case_id": r.case_id,
                      "request": r.to_dict(), "seconds": seconds / len(batch), "peak_mem_mb": peak,
                      "info": result.info if j == 0 else None} for j, r in enumerate(batch)]
        metric_rows: list[dict] = []
        common = {"n_edits": self.n_done, "step": self.step}
        for key, value in _flat_numbers(result.info).items():
            metric_rows.append({**common, "kind": "info", "metric": key, "value": value})
        if cfg.update_angles and not bad:
            t_angles = time.perf_counter()
            metric_rows += self._angle_rows(touched, before, params)
            self.diag_seconds += time.perf_counter() - t_angles
        arrays = _array_leaves(result.artifacts)
        if arrays:
            artifacts.append(("editor", arrays, self.n_done, self.step))
        if bad:
            self._write_edits(edit_rows, metric_rows, artifacts)
            raise Diverged(f"weights became non-finite after step {self.step} ({self.n_done} edits): {bad[0]}")
        t_eval = time.perf_counter()
        try:
            immediate = self._evaluate(batch, "immediate evaluation", cfg.immediate_protocols or None)
            self.eval_seconds_total += time.perf_counter() - t_eval
        except Diverged:
            self._write_edits(edit_rows, metric_rows, artifacts)
            raise
        ecommon = {**common, "kind": "edit"}
        metric_rows += [{**ecommon, **r} for r in immediate] + _mean_rows(immediate, **ecommon)
        self._write_edits(edit_rows, metric_rows, artifacts, seconds_total=time.time() - self.started)
        means = {f"{m}/{p}": v for (m, p), v in ev.summarize(immediate).items()}
        self._notify("edit", seconds=seconds, seconds_per_edit=self.edit_seconds / self.n_done, metrics=means)

    def _write_edits(self, edit_rows: list[dict], metric_rows: list[dict], artifacts: list, **run_fields) -> None:
        """Commit one step's rows (one transaction) with ``n_edits_done``; only then count its edits as recorded,
        so a run stopped between applying a step and committing it (Ray's KeyboardInterrupt, a kill) ends with an
        ``n_edits_done`` that equals its edit rows."""
        self.store.write_step(self.run_id, edit_rows=edit_rows, metric_rows=metric_rows, artifacts=artifacts,
                              n_edits_done=self.n_done, **run_fields)
        self.n_recorded = self.n_done

    def _angle_rows(self, touched: Sequence[str], before: Mapping[str, torch.Tensor], params) -> list[dict]:
        """``update_norm`` of this step's change of each matrix, its angle to the change accumulated before it
        (``angle_accumulated``, degrees) and, from :func:`analysis.angles.update_angles`, its angles to the previous
        update of the same matrix (``angle_flat``, ``angle_top_out``, ``angle_top_in``)."""
        spec = self.lm.spec
        rows = []
        for name in touched:
            if name not in before:
                continue
            D = params[name].detach() - before[name]  # this step's change, parameter layout
            acc = before[name] - self.W0[name]
            common = {"n_edits": self.n_done, "step": self.step, "kind": "update_angle",
                      "layer": spec.layer_of(name), "param": name}
            rows.append({**common, "metric": "update_norm", "value": float(D.float().norm())})
            if float(acc.float().norm()) > 0:
                rows.append({**common, "metric": "angle_accumulated", "value": flat_angle(D, acc)})
            prev = self.prev_update.get(name)
            if prev is not None:
                df = update_angles({prev[0]: {name: prev[1]}, self.n_done: {name: D}}, layer_of=spec.layer_of,
                                   to_canonical=spec.to_canonical)
                rows += [{**common, "metric": str(m), "value": float(v)} for m, v in zip(df["metric"], df["value"])]
            self.prev_update[name] = (self.n_done, D)
        return rows

    def checkpoint(self) -> None:
        cfg, lm = self.config, self.lm
        t0 = time.perf_counter()
        self._notify("checkpoint")
        common = {"n_edits": self.n_done, "step": self.step}
        rows: list[dict] = []
        artifacts = []
        scored = stratified_sample(self.n_done, cfg.retention_sample, self.priorities)
        retention = self._retention(scored)
        rcommon = {**common, "kind": "retention"}
        rows += [{**rcommon, **r} for r in retention] + _mean_rows(retention, **rcommon)
        if self.probes:
            scores = self._guarded("locality probes", ev.locality_scores, lm, self.probes, self.reference,
                                   batch_size=cfg.eval_batch_size)
            lcommon = {**common, "kind": "locality", "metric": "locality", "protocol": ev.TF}
            rows += [{**lcommon, "value": s, "case_id": f"probe:{i}"} for i, s in enumerate(scores)]
            rows.append({**lcommon, "value": float(np.mean(scores)), "case_id": None})
            if self.wild_reference:
                pairs = self._guarded("WILD locality probes", ev.wild_locality_scores, lm,
                                      [p for p, _ in self.probes], self.wild_reference, context=cfg.wild_context,
                                      max_new_tokens=cfg.wild_max_tokens, batch_size=cfg.eval_batch_size)
                for label, k in ((ev.WILD, 0), (ev.WILD_F1, 1)):
                    wcommon = {**lcommon, "protocol": label}
                    rows += [{**wcommon, "value": v[k], "case_id": f"probe:{i}"} for i, v in enumerate(pairs)]
                    rows.append({**wcommon, "value": float(np.mean([v[k] for v in pairs])), "case_id": None})
        rows += self._general_rows(self.step)
        t_diag = time.perf_counter()
        if cfg.weights and self.W0:
            w_rows, svals = self._weight_rows()
            rows += w_rows
            if svals:
                artifacts.append(("singular_values", svals, self.n_done, self.step))
        if cfg.hidden_states and self.W0:
            rows += self._hidden_rows(artifacts)
        rows += self._editor_rows(artifacts)
        diag = time.perf_counter() - t_diag
        self.diag_seconds += diag
        eval_seconds = time.perf_counter() - t0
        self.eval_seconds_total += eval_seconds - diag
        tcommon = {**common, "kind": "timing"}
        rows += [{**tcommon, "metric": "seconds_per_edit", "value": self.edit_seconds / max(1, self.n_done)},
                 {**tcommon, "metric": "peak_mem_mb", "value": self.peak_mem},
                 {**tcommon, "metric": "eval_seconds", "value": eval_seconds},
                 {**tcommon, "metric": "retention_scored", "value": float(len(scored))},
                 # cumulative split of the run's time so far (the diagnostics' share is a benchmark figure)
                 {**tcommon, "metric": "edit_seconds_total", "value": self.edit_seconds},
                 {**tcommon, "metric": "evaluation_seconds_total", "value": self.eval_seconds_total},
                 {**tcommon, "metric": "diagnostics_seconds_total", "value": self.diag_seconds},
                 {**tcommon, "metric": "run_seconds_total", "value": time.time() - self.started}]
        self.store.write_step(self.run_id, metric_rows=rows, artifacts=artifacts,
                              seconds_total=time.time() - self.started)
        means = {f"{m}/{p}": v for (m, p), v in ev.summarize(retention).items()}
        self._notify("checkpoint_done", retention=means, eval_seconds=eval_seconds)

    def _editor_rows(self, artifacts: list) -> list[dict]:
        """The editor's own state (:meth:`Editor.state_metrics`: ``kind="editor"`` rows) and its
        :meth:`Editor.state_dict` as the artifact ``editor_state`` (a resumed or replayed run restores it)."""
        metrics = self._guarded("editor state", self.editor.state_metrics, self._state_prompts())
        rows = [{"n_edits": self.n_done, "step": self.step, "kind": "editor", "metric": str(m["metric"]),
                 "value": float(m["value"]), "layer": m.get("layer"), "protocol": m.get("protocol")}
                for m in metrics]
        state = self.editor.state_dict() if self.editor.state_in_store else {}
        if state:
            artifacts.append(("editor_state", state, self.n_done, self.step))
        return rows

    def _hidden_rows(self, artifacts: list) -> list[dict]:
        """Capture the probe states at every edited layer (an artifact) and, against each layer's states before
        its first edit, the projection-free shift numbers of :func:`analysis.hidden.shift_metrics`."""
        layers = [i for i in self._edited_layers() if i in self.hidden_baseline]
        states = capture_hidden_states(self.lm, self._state_prompts(), layers, batch_size=self.config.eval_batch_size)
        if not states:
            return []
        artifacts.append(("hidden_states", {**states, "prompts": np.asarray(self._state_prompts())}, self.n_done,
                          self.step))
        rows = []
        if len(self._state_prompts()) >= 2:
            for i in layers:
                for metric, value in shift_metrics(self.hidden_baseline[i], states[f"layer{i}"]).items():
                    rows.append({"n_edits": self.n_done, "step": self.step, "kind": "hidden_shift", "layer": i,
                                 "protocol": "last", "metric": metric, "value": value})
        return rows

    def _weight_rows(self) -> tuple[list[dict], dict[str, np.ndarray]]:
        params = dict(self.lm.model.named_parameters())
        rows, svals = [], {}
        for name, W0 in self.W0.items():
            W = self.lm.spec.to_canonical(params[name].detach()).float()
            W0c = self.lm.spec.to_canonical(W0).float()
            if not bool(torch.isfinite(W).all()):
                raise Diverged(f"weights of {name} are non-finite after {self.n_done} edits")
            stats = matrix_stats(W, W0c)
            layer = self.lm.spec.layer_of(name)
            ref = self._preserve_ref(name, layer, W0c)
            if ref is not None:  # ‖ΔW k‖ over the preserved keys, relative (analysis.weights.preserved_output_change)
                stats = {**stats, "preserve_change": preserved_output_change(W, W0c, ref[0],
                                                                             reference_trace=ref[1])}
            for metric, value in stats.items():
                rows.append({"n_edits": self.n_done, "step": self.step, "kind": "weights", "layer": layer,
                             "param": name, "metric": metric, "value": value})
            svals[f"{name}|W"] = np.asarray(singular_values(W), dtype=np.float64)
            svals[f"{name}|delta"] = np.asarray(singular_values(W - W0c), dtype=np.float64)
        return rows, svals

    def _preserve_ref(self, name: str, layer, W0c: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """``(C, tr(W0 C W0ᵀ))`` of an edited MLP output projection whose key covariance is in the statistics
        cache (the corpus / size of the method's config when it has them, else the defaults): the reference of
        ``preserve_change``. None (the metric is left out) for other matrices or without cached statistics:
        nothing is computed here, the model is already edited."""
        if name in self._preserve_refs:
            return self._preserve_refs[name]
        ref = None
        spec = self.lm.spec
        if layer is not None and name == spec.mlp_out_weight(layer) and W0c.shape[1] == spec.mlp_size:
            from editors.stats import DEFAULT_MOM2_TOKENS, cached_layer_covariances
            mc = self.method_config
            C = cached_layer_covariances(self.lm, [layer], corpus=getattr(mc, "corpus", "builtin"),
                                         n_tokens=getattr(mc, "mom2_n_tokens", DEFAULT_MOM2_TOKENS),
                                         cache_dir=self.config.cache_dir).get(layer)
            if C is not None:
                W0_64 = W0c.double().cpu()
                ref = (C, float(((W0_64 @ C) * W0_64).sum()))
        self._preserve_refs[name] = ref
        return ref

    def collapse_rows(self) -> list[dict]:
        # only what detect_collapse reads: aggregate rows of the signals' kinds (never every per-case row of a run)
        df = self.store.metrics_frame([self.run_id], kinds=list(COLLAPSE_KINDS), aggregates_only=True)
        out = detect_collapse(df)
        if len(out) == 0:
            return []
        return _collapse_to_rows(out, self.n_done, self.step)

    # ---- resume snapshots -----------------------------------------------------------------------------------------
    def _snapshot_due(self, checkpointed: bool) -> bool:
        every = self.config.snapshot_every
        if every < 0:
            return False
        return checkpointed or (every > 0 and self.step % every == 0)

    def save_snapshot(self) -> str:
        """Write the resume snapshot of the current step (after its rows were committed)."""
        params = dict(self.lm.model.named_parameters())
        torch_rng = torch.get_rng_state().tolist()
        np_rng = np.random.get_state()
        meta = {"run_id": self.run_id, "n_done": self.n_done, "model_hash": self.lm.model_hash,
                "method": self.config.method, "edit_seconds": self.edit_seconds, "diag_seconds": self.diag_seconds,
                "eval_seconds_total": self.eval_seconds_total, "peak_mem": self.peak_mem,
                "run_seconds": time.time() - self.started,
                "prev_n": {n: int(v[0]) for n, v in self.prev_update.items()},
                "rng": {"random": random.getstate(), "torch": torch_rng,
                        "numpy": [np_rng[0], np_rng[1].tolist(), int(np_rng[2]), int(np_rng[3]), float(np_rng[4])]}}
        if torch.cuda.is_available() and self.lm.device.type == "cuda":
            meta["rng"]["cuda"] = torch.cuda.get_rng_state(self.lm.device).tolist()
        return snaps.save_snapshot(self.store.runs_dir, self.run_id, self.step, meta=meta,
                                   params={n: params[n] for n in self.W0}, editor_state=self.editor.state_dict(),
                                   hidden=self.hidden_baseline,
                                   prev={n: v[1] for n, v in self.prev_update.items()})

    def apply_snapshot(self) -> None:
        """After :meth:`setup` on the UNEDITED model: make the model, the editor and the counters those of the
        snapshot in ``self.resume``.

        Raises:
            SnapshotError: the snapshot is of another model, or names a parameter the model lacks.
        """
        snap = self.resume
        meta = snap["meta"]
        if meta.get("model_hash") and self.lm.model_hash and meta["model_hash"] != self.lm.model_hash:
            raise snaps.SnapshotError(f"the snapshot of run {self.run_id} is of model {meta['model_hash']}, the "
                                      f"model loaded is {self.lm.model_hash}")
        params = dict(self.lm.model.named_parameters())
        missing = sorted(set(snap["params"]) - set(params))
        if missing:
            raise snaps.SnapshotError(f"the snapshot names parameter {missing[0]!r}, which the model lacks")
        with torch.no_grad():
            for name, value in snap["params"].items():
                p = params[name]
                if tuple(value.shape) != tuple(p.shape):
                    raise snaps.SnapshotError(f"snapshot parameter {name!r} has shape {tuple(value.shape)}, the "
                                              f"model's is {tuple(p.shape)}")
                self.W0.setdefault(name, p.detach().clone())  # the unedited value, as in the interrupted run
                p.copy_(torch.from_numpy(np.asarray(value)).to(device=p.device, dtype=p.dtype))
        self.editor.load_state_dict(dict(snap["editor_state"]))
        self.hidden_baseline = {int(k): np.asarray(v) for k, v in snap["hidden"].items()}
        self.prev_update = {n: (int(meta["prev_n"][n]), torch.from_numpy(np.asarray(v)).to(
            device=params[n].device, dtype=params[n].dtype)) for n, v in snap["prev"].items()}
        self.step = int(meta["step"])
        self.n_done = self.n_recorded = int(meta["n_done"])
        self.edit_seconds = float(meta["edit_seconds"])
        self.diag_seconds = float(meta["diag_seconds"])
        self.eval_seconds_total = float(meta["eval_seconds_total"])
        self.peak_mem = float(meta["peak_mem"])
        self.started = time.time() - float(meta["run_seconds"])
        rng = meta["rng"]
        state = rng["random"]
        random.setstate((state[0], tuple(state[1]), state[2]))
        n = rng["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        if "cuda" in rng and self.lm.device.type == "cuda":
            torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8), self.lm.device)

    def restore(self) -> None:
        """Put every edited parameter back to its original value (bit for bit)."""
        if not self.W0 or self.lm is None:
            return
        params = dict(self.lm.model.named_parameters())
        with torch.no_grad():
            for name, W0 in self.W0.items():
                params[name].copy_(W0)

    # ---- main loop ----------------------------------------------------------------------------------------
    def execute(self) -> str:
        store, run_id = self.store, self.run_id
        beat = Heartbeat(lambda: store.heartbeat(run_id), self.heartbeat_every, name=f"heartbeat-{run_id}")
        store.update_run(run_id, status="running", pid=os.getpid(), host=socket.gethostname(),
                         heartbeat=time.time(), error=None)
        beat.start()
        status, error = "failed", None
        try:
            rows = self.setup()
            store.write_step(run_id, metric_rows=rows)
            if self.resume is not None:
                self.apply_snapshot()
            bs = self.config.batch_size
            n_steps = math.ceil(len(self.requests) / bs)
            at = set(checkpoint_steps(self.config, n_steps))
            self._notify("start", n_steps=n_steps, resumed_at=self.n_done if self.resume is not None else None)
            for s in range(self.step, n_steps):
                if self._cancel_wanted():
                    raise Cancelled()
                self.edit_step(self.requests[s * bs:(s + 1) * bs])
                checkpointed = self.step in at
                if checkpointed:
                    self.checkpoint()
                if self._snapshot_due(checkpointed) and self.step < n_steps:
                    self.save_snapshot()
            status = "finished"
        except Diverged as exc:
            status, error = "diverged", f"step {self.step}: {exc}"
            log.warning("run %s diverged: %s", run_id, error)
        except Cancelled:
            status, error = "cancelled", None
        except KeyboardInterrupt:
            status, error = "interrupted", "interrupted by the user (KeyboardInterrupt)"
            raise
        except BaseException as exc:
            status = "failed"
            error = f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}"
            raise
        finally:
            beat.stop()
            try:
                if status in ("finished", "diverged"):
                    try:
                        rows = self.collapse_rows()
                        if rows:
                            store.add_metric_rows(run_id, rows)
                    except Exception as exc:  # diagnostics must not lose a finished run
                        log.warning("collapse detection failed for run %s: %s", run_id, exc)
                store.update_status(run_id, status, error=error, n_edits_done=self.n_recorded,
                                    seconds_total=time.time() - self.started, heartbeat=time.time())
                if status in ("finished", "diverged"):  # nothing left to resume
                    snaps.delete_snapshots(store.runs_dir, run_id)
            finally:
                if self.editor is not None:
                    self.editor.close()
                if self.given_lm is not None:
                    self.restore()
                self._notify("done", status=status)
        return run_id


def _collapse_to_rows(df, n_edits: int, step: int) -> list[dict]:
    """Rows of kind ``collapse`` from :func:`analysis.collapse.detect_collapse`'s frame (its ``metric`` / ``value``
    columns, with ``n_edits``, ``layer``, ``protocol``, ``param`` where present)."""
    rows = []
    for r in df.to_dict("records"):
        value = r["value"]
        if isinstance(value, (bool, np.bool_)):
            value = float(value)
        if not isinstance(value, (int, float, np.number)):
            continue
        n = r.get("n_edits", n_edits)
        n = n_edits if n is None or (isinstance(n, float) and math.isnan(n)) else int(n)
        layer, protocol, param = r.get("layer"), r.get("protocol"), r.get("param")
        rows.append({"n_edits": n, "step": step, "kind": "collapse",
                     "layer": None if layer is None or (isinstance(layer, float) and math.isnan(layer)) else int(layer),
                     "protocol": None if isinstance(protocol, float) else protocol,
                     "param": None if isinstance(param, float) else param,
                     "metric": str(r["metric"]), "value": float(value)})
    return rows


def _layer_values(method_config: EditorConfig) -> dict[str, tuple[int, ...]]:
    """The method config's layer-index fields (``layer``, ``layers``, ``*_layer``, ``*_layers``) with int values."""
    out = {}
    for name, value in method_config.to_dict().items():
        if name in ("layer", "layers") or name.endswith(("_layer", "_layers")):
            values = value if isinstance(value, (list, tuple)) else (value,)
            ints = tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool))
            if ints:
                out[name] = ints
    return out


def check_model_and_layers(model: str, method_config: EditorConfig) -> None:
    """Before a run is queued: the model can be found (:func:`editors.models.check_model_source`) and, when its layer
    count is known without loading it, every layer index of the method config exists (negative indices count from
    the end, as the editors read them).

    Raises:
        ModelLoadError: no such model directory, or not a model directory.
        ConfigError: a layer index out of range (names the field and the model's range).
    """
    from editors.models import check_model_source
    n_layers = check_model_source(model)
    if n_layers is None:
        return
    for name, values in _layer_values(method_config).items():
        bad = [v for v in values if v >= n_layers]
        if bad:
            raise ConfigError(f"config field {name!r}: layer {bad[0]} out of range: model {model!r} has {n_layers} "
                              f"layers (0..{n_layers - 1})")


def _new_run_fields(config: RunConfig, method_config: EditorConfig, preset_version: int | None) -> dict:
    return {"method": get_editor_class(config.method).name, "model": config.model, "data_source": config.data,
            "config": config.to_dict(), "method_config": method_config.to_dict(), "preset_version": preset_version,
            "package_versions": package_versions(), "n_edits_planned": config.n_edits, "label": config.label or None,
            "device": config.device}


def run_sequential(config: RunConfig | Mapping[str, Any], store: RunStore | None = None, *, lm=None,
                   progress: ProgressFn | None = None, should_cancel: Callable[[], bool] | None = None,
                   run_id: str | None = None) -> str:
    """Run ``config`` sequentially and record it; returns the run id.

    Args:
        config: a :class:`RunConfig` (or its dict).
        store: the run store (default: ``RunStore(config.runs_dir)``).
        lm: an already loaded model to edit; it is restored exactly at the end (also after an error).
        progress: ``callback(done, total, info)``; ``info`` has ``run_id, phase, step, n_edits`` and per phase
            ``seconds_per_edit`` / ``metrics`` / ``retention`` means.
        should_cancel: polled before every step; True stops the run as ``cancelled`` (rows kept). A store-side
            :meth:`RunStore.request_cancel` works the same way (for other processes).
        run_id: an existing ``queued`` run to execute (as created by :func:`queue_run`, e.g. for the worker).

    Raises:
        UnknownMethodError, ConfigError: invalid config (nothing is written).
        RequestError and any other error: after the run was recorded as ``failed`` with the error text.
    """
    if isinstance(config, Mapping):
        config = RunConfig.from_dict(config)
    config.validate()
    method_config, preset_version = config.method_config(lm.name if lm is not None else None)
    store = store if store is not None else RunStore(config.runs_dir)
    if run_id is None:
        run_id = store.create_run(status="running", pid=os.getpid(), heartbeat=time.time(),
                                  **_new_run_fields(config, method_config, preset_version))
    else:
        run = store.get_run(run_id)
        if run["status"] in TERMINAL:
            log.info("run %s is already %s; not started", run_id, run["status"])
            return run_id
        store.update_run(run_id, method_config=method_config.to_dict(), preset_version=preset_version)
    return SequentialRun(config, store, run_id, method_config, lm=lm, progress=progress,
                         should_cancel=should_cancel).execute()


#: statuses a run can be resumed from (a ``running`` run whose process died is marked ``interrupted`` first)
RESUMABLE = ("interrupted", "failed", "cancelled")


class ResumeError(ConfigError):
    """A run cannot be resumed (still running, finished, no snapshot, ...); the message says why."""


def resume_run(store: RunStore, run_id: str, *, lm=None, progress: ProgressFn | None = None,
               should_cancel: Callable[[], bool] | None = None) -> str:
    """Continue an interrupted, failed or cancelled run from its newest resume snapshot; returns the run id.

    The run's stored config and method config are used as they were (a preset changed since does not change the
    run); its rows after the snapshot's edit count are deleted and made again; a ``kind="resume"`` row
    (``resumed_at_edit``) records where it continued. With the same seed, code and model the continued run makes
    the same edits and rows as an uninterrupted one (tests/unit/test_resume.py checks this for every shipped method).

    Raises:
        ResumeError: the run is running, finished or diverged, or has no snapshot (the message says which).
        SnapshotError: the snapshot is unreadable or of another model.
    """
    from editors.base import make_config
    store.recover_interrupted()
    run_id = store.resolve(run_id)
    run = store.get_run(run_id)
    if run["status"] not in RESUMABLE:
        raise ResumeError(f"run {run_id} is {run['status']}; only {', '.join(RESUMABLE)} runs can be resumed"
                          + (" (it may still be running: cancel it first)" if run["status"] == "running" else ""))
    found = snaps.list_snapshots(store.runs_dir, run_id)
    snap = None
    done = int(run["n_edits_done"] or 0)
    for _, path in reversed(found):  # the newest snapshot whose edits the store has recorded
        candidate = snaps.load_snapshot(path)
        if int(candidate["meta"]["n_done"]) <= done:
            snap = candidate
            break
    if snap is None:
        raise ResumeError(f"run {run_id} has no resume snapshot in {snaps.snapshot_dir(store.runs_dir, run_id)} "
                          f"(it stopped before its first checkpoint, or ran with snapshot_every=-1): start it again")
    config = RunConfig.from_dict(run["config"])
    method_config = make_config(get_editor_class(config.method).config_cls, dict(run["method_config"] or {}),
                                method=config.method)
    n = int(snap["meta"]["n_done"])
    store.truncate_run(run_id, n)
    store.add_metric_rows(run_id, [{"n_edits": n, "step": int(snap["meta"]["step"]), "kind": "resume",
                                    "metric": "resumed_at_edit", "value": float(n)}])
    log.info("run %s: resuming after %d edits (step %d)", run_id, n, int(snap["meta"]["step"]))
    return SequentialRun(config, store, run_id, method_config, lm=lm, progress=progress,
                         should_cancel=should_cancel, resume=snap).execute()


def run_summary(store: RunStore, run_id: str) -> dict[str, Any]:
    """``{run_id, status, n_edits, seconds_per_edit, final: {reliability, generality, locality}, error}``:
    retention means (tf_token_acc) at the last checkpoint; locality falls back to the probe set's when the
    requests carry no locality prompts."""
    run = store.get_run(run_id)
    df = store.metrics_frame([run["run_id"]], kinds=["retention", "locality", "timing"])
    agg = df[df["case_id"].isna()]
    final: dict[str, float | None] = {"reliability": None, "generality": None, "locality": None}
    ret = agg[(agg["kind"] == "retention") & (agg["protocol"] == ev.TF)]
    if len(ret):
        last = ret[ret["n_edits"] == ret["n_edits"].max()]
        for metric in final:
            v = last.loc[last["metric"] == metric, "value"]
            if len(v) and not math.isnan(v.iloc[0]):
                final[metric] = float(v.iloc[0])
    if final["locality"] is None:
        loc = agg[agg["kind"] == "locality"]
        if len(loc):
            final["locality"] = float(loc.loc[loc["n_edits"].idxmax(), "value"])
    timing = agg[(agg["kind"] == "timing") & (agg["metric"] == "seconds_per_edit")]
    spe = float(timing.loc[timing["n_edits"].idxmax(), "value"]) if len(timing) else None
    error = run.get("error")
    return {"run_id": run["run_id"], "status": run["status"], "n_edits": int(run["n_edits_done"] or 0),
            "seconds_per_edit": spe, "final": final, "error": error.split("\n", 1)[0] if error else None}


def queue_run(config: RunConfig, store: RunStore | None = None, *, owner_pid: int | None = -1
              ) -> tuple[str, RunStore]:
    """Validate ``config`` and create its ``queued`` run row; returns (run_id, store).

    ``owner_pid`` is the process that will run it (default: this one); when that process dies before the run starts,
    the store marks the run ``interrupted``. None: the job queue owns it (a worker starts it whenever one runs)."""
    config.validate()
    method_config, preset_version = config.method_config()
    check_model_and_layers(config.model, method_config)
    store = store if store is not None else RunStore(config.runs_dir)
    run_id = store.create_run(status="queued", pid=os.getpid() if owner_pid == -1 else owner_pid,
                              **_new_run_fields(config, method_config, preset_version))
    return run_id, store


__all__ = ["RunConfig", "run_sequential", "run_summary", "queue_run", "resume_run", "ResumeError", "RESUMABLE",
           "SequentialRun", "Diverged",
           "capture_hidden_states", "ConfigError", "UnknownMethodError"]
