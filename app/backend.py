"""What the pages ask of the application, without Streamlit: submit / cancel / watch jobs, method forms, uploads.

Pages call these through :mod:`app.ui` (which caches the store and the queue per runs directory). Everything that
runs a model goes through the job queue to the worker process (:mod:`app.worker`); this module only validates,
queues and reads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Mapping, Sequence

from .jobs import Job, JobError, JobQueue, device_key
from .settings import upload_limit_bytes
from .store import TERMINAL, RunStore


# ---------------------------------------------------------------------------------------------------------------
# methods and their config forms
# ---------------------------------------------------------------------------------------------------------------
def available_methods() -> list[str]:
    from editors.registry import available_methods as _available
    return _available()


def method_summary(name: str) -> str:
    from editors.registry import get_editor_class
    return get_editor_class(name).summary


def method_fields(name: str) -> list[dict]:
    """``[{name, type, default, help}]`` of a method's config (the registry's ``field_help``)."""
    from editors.registry import get_editor_class
    return get_editor_class(name).config_cls.field_help()


def field_to_text(value: Any) -> str:
    """How a default is shown in a text box: tuples/lists as "1, 2", None as ""."""
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def changed_overrides(fields: Sequence[Mapping[str, Any]], values: Mapping[str, Any]) -> dict[str, Any]:
    """Only the fields whose form value differs from the default (text values stay strings: ``make_config`` coerces
    them to the field's type and reports a bad one by name)."""
    out = {}
    for f in fields:
        name = f["name"]
        if name not in values:
            continue
        v, d = values[name], f["default"]
        if isinstance(v, str):
            if v.strip() == field_to_text(d).strip():
                continue
        elif isinstance(v, float) and isinstance(d, (int, float)) and not isinstance(d, bool):
            if math.isclose(v, float(d), rel_tol=0, abs_tol=0):
                continue
        elif v == d:
            continue
        out[name] = v
    return out


# ---------------------------------------------------------------------------------------------------------------
# data: built-in facts and uploads
# ---------------------------------------------------------------------------------------------------------------
def builtin_requests() -> list[dict]:
    """The built-in edit requests as dicts (empty when ``editors.data`` is not installed yet)."""
    try:
        from editors.data import builtin_requests as _builtin
        return [r.to_dict() for r in _builtin()]
    except (ImportError, OSError, ValueError):  # not installed yet / resource missing
        return []


_REQUEST_KEYS = ("case_id", "prompt", "subject", "target_new", "target_true", "rephrase_prompts",
                 "locality_prompts", "locality_answers", "relation")


def size_in_words(n_bytes: float) -> str:
    """``1,000 bytes``, ``12 KB``, ``7.2 MB``."""
    if n_bytes < 1024:
        return f"{int(n_bytes):,} bytes"
    if n_bytes < 2 ** 20:
        return f"{n_bytes / 1024:,.0f} KB"
    mb = n_bytes / 2 ** 20
    return f"{mb:,.0f} MB" if mb == int(mb) else f"{mb:,.1f} MB"


def _person_record(record: object) -> str:
    """A reader's record label counted from 1, as a person counts: ``"0 (line 1)"`` -> ``"1 (line 1)"``."""
    text = str(record)
    head, _, rest = text.partition(" ")
    return f"{int(head) + 1}{' ' + rest if rest else ''}" if head.isdigit() else text


def upload_message(exc: Exception, filename: str) -> str:
    """The message of an upload's error for a person: the file named once, records counted from 1."""
    from editors.requests import RequestError
    if isinstance(exc, RequestError):
        where = "the header" if str(exc.record) == "header" else f"record {_person_record(exc.record)}"
        return f"{filename}, {where}: field '{exc.field_name}': {exc.problem}"
    text = str(exc)
    for name in (filename, os.path.basename(filename)):
        if text.startswith(f"{name}: "):
            text = text[len(name) + 2:]
    return f"{filename}: {text}"


def explain_in_words(explanation: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    """What an edit did, for a lecture: per changed matrix, which layer, how many directions, how large."""
    subject, new = request.get("subject") or "the subject", request.get("target_new") or "the new target"
    parts = []
    for p in explanation.get("params", ()):
        short = str(p.get("param") or "").removesuffix(".weight").rsplit(f".{p.get('layer')}.", 1)[-1]
        where = f"the matrix {short or 'of weights'} of layer {p.get('layer')}"
        rank = p.get("rank")
        if rank == 1:
            how = (f"a rank-1 update: one new key→value association, so that when the model reads “{subject}” "
                   f"this layer writes a value that leads to “{new}”; ΔW = u vᵀ, so inputs orthogonal to its one "
                   "input direction v pass through unchanged")
        elif rank:
            how = f"a rank-{rank} update: the change acts in {rank} independent input directions"
        else:
            how = "an update"
        size = (f" The change is {p['rel_norm']:.2%} of the matrix's size (‖ΔW‖/‖W‖)."
                if p.get("rel_norm") is not None else "")
        parts.append(f"It changed {where} with {how}.{size}")
    return " ".join(parts) or "It changed no weights."


#: the Playground form's labels of the request fields (its errors name the box to fix, not the field)
PLAYGROUND_LABELS = {"prompt": "Prompt", "subject": "Subject", "target_new": "New target",
                     "target_true": "Current answer", "rephrase_prompts": "Paraphrase",
                     "locality_prompts": "Unrelated prompt", "locality_answers": "Its answer"}


def parse_upload(data: bytes, filename: str, limit: int | None = None) -> list:
    """Parse a user's edits file (JSON / JSONL / CSV only -- never unpickled) into ``EditRequest`` objects.

    Raises:
        JobError: too large, wrong type, or a bad record (the message names the file once, the record counted from
            1 and the field; :func:`upload_message`).
    """
    limit = upload_limit_bytes() if limit is None else limit
    if len(data) > limit:
        raise JobError(f"{filename} is {size_in_words(len(data))}, over the upload limit of {size_in_words(limit)} "
                       "(EDITBENCH_UPLOAD_MB sets it)")
    ext = os.path.splitext(filename.lower())[1]
    if ext not in (".json", ".jsonl", ".csv"):
        raise JobError(f"{filename}: only .json, .jsonl and .csv files are accepted")
    from editors.data import parse_user_edits_bytes
    from editors.requests import RequestError
    try:
        requests = parse_user_edits_bytes(data, filename, max_bytes=limit)
    except RequestError as exc:
        raise JobError(upload_message(exc, filename)) from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise JobError(upload_message(exc, filename)) from exc
    if not requests:
        raise JobError(f"{filename}: no edit records found")
    return requests


def check_data_source(data: str, roots: Sequence[str] | None = None) -> str:
    """``data`` (a run's data source) when it is ``builtin`` or names a file inside one of the data ``roots``
    (default :func:`app.settings.data_roots`; ``..`` and symlinks are resolved first). A page never reads any other
    server path a user types in.

    Raises:
        JobError: the path is outside every root (the message names the roots and how to add one).
    """
    from editors.data import source_prefixes

    from .settings import data_roots
    text = str(data or "").strip()
    if text == "builtin":
        return text
    path = text
    for prefix in source_prefixes()[1:]:
        if text.startswith(prefix):
            path = text[len(prefix):]
            break
    roots = [os.path.realpath(r) for r in (roots if roots is not None else data_roots())]
    real = os.path.realpath(os.path.expanduser(path.strip()))
    if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        raise JobError(f"{path.strip()!r} is outside the data folders this app may read ({', '.join(roots)}). Upload "
                       "the file instead, or start the app with EDITBENCH_DATA_ROOTS naming its folder.")
    return text


def save_upload(runs_dir: str, requests: Sequence[Any], filename: str) -> str:
    """Write parsed requests as JSON under ``<runs_dir>/uploads/`` (content-addressed); returns the path, which a
    run's ``data`` field can name."""
    recs = [r.to_dict() for r in requests]
    text = json.dumps(recs, indent=1, ensure_ascii=False)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    folder = os.path.join(os.path.abspath(runs_dir), "uploads")
    os.makedirs(folder, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.splitext(os.path.basename(filename))[0])
    path = os.path.join(folder, f"{stem[:40] or 'edits'}-{digest}.json")
    if not os.path.exists(path):
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------------------------------------------
def submit_run(store: RunStore, queue: JobQueue, config: Mapping[str, Any], *, device: str = "auto",
               start_worker: bool = True, data_roots: Sequence[str] | None = None) -> tuple[str, str]:
    """Validate a run config (dict of :class:`app.runconfig.RunConfig` fields), create its ``queued`` run row and its
    job; returns ``(run_id, job_id)``. Raises :class:`JobError` with the validation message, or when the data names a
    server path outside ``data_roots`` (:func:`check_data_source`)."""
    check_data_source(config.get("data", "builtin"), data_roots)
    from editors.base import ConfigError
    from editors.models import ModelLoadError
    from editors.registry import UnknownMethodError

    from .engine import queue_run
    from .runconfig import RunConfig
    cfg = dict(config)
    cfg["runs_dir"] = store.runs_dir
    cfg.setdefault("device", None if device_key(device) == "auto" else device_key(device))
    try:
        rc = RunConfig.from_dict(cfg)
        run_id, _ = queue_run(rc, store, owner_pid=None)  # the job queue owns it until a worker starts it
    except (ConfigError, UnknownMethodError, ModelLoadError, TypeError, ValueError) as exc:
        raise JobError(str(exc)) from exc
    job_id = queue.submit("run", {"config": rc.to_dict()}, device=device, run_id=run_id)
    if start_worker:
        wake_workers(queue)
    return run_id, job_id


def submit_playground(queue: JobQueue, payload: Mapping[str, Any], *, device: str = "auto",
                      start_worker: bool = True) -> str:
    """Queue a playground edit (see :func:`app.playground.playground_edit` for the payload; its ``stack_jobs`` lists
    the jobs of the edits under this one, which :func:`playground_state` reads to rebuild the stack after a reload)."""
    from editors.base import ConfigError
    from editors.presets import build_config
    from editors.registry import UnknownMethodError
    from editors.requests import RequestError, make_request
    try:
        build_config(payload["method"], str(payload.get("model", "default")), payload.get("overrides"))
        r = payload["request"]
        make_request(source="playground", record="edit", case_id="playground",
                     **{k: r.get(k) for k in _REQUEST_KEYS if k != "case_id" and k in r})
    except RequestError as exc:  # named by the form's label
        base = exc.field_name.split("[")[0]
        raise JobError(f"{PLAYGROUND_LABELS.get(base, exc.field_name)}: {exc.problem}") from exc
    except (ConfigError, UnknownMethodError) as exc:
        raise JobError(str(exc)) from exc
    job_id = queue.submit("playground", payload, device=device)
    if start_worker:
        wake_workers(queue)
    return job_id


def playground_entry(job: Job) -> dict[str, Any]:
    """One edit of the playground's stack, from its finished job: ``{"spec", "result", "job_id"}``; the spec is what a
    later job's ``stack`` repeats (``{"model", "method", "overrides", "request"}``)."""
    p = job.payload
    spec = {"model": p["model"], "method": p["method"], "overrides": p.get("overrides") or {},
            "request": p["request"]}
    return {"spec": spec, "result": job.result, "job_id": job.job_id}


def playground_state(queue: JobQueue, job_id: str) -> tuple[list[dict[str, Any]], Job]:
    """The playground's stack as it was when ``job_id`` was submitted (from the ``stack_jobs`` ids of its payload, so
    the URL's ``?job=`` alone reopens it after a reload), with that job on top when it finished; and the job itself
    (the caller waits for it when it is still queued or running). Edits whose job is gone or did not finish are left
    out. Raises ``KeyError`` when ``job_id`` is not a playground job."""
    job = queue.get(job_id)
    if job.kind != "playground":
        raise KeyError(f"{job_id!r} is not a playground job")
    stack = []
    for earlier in job.payload.get("stack_jobs", ()):
        try:
            prev = queue.get(earlier)
        except KeyError:
            continue
        if prev.status == "finished":
            stack.append(playground_entry(prev))
    if job.status == "finished":
        stack.append(playground_entry(job))
    return stack, job


def wake_workers(queue: JobQueue, devices: Sequence[str] | None = None) -> list[int]:
    """Start a worker for every device key with queued jobs that has none (respects ``EDITBENCH_NO_WORKER``)."""
    from .settings import autostart_worker
    from .worker import ensure_worker
    if not autostart_worker():
        return []
    started = []
    for dev in devices if devices is not None else queue.pending_devices():
        pid = ensure_worker(queue.runs_dir, dev, parent_pid=os.getpid())
        if pid:
            started.append(pid)
    return started


def housekeeping(store: RunStore, queue: JobQueue) -> None:
    """Notice dead workers (their jobs -> failed, their runs -> interrupted) and restart workers for queued jobs."""
    dead = queue.recover_dead()
    store.recover_interrupted()
    for job_id in dead:
        job = queue.get(job_id)
        if job.run_id:
            try:
                run = store.get_run(job.run_id)
            except KeyError:
                continue
            if run["status"] not in TERMINAL:
                store.update_status(job.run_id, "failed", error=job.error)
    if queue.pending_devices():
        wake_workers(queue)


def cancel_run(store: RunStore, queue: JobQueue, run_id: str) -> str:
    """Cancel a queued run at once, or ask a running one to stop after its step. Returns the job status."""
    store.request_cancel(run_id)
    job = queue.job_for_run(run_id)
    return queue.cancel(job.job_id) if job is not None else store.get_run(run_id)["status"]


def delete_run(store: RunStore, queue: JobQueue, run_id: str) -> None:
    store.delete_run(run_id)
    queue.delete_for_run(run_id)


@dataclasses.dataclass
class Progress:
    run_id: str
    status: str
    done: int
    planned: int
    fraction: float
    seconds: float
    eta_seconds: float | None
    error: str | None
    job_status: str | None
    method: str | None = None
    label: str | None = None
    #: what the worker is doing, in words ("loading the model", "edit 3 of 6", ...); None when nothing is known
    phase: str | None = None
    #: seconds in the current phase
    phase_seconds: float | None = None
    #: Cancel was pressed and the run has not stopped yet (it stops after its current step)
    cancelling: bool = False

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


#: the engine's phases (:meth:`app.engine.SequentialRun._notify`) in words
PHASES = {"load_model": "loading the model", "prepare": "preparing the method (statistics, context templates)",
          "reference": "scoring the unedited model's locality reference", "pre_eval": "pre-evaluation of the "
          "unedited model", "general": "general-ability probes of the unedited model",
          "checkpoint": "checkpoint: re-scoring every edit so far", "done": "writing the last rows"}


def phase_text(progress: Mapping[str, Any] | None, done: int, planned: int) -> str | None:
    """The worker's phase in words; while editing, which edit ("edit 4 of 10")."""
    if not progress or not progress.get("phase"):
        return None
    phase = progress["phase"]
    if phase == "edit":
        return f"edit {min(done + 1, planned)} of {planned}" if planned and done < planned else "editing"
    return PHASES.get(phase, phase.replace("_", " "))


def run_progress(store: RunStore, queue: JobQueue, run_id: str) -> Progress:
    """Status, edits done / planned, elapsed seconds and a rough ETA (seconds per edit so far x edits left)."""
    run = store.get_run(run_id)
    job = queue.job_for_run(run_id)
    done = int(run.get("n_edits_done") or 0)
    planned = int(run.get("n_edits_planned") or 0)
    started = (job.started if job and job.started else None) or run["created"]
    end = run["updated"] if run["status"] in TERMINAL else time.time()
    seconds = max(0.0, end - started) if run["status"] != "queued" else 0.0
    report = job.progress if job is not None and job.status == "running" else None
    eta = None
    if run["status"] == "running" and done > 0 and planned > done:
        # from the first edit on (the setup -- model, statistics, pre-evaluation -- happens once and is not repeated
        # per edit), averaged over every edit so far, checkpoints included
        edits_started = (report or {}).get("edits_started")
        editing = end - edits_started if edits_started else seconds
        eta = max(0.0, editing) / done * (planned - done)
    error = run.get("error") or (job.error if job is not None else None)
    cancelling = run["status"] in ("queued", "running") and bool(run.get("cancel_requested") or
                                                                 (job is not None and job.cancel_requested))
    since = (report or {}).get("since")
    return Progress(run_id=run["run_id"], status=run["status"], done=done, planned=planned,
                    fraction=(done / planned) if planned else 0.0, seconds=seconds, eta_seconds=eta, error=error,
                    job_status=job.status if job is not None else None, method=run.get("method"),
                    label=run.get("label") or None,
                    phase=phase_text(report, done, planned) if run["status"] == "running" else None,
                    phase_seconds=max(0.0, time.time() - since) if since and run["status"] == "running" else None,
                    cancelling=cancelling)


def active_runs(store: RunStore) -> list[str]:
    df = store.list_runs(status=("queued", "running"))
    return list(df["run_id"])


def get_job(queue: JobQueue, job_id: str) -> Job:
    return queue.get(job_id)


def format_seconds(s: float | None) -> str:
    if s is None or (isinstance(s, float) and not math.isfinite(s)):
        return "–"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


__all__ = ["check_data_source",
           "submit_run", "submit_playground", "cancel_run", "delete_run", "run_progress", "Progress", "housekeeping",
           "wake_workers", "parse_upload", "save_upload", "method_fields", "available_methods",
           "changed_overrides", "field_to_text", "builtin_requests", "format_seconds", "JobError", "playground_entry",
           "playground_state"]


def export_bytes(store: RunStore, run_id: str, fmt: str = "csv") -> bytes:
    """The run's long-form rows (:meth:`RunStore.export`) as CSV or Parquet bytes."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = store.export(run_id, fmt, os.path.join(tmp, f"export.{fmt}"))
        with open(path, "rb") as fh:
            return fh.read()


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - a requirement
        return False
    return bool(torch.cuda.is_available())
