"""The job file of ``swift-i2v batch``: one video per line, JSON Lines (``.jsonl``) or CSV (``.csv``).

Every line names an ``id`` (the output is ``<id>.mp4``) and an ``image``, and may set any field of
:data:`JOB_FIELDS`; a field it leaves out takes the command line's value (the ``defaults`` request). Every line is
checked when the file is read, before any weight is loaded: an unknown field, a duplicate id, an id that is not a
safe file name, a malformed line or a value the :class:`~swift_model.generation.request.GenerationRequest` refuses
raises ``ValueError`` naming ``file:line``. Whether the image can be read, and whether the size suits the models,
is each job's own outcome (recorded, the batch goes on).

Relative paths in a job (``image``, ``prompt_embeds``, ``negative_prompt_embeds``) are relative to the job file's
folder, so a job file and its images move together.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re

from ..generation.request import GenerationRequest

__all__ = ["JOB_FIELDS", "Job", "read_jobs"]

# field -> (the GenerationRequest field it sets, the type of a CSV cell). ``id`` and ``image`` are the job's own.
_PATH, _STR, _INT, _FLOAT, _BOOL = "path", "str", "int", "float", "bool"
_FIELDS: dict[str, tuple[str | None, str]] = {
    "id": (None, _STR),
    "image": (None, _PATH),
    "prompt": ("prompt", _STR),
    "prompt_embeds": ("prompt_embeds", _PATH),
    "negative_prompt": ("negative_prompt", _STR),
    "negative_prompt_embeds": ("negative_prompt_embeds", _PATH),
    "seed": ("seed", _INT),
    "frames": ("frames", _INT),
    "width": ("width", _INT),
    "height": ("height", _INT),
    "guidance": ("guidance_scale", _FLOAT),
    "steps": ("steps", _INT),
    "shift": ("shift", _FLOAT),
    "step_mode": ("step_mode", _STR),
    "segment_blocks": ("segment_blocks", _INT),
    "neighbors": ("neighbors", _STR),
    "start_sigma": ("start_sigma", _FLOAT),
    "shared_anchor": ("shared_anchor", _BOOL),
    "joint": ("joint", _BOOL),
    "fps": ("fps", _INT),
}
JOB_FIELDS: tuple[str, ...] = tuple(_FIELDS)
REQUIRED_FIELDS = ("id", "image")

# A job id becomes a file name on every platform: letters, digits, '.', '_', '-', not starting with a dot (no
# hidden files, no '..'), at most 128 characters.
_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Job:
    """One video of a batch.

    Attributes:
        id: the job's id (its output is ``<id>.mp4``). line: its line in the job file (1-based).
        image: the image path (relative paths resolved against the job file's folder).
        request: the :class:`~swift_model.generation.request.GenerationRequest` of every setting and the prompt
            inputs, with ``image=None`` and ``output=None`` (the runner sets both).
    """

    id: str
    line: int
    image: str
    request: GenerationRequest

    def fields(self) -> dict:
        """The job as JSON-serialisable job-file fields (every field of :data:`JOB_FIELDS`, with the values it
        runs with), plus ``line``."""
        r = self.request
        out = {"id": self.id, "line": self.line, "image": self.image}
        for name, (attr, _) in _FIELDS.items():
            if attr is None:
                continue
            value = getattr(r, attr)
            if attr == "neighbors":
                value = list(value)
            elif isinstance(value, os.PathLike):
                value = os.fspath(value)
            elif value is not None and not isinstance(value, (str, int, float, bool)):
                value = f"<{type(value).__name__}>"  # a tensor given by the caller (not from a job file)
            out[name] = value
        return out


def read_jobs(path, defaults: GenerationRequest) -> list[Job]:
    """The jobs of the job file ``path`` (``.jsonl``: one JSON object per line; ``.csv``: a header row naming
    the fields, then one job per row), each a :class:`Job` whose request is ``defaults`` with the line's fields
    applied. Blank lines are skipped. Raises ``ValueError`` naming ``path:line`` for anything a line cannot be
    (see the module), ``ValueError`` for a missing file, an unknown suffix or a file with no job."""
    if not isinstance(defaults, GenerationRequest):
        raise TypeError(f"defaults must be a GenerationRequest, got {type(defaults).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"the job file must be a path, got {type(path).__name__}")
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(f"job file {path}: must be .jsonl (JSON Lines) or .csv, got {suffix or 'no suffix'!r}")
    if not os.path.isfile(path):
        raise ValueError(f"job file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a CSV saved by a spreadsheet has a BOM
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"job file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows = _jsonl_rows(path, text) if suffix == ".jsonl" else _csv_rows(path, text)
    base = os.path.dirname(os.path.abspath(path))
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for line, fields in rows:
        job = _job(path, line, fields, defaults, base)
        # case-insensitive: on macOS and Windows "A.mp4" and "a.mp4" are one file
        first = seen.setdefault(job.id.lower(), line)
        if first != line:
            raise ValueError(f"{path}:{line}: duplicate id {job.id!r} (first on line {first})")
        jobs.append(job)
    if not jobs:
        raise ValueError(f"job file {path}: no jobs in it")
    return jobs


def _jsonl_rows(path: str, text: str):
    """``(line, {field: value})`` of each non-blank line of a JSON Lines file."""
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{line}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{line}: a job must be a JSON object, got {type(obj).__name__}")
        yield line, obj


def _csv_rows(path: str, text: str):
    """``(line, {field: value})`` of each non-blank row of a CSV file with a header row; empty cells are left
    out (the default applies). The line is the row's first line (a quoted cell may span lines)."""
    reader = csv.reader(text.splitlines(keepends=True), strict=True)  # strict: an unclosed quote is an error
    header = _next_row(reader, path, 1, "malformed CSV header")
    if header is None:
        return
    header = [h.strip() for h in header]
    _check_names(path, 1, header)
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise ValueError(f"{path}:1: column {dup!r} twice in the header")
    start = reader.line_num + 1
    while (row := _next_row(reader, path, start, "malformed CSV")) is not None:
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}:{line}: {len(row)} cells, the header has {len(header)}")
        yield line, {h: _cell(path, line, h, c) for h, c in zip(header, row) if c.strip()}


def _next_row(reader, path: str, line: int, what: str) -> list[str] | None:
    """The reader's next row, or ``None`` at the end; ``ValueError`` naming the file, ``line`` and ``what`` for
    malformed CSV."""
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as exc:
        raise ValueError(f"{path}:{line}: {what} ({exc})") from None


def _cell(path: str, line: int, name: str, cell: str):
    """A CSV cell as the value of field ``name`` (ints, floats and booleans parsed; text kept as written)."""
    kind = _FIELDS[name][1]
    value = cell.strip()
    try:
        if kind == _INT:
            return int(value)
        if kind == _FLOAT:
            return float(value)
    except ValueError:
        raise ValueError(f"{path}:{line}: {name} must be {'an int' if kind == _INT else 'a number'}, "
                         f"got {value!r}") from None
    if kind == _BOOL:
        if value.lower() not in _TRUE + _FALSE:
            raise ValueError(f"{path}:{line}: {name} must be true or false, got {value!r}")
        return value.lower() in _TRUE
    return cell if kind == _STR and name in ("prompt", "negative_prompt") else value


def _check_names(path: str, line: int, names) -> None:
    unknown = [n for n in names if n not in _FIELDS]
    if unknown:
        raise ValueError(f"{path}:{line}: unknown field {unknown[0]!r} (a job may set: {', '.join(JOB_FIELDS)})")


def _job(path: str, line: int, fields: dict, defaults: GenerationRequest, base: str) -> Job:
    """The :class:`Job` of one line's ``fields``."""
    _check_names(path, line, fields)
    for name in REQUIRED_FIELDS:
        if fields.get(name) in (None, ""):
            raise ValueError(f"{path}:{line}: the job has no {name!r}")
    job_id = fields["id"]
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        job_id = str(job_id)  # a JSON number as an id: the file name is its decimal text
    if not isinstance(job_id, str) or not _SAFE_ID.fullmatch(job_id):
        raise ValueError(f"{path}:{line}: id {job_id!r} is not a safe file name (letters, digits, '.', '_', '-', "
                         "not starting with '.', at most 128 characters)")
    changes = {}
    for name, value in fields.items():
        attr, kind = _FIELDS[name]
        if attr is None:
            continue
        if kind == _PATH and value is not None:
            if not isinstance(value, str):
                raise ValueError(f"{path}:{line}: {name} must be a path (a string), got {type(value).__name__}")
            value = os.path.join(base, os.path.expanduser(value))
        changes[attr] = value
    # a job's own prompt replaces the command line's prompt inputs: a default embeddings file must not win over it
    for text, embeds in (("prompt", "prompt_embeds"), ("negative_prompt", "negative_prompt_embeds")):
        if text in changes and embeds not in changes:
            changes[embeds] = None
    image = fields["image"]
    if not isinstance(image, str):
        raise ValueError(f"{path}:{line}: image must be a path (a string), got {type(image).__name__}")
    try:
        request = defaults.replace(image=None, output=None, **changes)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}:{line}: {exc}") from None
    return Job(id=job_id, line=line, image=os.path.normpath(os.path.join(base, os.path.expanduser(image))),
               request=request)
