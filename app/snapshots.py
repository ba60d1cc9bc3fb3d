"""Resume snapshots of a sequential run: what a killed, interrupted or cancelled run needs to continue exactly
where its last snapshot left it, instead of starting again from edit 1.

A snapshot is one ``.npz`` file (no pickles) in ``<runs_dir>/snapshots/<run_id>/``, written atomically (a temporary
file, then ``os.replace``) right after a step's rows were committed, so its edit count always equals a count the
store has recorded. It holds

* ``param|<name>``: the current value of every parameter the run watches (the edited matrices; float32 copies, so
  a bfloat16 model round-trips exactly) — with the unedited model loaded again, these ARE the run's model;
* ``editor|<key>``: the editor's :meth:`~editors.base.Editor.state_dict` (running statistics, key moments, a
  codebook, generator states);
* ``hidden|<layer>``, ``prev|<name>``: the engine's hidden-state baselines and the last update per matrix (the
  update-angle diagnostics);
* ``meta``: JSON with the counters (edits, steps, seconds per phase, peak memory), the model hash, the RNG states of
  ``random`` / numpy / torch and the format version.

Only the newest :data:`KEEP` snapshots of a run are kept; a run that ends ``finished`` or ``diverged`` deletes its
folder (nothing is left to resume). Size per snapshot = the edited matrices in float32 (ROME on the default model:
3.5 MB; MEMIT's five layers 17.7 MB) plus the editor's state.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Mapping

import numpy as np

FORMAT = 1
#: snapshots kept per run (the newest); two, so a crash while the newest one is written leaves one intact
KEEP = 2
_NAME = re.compile(r"^step-(\d{8})\.npz$")


class SnapshotError(RuntimeError):
    """A snapshot cannot be used (missing, unreadable, of another model or format); the message says which."""


def snapshot_dir(runs_dir: str, run_id: str) -> str:
    return os.path.join(runs_dir, "snapshots", run_id)


def list_snapshots(runs_dir: str, run_id: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of a run's complete snapshot files, oldest first (temporary files are ignored)."""
    folder = snapshot_dir(runs_dir, run_id)
    if not os.path.isdir(folder):
        return []
    out = []
    for name in os.listdir(folder):
        m = _NAME.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(out)


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy copy; torch floating tensors other than float32 / float64 (bfloat16, float16) as float32 (exact)."""
    if hasattr(value, "detach"):
        import torch
        value = value.detach().to("cpu")
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def save_snapshot(runs_dir: str, run_id: str, step: int, *, meta: Mapping[str, Any],
                  params: Mapping[str, Any], editor_state: Mapping[str, Any],
                  hidden: Mapping[int, np.ndarray] | None = None, prev: Mapping[str, Any] | None = None,
                  keep: int = KEEP) -> str:
    """Write the snapshot of ``step`` and drop all but the newest ``keep``; returns its path."""
    folder = snapshot_dir(runs_dir, run_id)
    os.makedirs(folder, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"meta": np.asarray(json.dumps({**dict(meta), "format": FORMAT, "step": step}))}
    for name, value in params.items():
        arrays[f"param|{name}"] = _to_numpy(value)
    for key, value in (editor_state or {}).items():
        arrays[f"editor|{key}"] = _to_numpy(value)
    for layer, value in (hidden or {}).items():
        arrays[f"hidden|{int(layer)}"] = np.asarray(value)
    for name, value in (prev or {}).items():
        arrays[f"prev|{name}"] = _to_numpy(value)
    path = os.path.join(folder, f"step-{int(step):08d}.npz")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for _, old in list_snapshots(runs_dir, run_id)[:-keep] if keep > 0 else []:
        try:
            os.remove(old)
        except OSError:
            pass
    return path


def load_snapshot(path: str) -> dict[str, Any]:
    """``{"meta", "params", "editor_state", "hidden", "prev"}`` of a snapshot file.

    Raises:
        SnapshotError: unreadable, or of an unknown format.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"snapshot {path} cannot be read: {exc}") from exc
    if "meta" not in data:
        raise SnapshotError(f"snapshot {path} has no meta record")
    meta = json.loads(str(data.pop("meta")))
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"snapshot {path} has format {meta.get('format')!r}; this version reads {FORMAT}")
    out: dict[str, Any] = {"meta": meta, "params": {}, "editor_state": {}, "hidden": {}, "prev": {}}
    for key, value in data.items():
        part, _, name = key.partition("|")
        if part == "param":
            out["params"][name] = value
        elif part == "editor":
            out["editor_state"][name] = value
        elif part == "hidden":
            out["hidden"][int(name)] = value
        elif part == "prev":
            out["prev"][name] = value
    return out


def delete_snapshots(runs_dir: str, run_id: str) -> None:
    shutil.rmtree(snapshot_dir(runs_dir, run_id), ignore_errors=True)


__all__ = ["FORMAT", "KEEP", "SnapshotError", "snapshot_dir", "list_snapshots", "save_snapshot", "load_snapshot",
           "delete_snapshots"]
