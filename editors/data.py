"""Loading edit requests from files and from the project's built-in fact set.

Sources understood by :func:`load_requests`:

* ``"builtin"`` -- the project's own fact set (``editors/resources/builtin_facts.json``), facts that the embedded
  default model SmolLM2-135M-Instruct knows (checked by ``scripts/verify_builtin_facts.py``);
* ``"counterfact:PATH"`` -- CounterFact (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"),
  either in the EasyEdit / MEND layout (``case_id, prompt, subject, target_new, ground_truth, rephrase_prompt,
  locality_prompt, locality_ground_truth``) or in ROME's original layout (``requested_rewrite{prompt with "{}",
  subject, target_new{str}, target_true{str}}, paraphrase_prompts, neighborhood_prompts``);
* ``"zsre:PATH"`` -- zsRE question answering edits in the MEND layout (``subject, src, rephrase, alt, answers[],
  loc, loc_ans``);
* a plain ``PATH`` (``.json``, ``.jsonl`` or ``.csv``) in any of the layouts above or in the project's own schema
  (the fields of :meth:`EditRequest.to_dict`), detected from the first record's keys.

How a file is read is split in two, each a small registry: a *reader* per file type (:func:`register_reader`:
``.json``, ``.jsonl``, ``.csv``) turns the text into raw records, whatever their layout; a *layout* per record
layout (:func:`register_layout`: ``schema``, ``counterfact``, ``zsre``, ``counterfact-rome``) detects itself from
the first record's keys and builds the requests. A new data set is one more registered layout (its ``prefix`` makes
``"<prefix>:PATH"`` a source); a new file type one more reader.

Every request is built by :func:`editors.requests.make_request`. A malformed record raises
:class:`~editors.requests.RequestError` naming the file, the record (index, and case_id when it has one) and the
field; no record is ever dropped silently. Problems with the file as a whole (not found, not JSON, wrong extension,
too large) raise :class:`DataSourceError`.

Conventions kept from the reference implementations: ROME's neighbourhood prompts take ``target_true`` as their
locality answer (the unedited model should still say it); zsRE keeps its ``"nq question: ..."`` locality prompts as
EasyEdit does; zsRE's ``answers[0]`` is the original answer and ``alt`` the new target.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass
from importlib import resources
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence

from .requests import EditRequest, RequestError, check_required_text, make_request

log = logging.getLogger(__name__)

#: fields of the project's own schema (= EditRequest.to_dict())
SCHEMA_FIELDS = ("case_id", "prompt", "subject", "target_new", "target_true", "rephrase_prompts",
                 "locality_prompts", "locality_answers", "relation")
LIST_FIELDS = ("rephrase_prompts", "locality_prompts", "locality_answers")
#: separator of list items inside one CSV cell (written as " | "; spaces around the bar are optional on reading)
CSV_LIST_SEPARATOR = " | "
_CSV_SPLIT = re.compile(r"\s*\|\s*")
DEFAULT_MAX_UPLOAD_BYTES = 5_000_000
#: a data file read whole (JSON; JSONL / CSV when every record is wanted) may have at most this many MB
#: (``EDITBENCH_MAX_DATA_MB``); JSONL / CSV files are streamed, so ``n`` records of a longer file are still read
DEFAULT_MAX_DATA_MB = 1024
#: one JSONL line (one record) may have at most this many KB (``EDITBENCH_MAX_RECORD_KB``)
DEFAULT_MAX_RECORD_KB = 256

BUILTIN_FACTS = "builtin_facts.json"
LOCALITY_PROBES = "locality_probes.json"

# record layouts (the value of :func:`detect_format`)
FMT_COUNTERFACT = "counterfact"  # EasyEdit / MEND layout
FMT_ROME = "counterfact-rome"  # ROME's original layout
FMT_ZSRE = "zsre"
FMT_SCHEMA = "schema"  # the project's own


class DataSourceError(ValueError):
    """A data source that cannot be read as a whole (bad prefix, file not found, not JSON / CSV, too large)."""


class DataFileNotFoundError(DataSourceError, FileNotFoundError):
    """The named data file does not exist (also a :class:`FileNotFoundError`)."""


# ---------------------------------------------------------------------------------------------------------------
# the two registries: readers (file types) and layouts (data sets)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RawRecord:
    """One record as a reader found it: a label for messages, the record, whether list fields are ``" | "``-joined
    strings (CSV cells)."""

    label: str
    record: Any
    csv_lists: bool = False


#: a reader: ``(text of the whole file, its name for messages, n or None) -> the first n raw records``
Reader = Callable[[str, str, "int | None"], list[RawRecord]]
#: a layout's builder: ``(record, index in the file, label, file name, csv_lists) -> EditRequest``
Builder = Callable[[dict, int, str, str, bool], EditRequest]


@dataclass(frozen=True)
class Layout:
    """One record layout (one data set's file format).

    Attributes:
        name: the value of :func:`detect_format` for its records.
        title: how messages name it ("zsRE (MEND layout)"); layouts of one data set share a title.
        prefix: the source prefix it is read under (``"zsre"`` for ``"zsre:PATH"``), or None for plain paths only.
        detect: whether a record with these keys is in this layout. The layout registered last is tried first
            (register the general ones first: the project's schema is registered before every data set), messages
            list them in registration order.
        build: the builder of a request from one record.
    """

    name: str
    title: str
    prefix: str | None
    detect: Callable[[frozenset[str]], bool]
    build: Builder


_READERS: dict[str, Reader] = {}
_LAYOUTS: dict[str, Layout] = {}
#: readers that stream: ``(text file object, its name) -> raw records, read lazily``; a file of such a type is read
#: only as far as the records asked for
StreamReader = Callable[[IO[str], str], Iterator[RawRecord]]
_STREAM_READERS: dict[str, StreamReader] = {}


def register_reader(extension: str) -> Callable[[Reader], Reader]:
    """Decorator: ``reader`` reads files ending in ``extension`` (".json"), whatever their record layout."""
    ext = extension.lower()

    def add(reader: Reader) -> Reader:
        if ext in _READERS and _READERS[ext] is not reader:
            raise ValueError(f"a reader for {ext} files is already registered")
        _READERS[ext] = reader
        return reader

    return add


def register_layout(name: str, *, title: str, detect: Callable[[frozenset[str]], bool],
                    prefix: str | None = None) -> Callable[[Builder], Builder]:
    """Decorator: ``build`` builds requests from records of layout ``name`` (see :class:`Layout`)."""

    def add(build: Builder) -> Builder:
        if name in _LAYOUTS and _LAYOUTS[name].build is not build:
            raise ValueError(f"record layout {name!r} is already registered")
        _LAYOUTS[name] = Layout(name, title, prefix, detect, build)
        return build

    return add


def layouts() -> list[Layout]:
    """Every registered layout, in registration order (the most general first; detection tries them backwards)."""
    return list(_LAYOUTS.values())


def source_prefixes() -> tuple[str, ...]:
    """The source prefixes :func:`load_requests` understands besides a plain path: ``builtin`` and one
    ``"<prefix>:"`` per data set with a prefix."""
    return ("builtin",) + tuple(f"{p}:" for p in _unique(lay.prefix for lay in layouts() if lay.prefix))


def file_extensions() -> tuple[str, ...]:
    """The file extensions a plain path or an upload may have (one per registered reader)."""
    return tuple(_READERS)


def _unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))


def _prefix_layouts(prefix: str) -> tuple[str, ...]:
    return tuple(sorted(lay.name for lay in layouts() if lay.prefix == prefix))


# ---------------------------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------------------------
def load_requests(source: str, n: int | None = None, *, skip_invalid: bool = False) -> list[EditRequest]:
    """Edit requests from ``source`` (see the module docstring); the first ``n`` records in file order when given.

    ``skip_invalid=True`` (opt-in, off by default) skips malformed records with a logged warning each instead of
    raising; ``n`` then counts valid records. (The shared zsRE-800 file, for one, has two records with an empty
    ``alt``.)

    Raises:
        DataSourceError: unknown prefix (the message lists the valid ones), missing / unreadable file.
        RequestError: a malformed record (names the file, the record and the field).
    """
    _check_n(n)
    if not isinstance(source, str) or not source.strip():
        raise DataSourceError(f"no data source given; valid: {_valid_sources()}")
    source = source.strip()
    if source == "builtin":
        return builtin_requests()[:n] if n is not None else builtin_requests()
    for prefix in source_prefixes()[1:]:
        if source.startswith(prefix):
            return _load_path(source[len(prefix):], n=n, formats=_prefix_layouts(prefix[:-1]),
                              skip_invalid=skip_invalid)
    prefix = re.match(r"^([A-Za-z][\w.-]*):(?![/\\])", source)
    if prefix and len(prefix.group(1)) > 1 and not os.path.exists(source):
        raise DataSourceError(f"unknown data source prefix {prefix.group(1) + ':'!r} in {source!r}; "
                              f"valid: {_valid_sources()}")
    return _load_path(source, n=n, formats=None, skip_invalid=skip_invalid)


def load_counterfact(path: str, n: int | None = None, *, skip_invalid: bool = False) -> list[EditRequest]:
    """CounterFact records (EasyEdit / MEND layout or ROME's original layout, detected per file)."""
    _check_n(n)
    return _load_path(path, n=n, formats=_prefix_layouts("counterfact"), skip_invalid=skip_invalid)


def load_zsre(path: str, n: int | None = None, *, skip_invalid: bool = False) -> list[EditRequest]:
    """zsRE records in the MEND layout; the subject must occur in the question ``src``."""
    _check_n(n)
    return _load_path(path, n=n, formats=_prefix_layouts("zsre"), skip_invalid=skip_invalid)


def load_user_edits(path: str, n: int | None = None) -> list[EditRequest]:
    """A user's own edits in the project's schema: JSON (a list of objects), JSONL or CSV.

    In CSV, a header row names the columns (``prompt, subject, target_new`` are required) and list fields hold
    their items separated by ``" | "``.
    """
    _check_n(n)
    return _load_path(path, n=n, formats=(FMT_SCHEMA,))


def parse_bytes(data: bytes, filename: str, n: int | None = None) -> list[EditRequest]:
    """Requests from a file's bytes (JSON / JSONL / CSV only; nothing is ever unpickled or executed).

    The layout (project schema, CounterFact, zsRE) is detected as for a plain path. ``filename`` only chooses the
    reader by its extension and names the file in error messages. No size limit: see
    :func:`parse_user_edits_bytes` for uploads.

    Raises:
        DataSourceError: not bytes, an extension other than .json / .jsonl / .csv, not UTF-8, not valid JSON.
        RequestError: a malformed record.
    """
    _check_n(n)
    name = os.path.basename(str(filename or "")) or "upload"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataSourceError(f"{name}: expected the file's bytes, got {type(data).__name__}")
    ext = _extension(name)
    return _parse_text(_decode(bytes(data), name), name, ext, n=n, formats=None)


def parse_user_edits_bytes(data: bytes, filename: str, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                           n: int | None = None) -> list[EditRequest]:
    """An uploaded file: :func:`parse_bytes` after refusing more than ``max_bytes``.

    Raises:
        DataSourceError: over ``max_bytes``, or as :func:`parse_bytes`.
        RequestError: a malformed record.
    """
    _check_n(n)
    name = os.path.basename(str(filename or "")) or "upload"
    size = len(bytes(data)) if isinstance(data, (bytes, bytearray, memoryview)) else 0
    if size > max_bytes:
        raise DataSourceError(f"{name}: {size:,} bytes is over the limit of {max_bytes:,} bytes")
    return parse_bytes(data, filename, n)


def request_from_dict(record: Mapping[str, Any], source: str = "request", *, label: str | None = None,
                      default_case_id: str = "0") -> EditRequest:
    """One request from a dict in the project's schema (the fields of :meth:`EditRequest.to_dict`), validated
    exactly as a record of a file in that schema.

    Args:
        source: names the origin in error messages (a file name, "playground", ...).
        label: names the record in error messages; default: its case_id, else ``default_case_id``.
        default_case_id: the case_id of a record without one.

    Raises:
        RequestError: a missing / empty / mistyped field, or a subject absent from the prompt.
    """
    rec = dict(record) if isinstance(record, Mapping) else record
    if not isinstance(rec, dict):
        raise RequestError(source, label or default_case_id, "(record)",
                           f"expected a JSON object, got {type(rec).__name__}")
    if label is None:
        cid = rec.get("case_id")
        label = default_case_id if cid is None or str(cid).strip() == "" else str(cid)
    return _build_schema(rec, -1, label, source, False, default_case_id=default_case_id)


def write_user_edits(path: str, requests: Iterable[EditRequest]) -> None:
    """Write requests in the project's schema as ``.json``, ``.jsonl`` or ``.csv`` (chosen by the extension).

    Raises:
        DataSourceError: unsupported extension, or (CSV) a list item that contains the ``|`` separator.
    """
    ext = _extension(path)
    records = [r.to_dict() for r in requests]
    if ext == ".json":
        text = json.dumps(records, indent=1, ensure_ascii=False) + "\n"
    elif ext == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = requests_to_csv(records, name=path)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def requests_to_csv(records: Sequence[EditRequest | dict], name: str = "csv") -> str:
    """CSV text (header + one row per request) in the project's schema; list fields joined by ``" | "``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(SCHEMA_FIELDS), lineterminator="\n")
    writer.writeheader()
    for i, rec in enumerate(records):
        d = rec.to_dict() if isinstance(rec, EditRequest) else dict(rec)
        row = {}
        for key in SCHEMA_FIELDS:
            value = d.get(key, "")
            if key in LIST_FIELDS:
                items = [value] if isinstance(value, str) else list(value or ())
                for item in items:
                    if "|" in item:
                        raise DataSourceError(f"{name}: record {i}: field '{key}': item {item!r} contains '|', "
                                              "which separates list items in CSV; write JSON instead")
                value = CSV_LIST_SEPARATOR.join(items)
            row[key] = "" if value is None else value
        writer.writerow(row)
    return buf.getvalue()


def builtin_requests() -> list[EditRequest]:
    """The project's built-in fact set (facts the embedded default model knows), in file order."""
    name = f"editors/resources/{BUILTIN_FACTS}"
    text = _read_resource(BUILTIN_FACTS)
    return _parse_text(text, name, ".json", n=None, formats=(FMT_SCHEMA,))


def builtin_probes() -> list[tuple[str, str]]:
    """The fixed locality probe set: ``(prompt, answer)`` pairs of general facts the default model knows, disjoint
    from the built-in facts' subjects. Measured against the unedited model at checkpoints."""
    name = f"editors/resources/{LOCALITY_PROBES}"
    raw = _loads_json(_read_resource(LOCALITY_PROBES), name)
    if not isinstance(raw, list):
        raise DataSourceError(f"{name}: expected a JSON list of {{prompt, answer}} objects")
    out = []
    for i, rec in enumerate(raw):
        if not isinstance(rec, dict):
            raise RequestError(name, i, "(record)", f"expected a JSON object, got {type(rec).__name__}")
        for key in ("prompt", "answer"):
            value = rec.get(key)
            if not isinstance(value, str) or not value.strip():
                raise RequestError(name, i, key, "missing or empty")
        out.append((rec["prompt"].strip(), rec["answer"].strip()))
    return out


def detect_format(record: dict) -> str | None:
    """Which record layout ``record`` is in (a registered layout's name), from its keys; ``None`` if none fits."""
    if not isinstance(record, dict):
        return None
    keys = frozenset(record)
    return next((lay.name for lay in reversed(layouts()) if lay.detect(keys)), None)


# ---------------------------------------------------------------------------------------------------------------
# files and text: the readers
# ---------------------------------------------------------------------------------------------------------------
def _valid_sources() -> str:
    prefixed = "".join(f"{p}PATH, " for p in source_prefixes()[1:])
    return f"builtin, {prefixed}or a PATH to a " + " / ".join(file_extensions()) + " file"


def _check_n(n) -> None:
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer or None, got {n!r}")


def _extension(name: str) -> str:
    lower = str(name).lower()
    for ext in sorted(_READERS, key=len, reverse=True):  # ".jsonl" before ".json"
        if lower.endswith(ext):
            return ext
    raise DataSourceError(f"{name}: unsupported file type; expected one of {', '.join(file_extensions())}")


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _read_resource(filename: str) -> str:
    return resources.files(__package__).joinpath("resources", filename).read_text(encoding="utf-8")


def _load_path(path: str, *, n: int | None, formats: Sequence[str] | None,
               skip_invalid: bool = False) -> list[EditRequest]:
    path = os.path.expanduser(str(path).strip())
    if not path:
        raise DataSourceError(f"no file path given; valid sources: {_valid_sources()}")
    if not os.path.exists(path):
        raise DataFileNotFoundError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataSourceError(f"{path}: is a directory, not a data file")
    ext = _extension(path)
    if ext in _STREAM_READERS and n is not None:
        try:
            with open(path, encoding="utf-8-sig", newline="") as fh:
                return _build_all(_STREAM_READERS[ext](fh, path), path, formats, skip_invalid=skip_invalid, n=n)
        except UnicodeDecodeError as exc:
            raise DataSourceError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    _check_file_size(path)
    with open(path, "rb") as f:
        text = _decode(f.read(), path)
    return _parse_text(text, path, ext, n=n, formats=formats, skip_invalid=skip_invalid)


def _env_number(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


def _check_file_size(path: str) -> None:
    """Refuse a file to be read whole that is over ``EDITBENCH_MAX_DATA_MB``."""
    limit_mb = _env_number("EDITBENCH_MAX_DATA_MB", DEFAULT_MAX_DATA_MB)
    size = os.path.getsize(path)
    if size > limit_mb * 2 ** 20:
        raise DataSourceError(f"{path}: {size / 2 ** 20:,.1f} MB is over the limit of {limit_mb:g} MB for a data file "
                              "read whole (set EDITBENCH_MAX_DATA_MB to raise it; JSONL and CSV files are streamed "
                              "when a number of edits is given)")


def _record_limit_chars() -> int:
    return int(_env_number("EDITBENCH_MAX_RECORD_KB", DEFAULT_MAX_RECORD_KB) * 1024)


def _loads_json(text: str, name: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataSourceError(f"{name}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
                              ) from exc
    except RecursionError as exc:
        raise DataSourceError(f"{name}: JSON nested too deeply") from exc


def _parse_text(text: str, name: str, ext: str, *, n: int | None, formats: Sequence[str] | None,
                skip_invalid: bool = False) -> list[EditRequest]:
    """Records of ``text`` (a whole file) -> requests. ``formats`` restricts the accepted layouts."""
    if skip_invalid:  # n counts valid records: read everything, cut after building
        return _build_all(_READERS[ext](text, name, None), name, formats, skip_invalid=True, n=n)
    return _build_all(_READERS[ext](text, name, n), name, formats)


def _looks_like_jsonl(text: str) -> bool:
    """A ``.json`` file that is really JSON Lines (several objects, one a line), as some EasyEdit dumps are."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or not lines[0].lstrip().startswith("{"):
        return False
    try:
        json.loads(text)
        return False
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return isinstance(json.loads(lines[0]), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


@register_reader(".json")
def _json_records(text: str, name: str, n: int | None) -> list[RawRecord]:
    """A JSON list of records, ``{"requests": [...]}``, one record, or (as some EasyEdit dumps) JSON Lines."""
    if _looks_like_jsonl(text):
        return _jsonl_records(text, name, n)
    obj = _loads_json(text, name)
    if isinstance(obj, dict) and isinstance(obj.get("requests"), list):
        obj = obj["requests"]
    elif isinstance(obj, dict):
        obj = [obj]  # a single record
    if not isinstance(obj, list):
        raise DataSourceError(f"{name}: expected a JSON list of records, got {type(obj).__name__}")
    if n is not None:
        obj = obj[:n]
    return [RawRecord(str(i), rec) for i, rec in enumerate(obj)]


def _jsonl_stream(fh: IO[str], name: str) -> Iterator[RawRecord]:
    """One JSON record a line (blank lines skipped); a line over ``EDITBENCH_MAX_RECORD_KB`` is refused unparsed."""
    limit = _record_limit_chars()
    lineno = count = 0
    while True:
        line = fh.readline(limit + 1)
        if not line:
            return
        lineno += 1
        label = f"{count} (line {lineno})"
        if len(line) > limit and not line.endswith("\n"):
            raise RequestError(name, label, "(record)", f"the line is over the limit of {limit // 1024:,} KB for one "
                                                        "record (EDITBENCH_MAX_RECORD_KB)")
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RequestError(name, label, "(json)", f"line {lineno} is not valid JSON: {exc.msg} "
                                                      f"at column {exc.colno}") from exc
        except RecursionError as exc:
            raise RequestError(name, label, "(json)", f"line {lineno} is nested too deeply") from exc
        count += 1
        yield RawRecord(label, rec)


@register_reader(".jsonl")
def _jsonl_records(text: str, name: str, n: int | None) -> list[RawRecord]:
    """One JSON record a line (blank lines skipped)."""
    return list(itertools.islice(_jsonl_stream(io.StringIO(text, newline=""), name), n))


_STREAM_READERS[".jsonl"] = _jsonl_stream


def _csv_stream(fh: IO[str], name: str) -> Iterator[RawRecord]:
    """A header row naming the columns, one record a row; list fields hold ``" | "``-joined items. In the project's
    schema (and in a header of no known layout) prompt, subject and target_new are required columns; a header of
    another layout (zsRE's src / alt, ...) is checked by that layout's builder."""
    reader = csv.reader(fh)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise DataSourceError(f"{name}: not valid CSV: {exc}") from exc
    header = [h.strip() for h in header]
    if detect_format(dict.fromkeys(h for h in header if h)) in (None, FMT_SCHEMA):
        for col in ("prompt", "subject", "target_new"):
            if col not in header:
                raise RequestError(name, "header", col,
                                   f"missing column; columns found: {', '.join(header) or 'none'}")
    dup = sorted({h for h in header if header.count(h) > 1 and h})
    if dup:
        raise RequestError(name, "header", dup[0], "column appears more than once")
    count = 0
    try:
        start = reader.line_num + 1
        for row in reader:
            if any(cell.strip() for cell in row):
                label = f"{count} (row {reader.line_num})"
                if len(row) > len(header):
                    raise RequestError(name, label, "(row)",
                                       f"{len(row)} cells but the header has {len(header)} columns")
                if len(row) < len(header) and any("\n" in cell for cell in row) and reader.line_num > start:
                    raise DataSourceError(f"{name}: unterminated quote? the quoted cell that starts on line {start} "
                                          f"runs on to line {reader.line_num}, and its row has {len(row)} of "
                                          f"{len(header)} cells; close the quote")
                count += 1
                yield RawRecord(label, {h: cell for h, cell in zip(header, row) if h}, True)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataSourceError(f"{name}: not valid CSV at line {reader.line_num}: {exc}") from exc


@register_reader(".csv")
def _csv_records(text: str, name: str, n: int | None) -> list[RawRecord]:
    """A header row naming the columns (prompt, subject, target_new required), one record a row; list fields
    hold ``" | "``-joined items."""
    return list(itertools.islice(_csv_stream(io.StringIO(text, newline=""), name), n))


_STREAM_READERS[".csv"] = _csv_stream


# ---------------------------------------------------------------------------------------------------------------
# records -> requests
# ---------------------------------------------------------------------------------------------------------------
def _build_all(raw: Iterable[RawRecord], name: str, formats: Sequence[str] | None, *, skip_invalid: bool = False,
               n: int | None = None) -> list[EditRequest]:
    """Build the raw records (read lazily: no record after the ``n``-th built one is read) with the builder of the
    layout detected from the first record (a file has one layout; a later record in another layout fails on its
    missing fields)."""
    if n == 0:
        return []
    it = iter(raw)
    head: list[RawRecord] = []
    for r in it:
        head.append(r)
        if isinstance(r.record, dict):
            break
    first = head[-1] if head and isinstance(head[-1].record, dict) else None
    if first is None:
        if head and not skip_invalid:
            label, rec = head[0].label, head[0].record
            raise RequestError(name, label, "(record)", f"expected a JSON object, got {type(rec).__name__}")
        return []
    fmt = _file_format(first.record, _record_label(first.label, first.record), name, formats)
    builder = _LAYOUTS[fmt].build
    out: list[EditRequest] = []
    seen: dict[str, str] = {}
    for i, (label, rec, csv_lists) in enumerate((r.label, r.record, r.csv_lists) for r in itertools.chain(head, it)):
        try:
            if not isinstance(rec, dict):
                raise RequestError(name, label, "(record)", f"expected a JSON object, got {type(rec).__name__}")
            req = builder(rec, i, _record_label(label, rec), name, csv_lists)
            if req.case_id in seen:
                raise RequestError(name, _record_label(label, rec), "case_id",
                                   f"duplicate case_id {req.case_id!r} (first used by record {seen[req.case_id]})")
        except RequestError as exc:
            if not skip_invalid:
                raise
            log.warning("skipping invalid record: %s", exc)
            continue
        seen[req.case_id] = label
        out.append(req)
        if n is not None and len(out) >= n:
            break
    return out


def _file_format(rec: dict, label: str, name: str, formats: Sequence[str] | None) -> str:
    fmt = detect_format(rec)
    if fmt is None:
        titles = _unique(lay.title for lay in layouts())
        expected = ", ".join(titles[:-1]) + " or " + titles[-1] if len(titles) > 1 else titles[0]
        raise RequestError(name, label, "(record)",
                           f"unrecognised record layout (keys: {', '.join(sorted(rec)) or 'none'}); expected "
                           f"{expected}")
    if formats is not None and fmt not in formats:
        raise RequestError(name, label, "(record)",
                           f"looks like {fmt!r} records, but {' or '.join(repr(f) for f in formats)} records were "
                           f"expected here (keys: {', '.join(sorted(rec))})")
    log.debug("%s: %s records", name, fmt)
    return fmt


def _record_label(label: str, rec: dict) -> str:
    cid = rec.get("case_id")
    if cid is None or str(cid).strip() == "":
        return label
    if label.endswith(")"):  # "3 (line 5)" -> "3 (line 5, case_id 17)"
        return f"{label[:-1]}, case_id {cid})"
    return f"{label} (case_id {cid})"


def _required(rec: dict, key: str, name: str, label: str):
    if key not in rec or rec[key] is None:
        raise RequestError(name, label, key, "missing")
    return rec[key]


def _case_id(rec: dict, index: int, name: str, label: str, default: str | None = None) -> str:
    """The record's case_id as a string; without one, ``default`` or the record's index in its file."""
    cid = rec.get("case_id")
    if cid is None or (isinstance(cid, str) and not cid.strip()):
        return str(index) if default is None else default
    if isinstance(cid, bool) or not isinstance(cid, (str, int)):
        raise RequestError(name, label, "case_id", f"expected a string or an integer, got {type(cid).__name__}")
    return str(cid).strip()


def _text_or_str_field(value, name: str, label: str, field: str):
    """A target given as ``{"str": ...}`` (ROME) or as a plain string."""
    if isinstance(value, dict):
        if "str" not in value:
            raise RequestError(name, label, field, "expected a string or an object with a 'str' key")
        value = value["str"]
    return check_required_text(value, name, label, field)


def _string_list(value, name: str, label: str, field: str, csv_lists: bool) -> tuple[str, ...]:
    """A list field: a list of strings, a single string, or (CSV) items joined by ``" | "``."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        items = _CSV_SPLIT.split(value.strip()) if csv_lists else [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise RequestError(name, label, field, f"expected a string or a list of strings, got {type(value).__name__}")
    for j, item in enumerate(items):
        if not isinstance(item, str):
            raise RequestError(name, label, f"{field}[{j}]", f"expected a string, got {type(item).__name__}")
        if not item.strip():
            raise RequestError(name, label, f"{field}[{j}]", "empty")
    return tuple(items)


def _plain_str(rec: dict, key: str, name: str, label: str, default: str = "") -> str:
    value = rec.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise RequestError(name, label, key, f"expected a string, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# the layouts, the most general first (detection tries the last registered first)
# ---------------------------------------------------------------------------------------------------------------
@register_layout(FMT_SCHEMA, title="the project's schema",
                 detect=lambda keys: bool(keys & {"prompt", "subject", "target_new"}))
def _build_schema(rec: dict, index: int, label: str, name: str, csv_lists: bool, *,
                  default_case_id: str | None = None) -> EditRequest:
    unknown = [k for k in rec if k not in SCHEMA_FIELDS]
    if unknown:
        log.warning("%s: record %s: ignoring unknown field(s) %s (valid: %s)", name, label, ", ".join(unknown),
                    ", ".join(SCHEMA_FIELDS))
    for key in ("prompt", "subject", "target_new"):
        _required(rec, key, name, label)
    return make_request(
        source=name, record=label, case_id=_case_id(rec, index, name, label, default_case_id),
        prompt=rec["prompt"], subject=rec["subject"], target_new=rec["target_new"],
        target_true=_plain_str(rec, "target_true", name, label),
        rephrase_prompts=_string_list(rec.get("rephrase_prompts"), name, label, "rephrase_prompts", csv_lists),
        locality_prompts=_string_list(rec.get("locality_prompts"), name, label, "locality_prompts", csv_lists),
        locality_answers=_string_list(rec.get("locality_answers"), name, label, "locality_answers", csv_lists),
        relation=_plain_str(rec, "relation", name, label),
    )


@register_layout(FMT_COUNTERFACT, title="CounterFact (EasyEdit or ROME layout)", prefix="counterfact",
                 detect=lambda keys: bool(keys & {"ground_truth", "rephrase_prompt", "locality_prompt",
                                                  "locality_ground_truth"}))
def _build_counterfact(rec: dict, index: int, label: str, name: str, csv_lists: bool) -> EditRequest:
    for key in ("prompt", "subject", "target_new", "ground_truth"):
        _required(rec, key, name, label)
    target_true = _text_or_str_field(rec["ground_truth"], name, label, "ground_truth")
    return make_request(
        source=name, record=label, case_id=_case_id(rec, index, name, label),
        prompt=rec["prompt"], subject=rec["subject"],
        target_new=_text_or_str_field(rec["target_new"], name, label, "target_new"),
        target_true=target_true,
        rephrase_prompts=_string_list(rec.get("rephrase_prompt"), name, label, "rephrase_prompt", csv_lists),
        locality_prompts=_string_list(rec.get("locality_prompt"), name, label, "locality_prompt", csv_lists),
        locality_answers=_string_list(rec.get("locality_ground_truth"), name, label, "locality_ground_truth",
                                      csv_lists),
        relation=_plain_str(rec, "relation", name, label),
        names=_COUNTERFACT_NAMES,
    )


_COUNTERFACT_NAMES = {"target_true": "ground_truth", "rephrase_prompts": "rephrase_prompt",
                      "locality_prompts": "locality_prompt", "locality_answers": "locality_ground_truth"}
_ZSRE_NAMES = {"prompt": "src", "target_new": "alt", "target_true": "answers", "rephrase_prompts": "rephrase",
               "locality_prompts": "loc", "locality_answers": "loc_ans"}
_ROME_NAMES = {"prompt": "requested_rewrite.prompt", "subject": "requested_rewrite.subject",
               "target_new": "requested_rewrite.target_new", "target_true": "requested_rewrite.target_true",
               "rephrase_prompts": "paraphrase_prompts", "locality_prompts": "neighborhood_prompts",
               "locality_answers": "requested_rewrite.target_true"}


@register_layout(FMT_ZSRE, title="zsRE (MEND layout)", prefix="zsre",
                 detect=lambda keys: "src" in keys and bool(keys & {"alt", "answers", "loc", "rephrase"}))
def _build_zsre(rec: dict, index: int, label: str, name: str, csv_lists: bool) -> EditRequest:
    for key in ("subject", "src", "alt"):
        _required(rec, key, name, label)
    answers = _string_list(rec.get("answers"), name, label, "answers", csv_lists)
    loc = rec.get("loc")
    loc_ans = rec.get("loc_ans")
    if (loc is None) != (loc_ans is None):
        missing = "loc_ans" if loc_ans is None else "loc"
        raise RequestError(name, label, missing, "missing (loc and loc_ans come together)")
    return make_request(
        source=name, record=label, case_id=_case_id(rec, index, name, label),
        prompt=_text_or_str_field(rec["src"], name, label, "src"), subject=rec["subject"],
        target_new=_text_or_str_field(rec["alt"], name, label, "alt"),
        target_true=answers[0] if answers else "",
        rephrase_prompts=_string_list(rec.get("rephrase"), name, label, "rephrase", csv_lists),
        locality_prompts=_string_list(loc, name, label, "loc", csv_lists),
        locality_answers=_string_list(loc_ans, name, label, "loc_ans", csv_lists),
        relation=_plain_str(rec, "relation", name, label),
        names=_ZSRE_NAMES,
    )


@register_layout(FMT_ROME, title="CounterFact (EasyEdit or ROME layout)", prefix="counterfact",
                 detect=lambda keys: "requested_rewrite" in keys)
def _build_rome(rec: dict, index: int, label: str, name: str, csv_lists: bool) -> EditRequest:
    rw = _required(rec, "requested_rewrite", name, label)
    if not isinstance(rw, dict):
        raise RequestError(name, label, "requested_rewrite", f"expected an object, got {type(rw).__name__}")
    for key in ("prompt", "subject", "target_new", "target_true"):
        if key not in rw or rw[key] is None:
            raise RequestError(name, label, f"requested_rewrite.{key}", "missing")
    template, subject = rw["prompt"], rw["subject"]
    for key, value in (("prompt", template), ("subject", subject)):
        if not isinstance(value, str):
            raise RequestError(name, label, f"requested_rewrite.{key}",
                               f"expected a string, got {type(value).__name__}")
        if not value.strip():
            raise RequestError(name, label, f"requested_rewrite.{key}", "empty")
    if "{}" not in template:
        raise RequestError(name, label, "requested_rewrite.prompt",
                           f"expected a template with '{{}}' where the subject goes, got {template!r}")
    target_new = _text_or_str_field(rw["target_new"], name, label, "requested_rewrite.target_new")
    target_true = _text_or_str_field(rw["target_true"], name, label, "requested_rewrite.target_true")
    neighbours = _string_list(rec.get("neighborhood_prompts"), name, label, "neighborhood_prompts", csv_lists)
    relation = rw.get("relation_id", "")
    return make_request(
        source=name, record=label, case_id=_case_id(rec, index, name, label),
        prompt=template.replace("{}", subject.strip(), 1), subject=subject,
        target_new=target_new, target_true=target_true,
        rephrase_prompts=_string_list(rec.get("paraphrase_prompts"), name, label, "paraphrase_prompts", csv_lists),
        locality_prompts=neighbours,
        # as in ROME: the unedited model should still answer the neighbourhood prompts with the true object
        locality_answers=tuple(target_true for _ in neighbours),
        relation=relation if isinstance(relation, str) else str(relation),
        names=_ROME_NAMES,
    )


#: the source prefixes :func:`load_requests` understands (besides a plain path)
SOURCE_PREFIXES = source_prefixes()
#: file extensions a plain path or an upload may have
FILE_EXTENSIONS = file_extensions()
#: the record layouts (values of :func:`detect_format`), in registration order
FORMATS = tuple(_LAYOUTS)


__all__ = ["load_requests", "load_counterfact", "load_zsre", "load_user_edits", "parse_bytes", "parse_user_edits_bytes",
           "request_from_dict", "write_user_edits", "requests_to_csv", "builtin_requests", "builtin_probes",
           "detect_format", "register_reader", "register_layout", "layouts", "source_prefixes", "file_extensions",
           "Layout", "RawRecord", "DataSourceError", "DataFileNotFoundError", "SOURCE_PREFIXES", "FILE_EXTENSIONS",
           "FORMATS"]
