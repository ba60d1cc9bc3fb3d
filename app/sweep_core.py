"""The core of sweeps (:mod:`app.sweep` is the user-facing module): the spec and its trials, the sweep tables of
the run store, progress, the summary table, and one trial's execution -- everything both executors (the local one
of :func:`app.sweep.run_sweep` and :mod:`app.sweep_ray`) share. Nothing here imports an executor."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from editors.base import ConfigError
from editors.fields import did_you_mean

from .runconfig import RunConfig
from .sqlite_util import SQLiteFile
from .store import TERMINAL, RunStore

log = logging.getLogger(__name__)

#: statuses of a trial's latest run after which a re-run of the sweep skips the trial
DONE = frozenset({"finished", "diverged"})
EXECUTORS = ("local", "ray")
SPEC_KEYS = ("name", "model", "models", "method", "methods", "data", "n_edits", "batch_size", "eval_every",
             "checkpoint_schedule", "seed", "seeds", "run", "overrides", "grid", "points")
#: run fields a spec sets with its own keys (or that the sweep owns), not under ``run:``
_OWN_RUN_FIELDS = {"model": "model/models", "method": "method/methods", "data": "data", "n_edits": "n_edits",
                   "batch_size": "batch_size", "eval_every": "eval_every",
                   "checkpoint_schedule": "checkpoint_schedule", "seed": "seeds",
                   "method_overrides": "overrides/grid/points", "runs_dir": "the runs directory (--runs-dir)"}
#: metric kind of the unedited statistics of each edited matrix (fro, cond, ...), written after a trial's run
UNEDITED_KIND = "weights_unedited"


class SweepSpecError(ConfigError):
    """A sweep spec that cannot run; the message names the spec and what is wrong in it."""


# ---------------------------------------------------------------------------------------------------------------
# the spec and its trials
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trial:
    """One sequential run of a sweep: its grid ``point`` (model, method, swept values), ``seed`` and run config."""

    index: int
    key: str
    group: str
    point: dict
    seed: int
    config: RunConfig

    def describe(self) -> str:
        return point_text(self.point) + f" · seed {self.seed}"


@dataclass(frozen=True)
class SweepSpec:
    sweep_id: str
    spec: dict
    source: str
    trials: tuple[Trial, ...]


def point_text(point: Mapping[str, Any]) -> str:
    """``"memit @default mom2_update_weight=5000"``: the method, the model and the swept values of a grid point."""
    swept = " ".join(f"{k.split('.', 1)[1] if k.startswith(point['method'] + '.') else k}={v}"
                     for k, v in point.items() if k not in ("method", "model"))
    return f"{point['method']} @{point['model']}" + (f" {swept}" if swept else "")


def _digest(obj: Any, n: int = 10) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _read_spec(spec: str | os.PathLike | Mapping[str, Any]) -> tuple[dict, str]:
    if isinstance(spec, Mapping):
        return dict(spec), "<spec>"
    path = os.fspath(spec)
    if not os.path.isfile(path):
        raise SweepSpecError(f"sweep spec {path!r} does not exist")
    import yaml
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)  # JSON is YAML
    except (OSError, yaml.YAMLError) as exc:
        raise SweepSpecError(f"sweep spec {path}: cannot read it: {exc}") from exc
    if not isinstance(data, dict):
        raise SweepSpecError(f"sweep spec {path}: expected a mapping of keys ({', '.join(SPEC_KEYS)}), "
                             f"got {type(data).__name__}")
    return data, path


def _as_list(spec: dict, one: str, many: str, src: str, default: Any = None) -> list:
    if one in spec and many in spec:
        raise SweepSpecError(f"sweep spec {src}: give {one!r} or {many!r}, not both")
    if many in spec:
        val = spec[many]
        vals = list(val) if isinstance(val, (list, tuple)) else [val]
    elif one in spec:
        vals = [spec[one]]
    elif default is not None:
        vals = [default]
    else:
        raise SweepSpecError(f"sweep spec {src}: {many!r} (or {one!r}) is required")
    if not vals:
        raise SweepSpecError(f"sweep spec {src}: {many!r} is empty")
    return vals


def _seeds(spec: dict, src: str) -> list[int]:
    if "seed" in spec and "seeds" in spec:
        raise SweepSpecError(f"sweep spec {src}: give 'seed' or 'seeds', not both")
    raw = spec.get("seeds", spec.get("seed", [0]))
    if isinstance(raw, bool):
        raise SweepSpecError(f"sweep spec {src}: seeds must be a list of integers or a count, got {raw!r}")
    if isinstance(raw, int) and "seeds" in spec:
        if raw < 1:
            raise SweepSpecError(f"sweep spec {src}: seeds: a count must be >= 1, got {raw}")
        return list(range(raw))
    vals = raw if isinstance(raw, (list, tuple)) else [raw]
    try:
        out = [int(v) for v in vals]
    except (TypeError, ValueError) as exc:
        raise SweepSpecError(f"sweep spec {src}: seeds must be integers, got {vals!r}") from exc
    if len(set(out)) != len(out) or not out:
        raise SweepSpecError(f"sweep spec {src}: seeds must be distinct and not empty, got {out!r}")
    return out


def _mapping(spec: dict, key: str, src: str) -> dict:
    val = spec.get(key) or {}
    if not isinstance(val, Mapping):
        raise SweepSpecError(f"sweep spec {src}: {key!r} must be a mapping, got {type(val).__name__}")
    return dict(val)


def _route(key: str, methods: Sequence[str], src: str, where: str) -> tuple[str, str]:
    """``(scope, field)`` of a spec key: scope "run", a method name, or "*" (every method)."""
    if not isinstance(key, str) or not key.strip():
        raise SweepSpecError(f"sweep spec {src}: {where}: keys must be names, got {key!r}")
    head, dot, name = key.partition(".")
    if not dot:
        return "*", key
    if not name:
        raise SweepSpecError(f"sweep spec {src}: {where}: key {key!r} has no field after the dot")
    if head == "run":
        return "run", name
    if head in methods:
        return head, name
    from editors.registry import UnknownMethodError, get_editor_class
    try:
        canon = get_editor_class(head).name
    except UnknownMethodError as exc:
        raise SweepSpecError(f"sweep spec {src}: {where}: key {key!r}: {exc}") from exc
    if canon in methods:
        return canon, name
    raise SweepSpecError(f"sweep spec {src}: {where}: key {key!r} names method {canon!r}, which is not one of the "
                         f"sweep's methods ({', '.join(methods)})")


#: run fields that grid / points / overrides may set as ``run.FIELD`` although the spec has a key for them
_SWEEPABLE_OWN = ("data", "n_edits", "batch_size", "eval_every", "checkpoint_schedule")


def _check_run_fields(fields: Mapping[str, Any], src: str, where: str) -> None:
    valid = [f.name for f in dataclasses.fields(RunConfig)]
    for name in fields:
        if name in _OWN_RUN_FIELDS and not (where != "run" and name in _SWEEPABLE_OWN):
            raise SweepSpecError(f"sweep spec {src}: {where}: run field {name!r} is set by the spec's "
                                 f"{_OWN_RUN_FIELDS[name]!r}, not here")
        if name not in valid:
            raise SweepSpecError(f"sweep spec {src}: {where}: unknown run field {name!r}"
                                 f"{did_you_mean(name, valid)}; valid: {', '.join(sorted(valid))}")


def load_spec(spec: str | os.PathLike | Mapping[str, Any], runs_dir: str = "runs") -> SweepSpec:
    """Read, expand and validate a sweep spec (a path to YAML / JSON, or a mapping).

    Every trial's run config is validated (:meth:`RunConfig.validate`) and each data source is read once, so an
    unknown method, field or key, a bad value or an unreadable data file fails here, before anything runs.

    Raises:
        SweepSpecError: the spec, naming the key / trial and what is wrong (with "did you mean").
    """
    from editors.data import DataSourceError, load_requests
    from editors.registry import UnknownMethodError, get_editor_class
    from editors.requests import RequestError

    raw, src = _read_spec(spec)
    for key in raw:
        if key not in SPEC_KEYS:
            raise SweepSpecError(f"sweep spec {src}: unknown key {key!r}{did_you_mean(str(key), SPEC_KEYS)}; "
                                 f"valid: {', '.join(SPEC_KEYS)}")
    models = [str(m) for m in _as_list(raw, "model", "models", src, default="default")]
    try:
        methods = list(dict.fromkeys(get_editor_class(str(m)).name
                                     for m in _as_list(raw, "method", "methods", src)))
    except UnknownMethodError as exc:
        raise SweepSpecError(f"sweep spec {src}: {exc}") from exc
    seeds = _seeds(raw, src)
    run_fixed = _mapping(raw, "run", src)
    _check_run_fields(run_fixed, src, "run")
    overrides = _mapping(raw, "overrides", src)
    grid = _mapping(raw, "grid", src)
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise SweepSpecError(f"sweep spec {src}: grid: {key!r} must be a non-empty list of values, got "
                                 f"{values!r}")
    points = raw.get("points") or []
    if not isinstance(points, (list, tuple)) or not all(isinstance(p, Mapping) for p in points):
        raise SweepSpecError(f"sweep spec {src}: points must be a list of mappings {{KEY: value}}")
    routed: dict[str, tuple[str, str]] = {}
    for where, keys in (("overrides", overrides), ("grid", grid), *((f"points[{i}]", p) for i, p in
                                                                    enumerate(points))):
        for key in keys:
            routed[key] = _route(key, methods, src, where)
        _check_run_fields({routed[k][1]: v for k, v in keys.items() if routed[k][0] == "run"}, src, where)
    base = {"data": str(raw.get("data", "builtin"))}
    for key in ("n_edits", "batch_size", "eval_every", "checkpoint_schedule"):
        if key in raw:
            base[key] = raw[key]

    trials: list[Trial] = []
    for model, method in itertools.product(models, methods):
        mine = lambda k: routed[k][0] in ("*", "run", method)  # noqa: E731
        gkeys = [k for k in grid if mine(k)]
        plist = [{k: v for k, v in p.items() if mine(k)} for p in points] or [{}]
        plist = list({json.dumps(p, sort_keys=True, default=str): p for p in plist}.values())  # one each
        for values in itertools.product(*(grid[k] for k in gkeys)):
            for extra in plist:
                swept = {**dict(zip(gkeys, values)), **extra}
                method_over = {routed[k][1]: v for k, v in overrides.items() if routed[k][0] in ("*", method)}
                method_over.update({routed[k][1]: v for k, v in swept.items() if routed[k][0] in ("*", method)})
                run_over = {routed[k][1]: v for k, v in overrides.items() if routed[k][0] == "run"}
                run_over.update({routed[k][1]: v for k, v in swept.items() if routed[k][0] == "run"})
                point = {"model": model, "method": method, **swept}
                for seed in seeds:
                    trials.append(_make_trial(len(trials), point, seed, model, method, method_over,
                                              {**run_fixed, **run_over}, base, runs_dir, src))
    keys = [t.key for t in trials]
    if len(set(keys)) != len(keys):
        dup = next(t for t in trials if keys.count(t.key) > 1)
        raise SweepSpecError(f"sweep spec {src}: two trials are the same run ({dup.describe()}); remove the "
                             f"duplicate grid values or points")
    for source in sorted({t.config.data for t in trials}):
        n = max(t.config.n_edits for t in trials if t.config.data == source)
        try:
            got = len(load_requests(source, n))
        except (DataSourceError, RequestError) as exc:
            raise SweepSpecError(f"sweep spec {src}: data {source!r}: {exc}") from exc
        if got < n:
            log.warning("sweep spec %s: data %r has %d requests, fewer than n_edits=%d", src, source, got, n)
    sweep_id = _sweep_id(raw, src)
    return SweepSpec(sweep_id=sweep_id, spec=raw, source=src, trials=tuple(trials))


def _sweep_id(raw: Mapping[str, Any], src: str) -> str:
    name = raw.get("name")
    if name is None:
        return "sweep-" + _digest({k: v for k, v in raw.items() if k != "name"}, 8)
    name = str(name).strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.=+-]{0,79}", name):
        raise SweepSpecError(f"sweep spec {src}: name {name!r} must be 1-80 letters, digits or _ . = + - "
                             f"(it is the sweep id)")
    return name


def _make_trial(index: int, point: dict, seed: int, model: str, method: str, method_over: dict, run_over: dict,
                base: dict, runs_dir: str, src: str) -> Trial:
    where = f"trial {point_text(point)} · seed {seed}"
    try:
        config = RunConfig(model=model, method=method, method_overrides=dict(method_over), seed=seed,
                           runs_dir=runs_dir).replace(**{**base, **run_over})
        config.validate()
    except ConfigError as exc:
        raise SweepSpecError(f"sweep spec {src}: {where}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise SweepSpecError(f"sweep spec {src}: {where}: {type(exc).__name__}: {exc}") from exc
    ident = {k: v for k, v in config.to_dict().items() if k not in ("runs_dir", "label", "cache_dir")}
    group = _digest({k: v for k, v in ident.items() if k != "seed"})
    return Trial(index=index, key=_digest(ident, 16), group=group, point=point, seed=seed, config=config)


def trial_label(sweep_id: str, trial: Trial, prefix: str = "") -> str:
    return f"{prefix + ' · ' if prefix else ''}sweep {sweep_id} · {trial.describe()}"


# ---------------------------------------------------------------------------------------------------------------
# the sweep tables (in the run store's SQLite file)
# ---------------------------------------------------------------------------------------------------------------
_SWEEP_SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    sweep_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    spec_json TEXT NOT NULL,
    source TEXT,
    n_trials INTEGER NOT NULL,
    executor TEXT,
    host TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sweep_trials (
    sweep_id TEXT NOT NULL REFERENCES sweeps (sweep_id) ON DELETE CASCADE,
    trial_key TEXT NOT NULL,
    idx INTEGER NOT NULL,
    group_key TEXT NOT NULL,
    point_json TEXT NOT NULL,
    seed INTEGER NOT NULL,
    PRIMARY KEY (sweep_id, trial_key)
);
CREATE TABLE IF NOT EXISTS sweep_runs (
    sweep_id TEXT NOT NULL REFERENCES sweeps (sweep_id) ON DELETE CASCADE,
    run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    trial_key TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (sweep_id, run_id)
);
CREATE INDEX IF NOT EXISTS sweep_runs_trial ON sweep_runs (sweep_id, trial_key);
"""
#: the sweep tables and their columns, in order (:mod:`app.merge` copies them)
SWEEP_TABLES = {
    "sweeps": ("sweep_id", "created", "updated", "spec_json", "source", "n_trials", "executor", "host",
               "cancel_requested"),
    "sweep_trials": ("sweep_id", "trial_key", "idx", "group_key", "point_json", "seed"),
    "sweep_runs": ("sweep_id", "run_id", "trial_key", "attempt", "created"),
}


class SweepStore(SQLiteFile):
    """The sweep tables of a run store's file: which trials a sweep has and which runs each trial made.

    ``sweeps`` (one row per sweep: its spec, trial count, executor, a cancel flag), ``sweep_trials`` (the trials
    of the sweep's latest spec: key, grid point, seed) and ``sweep_runs`` (every run a trial made, with its
    attempt number; a trial's state is its latest run's status)."""

    _PRAGMAS = ("PRAGMA foreign_keys = ON",)

    def __init__(self, store: RunStore | str | os.PathLike):
        store = store if isinstance(store, RunStore) else RunStore(store, recover=False)
        self.path, self.timeout = store.path, store.timeout
        with self._tx() as conn:
            for stmt in _SWEEP_SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)

    def register(self, spec: SweepSpec, executor: str) -> None:
        """Record the sweep and the trials of this spec (a spec changed under the same name replaces the trial
        list; runs made earlier stay)."""
        now = time.time()
        with self._tx() as conn:
            conn.execute("INSERT INTO sweeps (sweep_id, created, updated, spec_json, source, n_trials, executor, host) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sweep_id) DO UPDATE SET updated = "
                         "excluded.updated, spec_json = excluded.spec_json, source = excluded.source, n_trials = "
                         "excluded.n_trials, executor = excluded.executor, host = excluded.host, "
                         "cancel_requested = 0",
                         (spec.sweep_id, now, now, json.dumps(spec.spec, default=str), spec.source,
                          len(spec.trials), executor, socket.gethostname()))
            conn.execute("DELETE FROM sweep_trials WHERE sweep_id = ?", (spec.sweep_id,))
            conn.executemany("INSERT INTO sweep_trials (sweep_id, trial_key, idx, group_key, point_json, seed) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             [(spec.sweep_id, t.key, t.index, t.group, json.dumps(t.point, default=str), t.seed)
                              for t in spec.trials])

    def add_run(self, sweep_id: str, trial_key: str, run_id: str) -> int:
        """Record that the trial made run ``run_id``; returns its attempt number (1, 2, ...)."""
        with self._tx() as conn:
            n = conn.execute("SELECT COUNT(*) FROM sweep_runs WHERE sweep_id = ? AND trial_key = ?",
                             (sweep_id, trial_key)).fetchone()[0]
            conn.execute("INSERT INTO sweep_runs (sweep_id, run_id, trial_key, attempt, created) VALUES "
                         "(?, ?, ?, ?, ?)", (sweep_id, run_id, trial_key, n + 1, time.time()))
        return n + 1

    def split_attempt(self, sweep_id: str, trial_key: str, run_id: str, error: str) -> str | None:
        """An earlier attempt of a trial died while it ran ``run_id`` and the trial starts again under that id: move
        the dead attempt (its run row and every row written) to a new run id, ``failed`` with ``error``, recorded as
        the trial's previous attempt, and put ``run_id`` back to ``queued`` with no rows. One transaction. Returns
        the dead attempt's new id (None if ``run_id`` was not running / interrupted: nothing to split)."""
        from .store import new_run_id
        with self._tx() as conn:
            row = conn.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None or row[0] not in ("running", "interrupted"):
                return None
            dead = new_run_id()
            cols = [r[1] for r in conn.execute("PRAGMA table_info(runs)") if r[1] != "run_id"]
            conn.execute(f"INSERT INTO runs (run_id, {', '.join(cols)}) SELECT ?, {', '.join(cols)} FROM runs "
                         f"WHERE run_id = ?", (dead, run_id))
            for table in ("edits", "metrics", "artifacts"):
                conn.execute(f"UPDATE {table} SET run_id = ? WHERE run_id = ?", (dead, run_id))
            _move_artifact_files(conn, os.path.dirname(self.path), run_id, dead)
            conn.execute("UPDATE runs SET status = 'failed', error = ?, updated = ? WHERE run_id = ?",
                         (error, time.time(), dead))
            conn.execute("UPDATE runs SET status = 'queued', error = NULL, n_edits_done = 0, seconds_total = NULL, "
                         "pid = NULL, heartbeat = NULL, updated = ? WHERE run_id = ?", (time.time(), run_id))
            link = conn.execute("SELECT attempt, created FROM sweep_runs WHERE sweep_id = ? AND run_id = ?",
                                (sweep_id, run_id)).fetchone()
            if link is not None:
                top = conn.execute("SELECT MAX(attempt) FROM sweep_runs WHERE sweep_id = ? AND trial_key = ?",
                                   (sweep_id, trial_key)).fetchone()[0]
                conn.execute("INSERT INTO sweep_runs (sweep_id, run_id, trial_key, attempt, created) VALUES "
                             "(?, ?, ?, ?, ?)", (sweep_id, dead, trial_key, link[0], link[1]))
                conn.execute("UPDATE sweep_runs SET attempt = ?, created = ? WHERE sweep_id = ? AND run_id = ?",
                             (top + 1, time.time(), sweep_id, run_id))
        return dead

    def request_cancel(self, sweep_id: str) -> list[str]:
        """Flag the sweep cancelled (its driver stops its trials) and ask each queued / running trial run to stop
        (a queued run is cancelled at once). Returns the run ids asked."""
        sweep_id = self.resolve(sweep_id)
        with self._tx() as conn:
            conn.execute("UPDATE sweeps SET cancel_requested = 1, updated = ? WHERE sweep_id = ?",
                         (time.time(), sweep_id))
            ids = [r[0] for r in conn.execute(
                "SELECT r.run_id FROM sweep_runs s JOIN runs r ON r.run_id = s.run_id WHERE s.sweep_id = ? AND "
                "r.status IN ('queued', 'running')", (sweep_id,)).fetchall()]
        store = RunStore(self.path, recover=False)
        for run_id in ids:
            store.request_cancel(run_id)
        return ids

    def cancel_requested(self, sweep_id: str) -> bool:
        with self._read() as conn:
            row = conn.execute("SELECT cancel_requested FROM sweeps WHERE sweep_id = ?", (sweep_id,)).fetchone()
        return bool(row and row[0])

    def resolve(self, sweep_id: str) -> str:
        """The full id of ``sweep_id`` or of the one sweep whose id starts with it."""
        with self._read() as conn:
            rows = [r[0] for r in conn.execute("SELECT sweep_id FROM sweeps WHERE sweep_id = ? OR sweep_id LIKE ? "
                                               "ESCAPE '\\' ORDER BY sweep_id", (sweep_id, _like(sweep_id)))]
        if sweep_id in rows:
            return sweep_id
        if len(rows) == 1:
            return rows[0]
        if not rows:
            with self._read() as conn:
                known = [r[0] for r in conn.execute("SELECT sweep_id FROM sweeps")]
            raise KeyError(f"no sweep {sweep_id!r} in {self.path}{did_you_mean(sweep_id, known)}"
                           + (f"; sweeps: {', '.join(sorted(known))}" if known else "; it has no sweeps"))
        raise KeyError(f"sweep id prefix {sweep_id!r} is ambiguous: {', '.join(rows)}")

    def list_sweeps(self) -> pd.DataFrame:
        with self._read() as conn:
            rows = conn.execute("SELECT sweep_id, created, updated, n_trials, executor, host, cancel_requested "
                                "FROM sweeps ORDER BY created DESC").fetchall()
        return pd.DataFrame([tuple(r) for r in rows], columns=["sweep_id", "created", "updated", "n_trials",
                                                               "executor", "host", "cancel_requested"])

    def spec(self, sweep_id: str) -> dict:
        with self._read() as conn:
            row = conn.execute("SELECT spec_json FROM sweeps WHERE sweep_id = ?", (self.resolve(sweep_id),)
                               ).fetchone()
        return json.loads(row[0])

    def trials(self, sweep_id: str) -> pd.DataFrame:
        """One row per trial of the sweep's latest spec: ``idx, trial_key, group_key, point (dict), seed, run_id
        (its latest run, or None), attempts, status ('pending' without a run), n_edits_done, n_edits_planned,
        seconds_total, error, created, updated``."""
        sweep_id = self.resolve(sweep_id)
        with self._read() as conn:
            rows = conn.execute(
                "SELECT t.idx, t.trial_key, t.group_key, t.point_json, t.seed, r.run_id, "
                "(SELECT COUNT(*) FROM sweep_runs c WHERE c.sweep_id = t.sweep_id AND c.trial_key = t.trial_key), "
                "r.status, r.n_edits_done, r.n_edits_planned, r.seconds_total, r.error, r.created, r.updated "
                "FROM sweep_trials t LEFT JOIN runs r ON r.run_id = (SELECT s.run_id FROM sweep_runs s WHERE "
                "s.sweep_id = t.sweep_id AND s.trial_key = t.trial_key ORDER BY s.attempt DESC, s.created DESC "
                "LIMIT 1) "
                "WHERE t.sweep_id = ? ORDER BY t.idx", (sweep_id,)).fetchall()
        cols = ["idx", "trial_key", "group_key", "point", "seed", "run_id", "attempts", "status", "n_edits_done",
                "n_edits_planned", "seconds_total", "error", "created", "updated"]
        df = pd.DataFrame([tuple(r) for r in rows], columns=cols)
        df["point"] = [json.loads(p) for p in df["point"]]
        df["status"] = df["status"].fillna("pending")
        return df

    def run_ids(self, sweep_id: str, latest_only: bool = False) -> list[str]:
        """Every run the sweep's trials made (oldest first), or only each trial's latest one."""
        sweep_id = self.resolve(sweep_id)
        if latest_only:
            return [r for r in self.trials(sweep_id)["run_id"] if isinstance(r, str)]
        with self._read() as conn:
            return [r[0] for r in conn.execute("SELECT run_id FROM sweep_runs WHERE sweep_id = ? ORDER BY created",
                                               (sweep_id,))]

    def sweep_of_runs(self) -> dict[str, str]:
        """``{run_id: sweep_id}`` of every run made by a sweep."""
        with self._read() as conn:
            return {r[0]: r[1] for r in conn.execute("SELECT run_id, sweep_id FROM sweep_runs")}


def _move_artifact_files(conn, runs_dir: str, old: str, new: str) -> None:
    """The file artifacts (format ``*-file``, :attr:`RunStore.blob_limit`) of the rows now under run ``new``: moved
    from ``artifacts/<old>/`` to ``artifacts/<new>/`` with their rows' paths (deleting ``old`` keeps them)."""
    rows = conn.execute("SELECT rowid, blob FROM artifacts WHERE run_id = ? AND format LIKE '%-file'",
                        (new,)).fetchall()
    for rowid, blob in rows:
        rel = bytes(blob).decode()
        moved = os.path.join("artifacts", new, os.path.basename(rel))
        src, dst = os.path.join(runs_dir, rel), os.path.join(runs_dir, moved)
        if os.path.exists(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        conn.execute("UPDATE artifacts SET blob = ? WHERE rowid = ?", (moved.encode(), rowid))


def _like(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def sweep_tables_exist(store: RunStore) -> bool:
    """Whether the store's file has sweep tables (without creating them)."""
    import sqlite3
    conn = sqlite3.connect(store.path)
    try:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sweeps'").fetchone() \
            is not None
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------------------
# progress and the summary
# ---------------------------------------------------------------------------------------------------------------
def sweep_progress(sweeps: SweepStore, sweep_id: str, *, parallel: int | None = None) -> dict[str, Any]:
    """``{sweep_id, total, pending, queued, running, finished, diverged, failed, cancelled, interrupted, done,
    edits_done, edits_planned, eta_seconds}`` from the store. ``done`` counts finished + diverged trials;
    ``eta_seconds`` (None until a trial finished): the mean wall seconds of the finished trials times the trials
    left, divided by ``parallel`` (default: the trials running now, at least 1) -- an estimate."""
    df = sweeps.trials(sweep_id)
    counts = df["status"].value_counts().to_dict()
    out: dict[str, Any] = {"sweep_id": sweeps.resolve(sweep_id), "total": int(len(df))}
    for s in ("pending", "queued", "running", "finished", "diverged", "failed", "cancelled", "interrupted"):
        out[s] = int(counts.get(s, 0))
    out["done"] = out["finished"] + out["diverged"]
    out["edits_done"] = int(df["n_edits_done"].fillna(0).sum())
    out["edits_planned"] = int(df["n_edits_planned"].fillna(0).sum())
    fin = df[df["status"].isin(list(DONE))]["seconds_total"].dropna()
    left = out["total"] - out["done"] - out["failed"] - out["cancelled"] - out["interrupted"]
    slots = parallel or max(1, out["running"])
    out["eta_seconds"] = float(fin.mean() * left / slots) if len(fin) and left > 0 else (0.0 if left == 0 else None)
    return out


def progress_text(p: Mapping[str, Any]) -> str:
    eta = p.get("eta_seconds")
    eta_s = "" if eta is None else f", ETA {eta / 60:.1f} min" if eta >= 60 else f", ETA {eta:.0f} s"
    return (f"{p['done']}/{p['total']} done, {p['running']} running, {p['queued'] + p['pending']} waiting, "
            f"{p['failed']} failed, {p['cancelled']} cancelled{eta_s}")


#: the summary's per-run quantities (final retention at the last checkpoint, tf_token_acc; norm / cond growth)
SUMMARY_METRICS = ("reliability", "generality", "locality", "fro_growth", "cond_growth", "collapse_step")


def run_quantities(store: RunStore, run_id: str) -> dict[str, float | None]:
    """The summary's numbers of one run: final retention reliability / generality / locality (tf_token_acc, last
    checkpoint; :func:`app.engine.run_summary`), ``fro_growth`` / ``cond_growth`` (the mean over edited matrices of
    Frobenius norm / condition number at the last checkpoint divided by the unedited matrix's, from the
    :data:`UNEDITED_KIND` rows a sweep trial writes; None without them) and ``collapse_step`` (the earliest
    ``collapse:*`` event of :mod:`analysis.collapse`, in edits; None when nothing collapsed)."""
    from .engine import run_summary
    summary = run_summary(store, run_id)
    out: dict[str, float | None] = dict(summary["final"])
    df = store.metrics_frame([run_id], kinds=["weights", UNEDITED_KIND, "collapse"])
    w, w0 = df[df["kind"] == "weights"], df[df["kind"] == UNEDITED_KIND]
    for metric, name in (("fro", "fro_growth"), ("cond", "cond_growth")):
        ratios = []
        if len(w) and len(w0):
            last = w[(w["n_edits"] == w["n_edits"].max()) & (w["metric"] == metric)]
            ref = dict(zip(w0.loc[w0["metric"] == metric, "param"], w0.loc[w0["metric"] == metric, "value"]))
            for param, value in zip(last["param"], last["value"]):
                r0 = ref.get(param)
                if r0 is not None and r0 > 0 and math.isfinite(r0) and not math.isnan(value):
                    ratios.append(value / r0)
        out[name] = float(sum(ratios) / len(ratios)) if ratios else None
    col = df[(df["kind"] == "collapse") & df["metric"].str.startswith("collapse:") & (df["value"] == 1.0)]
    out["collapse_step"] = float(col["n_edits"].min()) if len(col) else None
    return out


def sweep_summary(store: RunStore, sweep_id: str, sweeps: SweepStore | None = None) -> pd.DataFrame:
    """The sweep table: one row per grid point (model, method, swept values; seeds pooled) with ``seeds`` (trials
    of the point), ``finished`` (those whose latest run finished or diverged: the ones averaged), ``status`` (the
    point's trials' statuses) and, for each of :data:`SUMMARY_METRICS`, ``<metric>_mean`` and ``<metric>_std``
    (sample std over the finished seeds, ddof=1; NaN with one) plus ``collapsed`` ("k/n": runs with a collapse
    event). Rows in the spec's trial order."""
    sweeps = sweeps or SweepStore(store)
    trials = sweeps.trials(sweep_id)
    rows = []
    for group, g in trials.groupby("group_key", sort=False):
        point = g["point"].iloc[0]
        done = g[g["status"].isin(list(DONE))]
        q = pd.DataFrame([run_quantities(store, r) for r in done["run_id"]], columns=list(SUMMARY_METRICS),
                         dtype="float64")
        row: dict[str, Any] = {"point": point_text(point), "method": point["method"], "model": point["model"],
                               "seeds": len(g), "finished": len(done),
                               "status": ", ".join(f"{k} {v}" for k, v in g["status"].value_counts().items())}
        for m in SUMMARY_METRICS:
            vals = q[m].dropna() if len(q) else pd.Series(dtype="float64")
            row[f"{m}_mean"] = float(vals.mean()) if len(vals) else math.nan
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        row["collapsed"] = f"{int(q['collapse_step'].notna().sum()) if len(q) else 0}/{len(done)}"
        row["group_key"] = group
        rows.append(row)
    return pd.DataFrame(rows)


def mean_std_view(df: pd.DataFrame, missing: str) -> pd.DataFrame:
    """point, seeds, finished, every summary metric as text ``mean ± std`` (std omitted with one seed, ``missing``
    without a value) and collapsed, from :func:`sweep_summary`'s table."""
    view = df[["point", "seeds", "finished"]].copy()
    for m in SUMMARY_METRICS:
        digits = 1 if m == "collapse_step" else 3
        view[m] = [(missing if pd.isna(mu) else f"{mu:.{digits}f}" + ("" if pd.isna(sd) else f" ± {sd:.{digits}f}"))
                   for mu, sd in zip(df[f"{m}_mean"], df[f"{m}_std"])]
    view["collapsed"] = df["collapsed"]
    return view


def format_summary(df: pd.DataFrame) -> str:
    """The sweep table as text: ``mean ± std`` per metric (std omitted with one seed)."""
    if df.empty:
        return "(no trials)"
    view = mean_std_view(df, "n/a")
    return view.rename(columns={"fro_growth": "fro/fro0", "cond_growth": "cond/cond0",
                                "collapse_step": "collapse@"}).to_string(index=False)


# ---------------------------------------------------------------------------------------------------------------
# one trial
# ---------------------------------------------------------------------------------------------------------------
def unedited_rows(lm, params: Sequence[str]) -> list[dict]:
    """Rows of kind :data:`UNEDITED_KIND` (n_edits 0): ``fro, cond, spectral, effective_rank`` of each of
    ``params`` in the model as it is now (unedited: the engine restores a given model exactly)."""
    from analysis.weights import matrix_stats
    named = dict(lm.model.named_parameters())
    rows = []
    for name in params:
        if name not in named:
            continue
        stats = matrix_stats(lm.spec.to_canonical(named[name].detach()).float())
        for metric in ("fro", "cond", "spectral", "effective_rank"):
            rows.append({"n_edits": 0, "step": 0, "kind": UNEDITED_KIND, "layer": lm.spec.layer_of(name),
                         "param": name, "metric": metric, "value": float(stats[metric])})
    return rows


def execute_trial(config: RunConfig | Mapping[str, Any], run_id: str, store, sweeps, *, sweep_id: str,
                  trial_key: str, threads: int | None = None, device: str | None = None, lm=None,
                  should_cancel: Callable[[], bool] | None = None, progress=None) -> dict[str, Any]:
    """Run one trial: the ordinary sequential run ``run_id`` (queued by :func:`app.engine.queue_run`) through
    :func:`app.engine.run_sequential`, then its matrices' unedited statistics (:func:`unedited_rows`).

    ``store`` / ``sweeps`` are the run store and the sweep tables, or proxies of them (:mod:`app.sweep_ray`). If the
    run is no longer queued but ``running`` / ``interrupted``, an earlier attempt of this trial died mid-run (a
    retried Ray task): that run is marked ``failed`` with its rows kept and the trial runs again as a new run. A
    ``KeyboardInterrupt`` (Ray's cancellation, Ctrl-C) marks the run ``cancelled`` (rows kept) and is re-raised.

    Returns ``{run_id, status, error, host, pid, t_start, t_loaded, t_end}`` (wall-clock seconds since the epoch).
    """
    from .engine import queue_run, run_sequential
    t_start = time.time()
    if threads:
        import torch
        torch.set_num_threads(int(threads))
    cfg = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    if device and cfg.device is None:
        cfg = dataclasses.replace(cfg, device=device)
    out = {"run_id": run_id, "status": None, "error": None, "host": socket.gethostname(), "pid": os.getpid(),
           "t_start": t_start, "t_loaded": None, "t_end": None}
    try:
        run = store.get_run(run_id)
        if run["status"] in ("running", "interrupted"):
            store.update_status(run_id, "failed", error=f"the trial's worker (host {run['host']}, pid {run['pid']}) "
                                f"died mid-run; the trial was run again as a new run (sweep {sweep_id})")
            run_id, _ = queue_run(cfg, store)
            sweeps.add_run(sweep_id, trial_key, run_id)
            out["run_id"] = run_id
        elif run["status"] in TERMINAL:
            out["status"] = run["status"]
            return out
        if lm is None:
            from editors.models import load_model
            lm = load_model(cfg.model, device=cfg.device)
        out["t_loaded"] = time.time()
        try:
            run_sequential(cfg, store, lm=lm, run_id=run_id, should_cancel=should_cancel, progress=progress)
        except Exception as exc:  # the engine recorded the run as failed with the error and kept its rows
            out["error"] = f"{type(exc).__name__}: {exc}"
        if cfg.weights:
            try:
                params = sorted(set(store.metrics_frame([run_id], kinds=["weights"])["param"].dropna()))
                rows = unedited_rows(lm, params)
                if rows:
                    store.add_metric_rows(run_id, rows)
            except Exception as exc:  # diagnostics must not lose a run
                log.warning("unedited statistics of run %s failed: %s", run_id, exc)
    except KeyboardInterrupt:
        try:
            store.update_status(run_id, "cancelled", error=f"cancelled with sweep {sweep_id}")
        finally:
            out["status"] = "cancelled"
        raise
    out["status"] = store.get_run(run_id)["status"]
    out["t_end"] = time.time()
    return out


# ---------------------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    sweep_id: str
    trials: pd.DataFrame
    started: list[str]
    skipped: list[str]
    seconds: float
    info: dict = dataclasses.field(default_factory=dict)


def plan(spec: SweepSpec, store: RunStore | None) -> pd.DataFrame:
    """The dry run: one row per trial (``idx, point, seed, action, run_id, status``); ``action`` is ``skip`` for a
    trial whose latest run in ``store`` finished or diverged, ``run`` otherwise."""
    known: dict[str, tuple[str, str]] = {}
    if store is not None and sweep_tables_exist(store):
        sweeps = SweepStore(store)
        try:
            old = sweeps.trials(spec.sweep_id)
        except KeyError:
            old = None
        if old is not None:
            known = {k: (r, s) for k, r, s in zip(old["trial_key"], old["run_id"], old["status"])}
    rows = []
    for t in spec.trials:
        run_id, status = known.get(t.key, (None, "pending"))
        rows.append({"idx": t.index, "point": point_text(t.point), "seed": t.seed,
                     "action": "skip" if status in DONE else "run", "run_id": run_id, "status": status,
                     "trial_key": t.key})
    return pd.DataFrame(rows)


def queue_trials(spec: SweepSpec, store, sweeps, executor: str) -> tuple[list[tuple[Trial, str]], list[str]]:
    """Register the sweep and queue a run for every trial not yet done; returns ([(trial, run_id)], skipped keys).
    ``store`` / ``sweeps`` may be proxies (:mod:`app.sweep_ray`)."""
    from .engine import queue_run
    sweeps.register(spec, executor)
    state = sweeps.trials(spec.sweep_id)
    latest = dict(zip(state["trial_key"], state["status"]))
    todo, skipped = [], []
    for t in spec.trials:
        if latest.get(t.key) in DONE:
            skipped.append(t.key)
            continue
        config = dataclasses.replace(t.config, label=trial_label(spec.sweep_id, t, t.config.label))
        run_id, _ = queue_run(config, store)
        sweeps.add_run(spec.sweep_id, t.key, run_id)
        todo.append((dataclasses.replace(t, config=config), run_id))
    return todo, skipped


def cancel_left(store, run_ids: Sequence[str], why: str) -> None:
    """Mark the runs of ``run_ids`` that are not terminal ``cancelled`` (rows kept)."""
    for run_id in run_ids:
        run = store.get_run(run_id)
        if run["status"] not in TERMINAL:
            store.update_status(run_id, "cancelled", error=why)
