"""Where on-disk caches live: ``$EDITBENCH_CACHE`` or ``~/.cache/editbench``."""
from __future__ import annotations

import os


def cache_root(override: str | None = None) -> str:
    root = override or os.environ.get("EDITBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "editbench")
    os.makedirs(root, exist_ok=True)
    return root


def cache_path(*parts: str, root: str | None = None) -> str:
    path = os.path.join(cache_root(root), *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path
