"""Small helpers for documented config fields (every field of a method config carries help text).

``field(default=5, metadata=help_meta("Decoder layer ... (ROME paper, Eq. 2)."))`` is the same as writing
``metadata={"help": ...}``; :meth:`editors.base.EditorConfig.field_help` reads it back.
"""
from __future__ import annotations


def help_meta(text: str) -> dict[str, str]:
    """The ``metadata`` of a documented dataclass field: ``{"help": text}``."""
    return {"help": text}


__all__ = ["help_meta"]
