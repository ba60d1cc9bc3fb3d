"""Typed edit requests.

An :class:`EditRequest` is one fact to rewrite: ``prompt`` is a complete string that contains ``subject``
(e.g. "The Eiffel Tower is located in the city of", subject "The Eiffel Tower"); the model should continue it
with ``target_new`` instead of ``target_true``. Targets are stored without their leading space; every consumer
tokenises ``" " + target`` (the EasyEdit / ROME convention, see ../shared/guides/EVALUATION.md).

Normalisation happens once, here, when a request is built: a malformed record raises
:class:`RequestError` naming the source, the record and the field.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

#: control characters a request's text may not hold (C0 but tab / newline / carriage return, DEL, C1): a NUL or an
#: escape sequence in a prompt or target is a broken file, not a fact; subjects and targets are one line (no \n)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LINE_BREAK = re.compile(r"[\n\r]")


@dataclass(frozen=True)
class RequestLimits:
    """Size bounds of one request, in characters (a prompt of 2,000 characters is ~500 tokens; the engine also
    bounds token counts once the tokenizer is known). Defaults from ``EDITBENCH_MAX_PROMPT_CHARS``,
    ``EDITBENCH_MAX_TARGET_CHARS`` and ``EDITBENCH_MAX_LIST_ITEMS`` (see :func:`request_limits`)."""

    prompt_chars: int = 2000
    target_chars: int = 300
    list_items: int = 100


def request_limits() -> RequestLimits:
    """The limits in force: :class:`RequestLimits`' defaults, overridden by the environment variables it names."""
    d = RequestLimits()

    def env(name: str, default: int) -> int:
        try:
            return max(1, int(os.environ.get(name, default)))
        except ValueError:
            return default
    return RequestLimits(env("EDITBENCH_MAX_PROMPT_CHARS", d.prompt_chars),
                         env("EDITBENCH_MAX_TARGET_CHARS", d.target_chars),
                         env("EDITBENCH_MAX_LIST_ITEMS", d.list_items))


def check_required_text(value, source, record, name: str, error=None) -> str:
    """``value`` when it is a string with a non-blank character; else raises ``error`` (default
    :class:`RequestError`) for ``(source, record, name)`` with the problem "missing", "expected a string, got T" or
    "empty"."""
    error = error or RequestError
    if value is None:
        raise error(source, record, name, "missing")
    if not isinstance(value, str):
        raise error(source, record, name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise error(source, record, name, "empty")
    return value


def _check_text(value: str, source, record, name: str, limit: int, one_line: bool, error=None) -> None:
    error = error or RequestError
    bad = _CONTROL.search(value) or (_LINE_BREAK.search(value) if one_line else None)
    if bad:
        raise error(source, record, name, f"contains the control character {bad.group()!r} at position "
                                                 f"{bad.start()} (text fields hold printable text"
                                                 + (" on one line)" if one_line else ")"))
    if len(value) > limit:
        env = "EDITBENCH_MAX_TARGET_CHARS" if one_line else "EDITBENCH_MAX_PROMPT_CHARS"  # subjects, targets: one line
        raise error(source, record, name, f"{len(value):,} characters, over the limit of {limit:,} ({env})")


class RequestError(ValueError):
    """A malformed edit record. The message names the source file, the record and the field."""

    def __init__(self, source: str, record: object, field_name: str, problem: str):
        self.source = source
        self.record = record
        self.field_name = field_name
        self.problem = problem
        super().__init__(f"{source}: record {record}: field '{field_name}': {problem}")


@dataclass(frozen=True)
class EditRequest:
    """One counterfactual edit.

    Attributes:
        case_id: identifier, unique within a data set.
        prompt: full prompt containing ``subject`` (no target).
        subject: the entity whose fact is edited; must occur in ``prompt``.
        target_new: the new object (no leading space).
        target_true: the original object (may be empty when unknown, e.g. user edits).
        rephrase_prompts: paraphrases of ``prompt`` (generality).
        locality_prompts: unrelated prompts (locality / specificity).
        locality_answers: one answer per locality prompt (its tokens mark where locality is measured).
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str = ""
    rephrase_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[str, ...] = ()
    locality_answers: tuple[str, ...] = ()
    relation: str = ""
    extra: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def prompt_template(self) -> str:
        """The prompt with the first occurrence of the subject replaced by ``{}`` (ROME's template form)."""
        i = self.prompt.index(self.subject)
        return self.prompt[:i] + "{}" + self.prompt[i + len(self.subject):]

    def to_dict(self) -> dict:
        return {
            "case_id": self.case_id,
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "rephrase_prompts": list(self.rephrase_prompts),
            "locality_prompts": list(self.locality_prompts),
            "locality_answers": list(self.locality_answers),
            "relation": self.relation,
        }


def _as_tuple(value, source, record, name, error=RequestError) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise error(source, record, name, f"expected a string or a list of strings, got {type(value).__name__}")


def make_request(
    *,
    source: str,
    record: object,
    case_id,
    prompt,
    subject,
    target_new,
    target_true="",
    rephrase_prompts=(),
    locality_prompts=(),
    locality_answers=(),
    relation: str = "",
    limits: RequestLimits | None = None,
    names: "dict[str, str] | None" = None,
) -> EditRequest:
    """Validate and normalise one record into an :class:`EditRequest`.

    Raises:
        RequestError: missing/empty field, subject absent from the prompt, locality prompts and answers of
            different lengths, a control character (NUL, escape, ...; a line break in a subject or a target), or a
            field over the size ``limits`` (default :func:`request_limits`).
    """
    limits = limits or request_limits()
    if names:  # messages name the field as the record's own layout calls it (zsRE's "alt", not "target_new")
        def error(source, record, field_name, problem):
            base, _, index = field_name.partition("[")
            return RequestError(source, record, names.get(base, base) + (f"[{index}" if index else ""), problem)
    else:
        error = RequestError
    for name, value in (("prompt", prompt), ("subject", subject), ("target_new", target_new)):
        check_required_text(value, source, record, name, error)
    if target_true is None:
        target_true = ""
    if not isinstance(target_true, str):
        raise error(source, record, "target_true", f"expected a string, got {type(target_true).__name__}")
    # the subject first: a bad character in it is in the prompt too, and the subject is where it was written
    texts = [("subject", subject, limits.target_chars, True), ("prompt", prompt, limits.prompt_chars, False),
             ("target_new", target_new, limits.target_chars, True),
             ("target_true", target_true, limits.target_chars, True)]
    for name, value, limit, one_line in texts:
        _check_text(value, source, record, name, limit, one_line, error)
    prompt = prompt.strip()
    subject = subject.strip()
    if subject not in prompt:
        raise error(source, record, "subject", f"subject {subject!r} does not occur in prompt {prompt!r}")
    reph = tuple(p.strip() for p in _as_tuple(rephrase_prompts, source, record, "rephrase_prompts", error))
    locp = tuple(p.strip() for p in _as_tuple(locality_prompts, source, record, "locality_prompts", error))
    loca = tuple(a.strip() for a in _as_tuple(locality_answers, source, record, "locality_answers", error))
    if len(locp) != len(loca):
        raise error(source, record, "locality_answers",
                           f"{len(locp)} locality prompts but {len(loca)} answers")
    for i, a in enumerate(loca):
        if not a:
            raise error(source, record, f"locality_answers[{i}]", "empty")
    for name, items, limit, one_line in (("rephrase_prompts", reph, limits.prompt_chars, False),
                                         ("locality_prompts", locp, limits.prompt_chars, False),
                                         ("locality_answers", loca, limits.target_chars, True)):
        if len(items) > limits.list_items:
            raise error(source, record, name, f"{len(items):,} items, over the limit of {limits.list_items:,} "
                                                     "(EDITBENCH_MAX_LIST_ITEMS)")
        for i, item in enumerate(items):
            _check_text(item, source, record, f"{name}[{i}]", limit, one_line, error)
    return EditRequest(
        case_id=str(case_id),
        prompt=prompt,
        subject=subject,
        target_new=target_new.strip(),
        target_true=target_true.strip(),
        rephrase_prompts=reph,
        locality_prompts=locp,
        locality_answers=loca,
        relation=relation or "",
    )
