"""Sources: read rows from files or the hub and turn each into a validated example (docs/design.md#sources).

Row kinds and their fields:

- ``tinycot``: ``prompt``, ``rationale``, ``target`` (strings; ``source`` is kept as the row's origin).
- ``oasst2``: ``messages``, a list of ``{role, content}`` with roles user/assistant/system; the
  last turn is the assistant's.
- ``reddit``: ``post_title``, ``post_text`` (may be empty), ``comment_text`` (strings) and
  ``post_scores``, ``comment_score`` (numbers); instruction = title, plus a blank line and the
  text when there is text; response = the comment.
- ``jsonl`` (generic): per row, ``messages`` (chat), ``prompt``/``rationale``/``answer`` (CoT) or
  ``prompt``/``response`` (one exchange), detected from the keys; ``jsonl-messages``,
  ``jsonl-cot`` and ``jsonl-prompt-response`` declare the shape instead.

Files: ``.jsonl``; ``.json`` (a list of objects, or JSON lines); ``.parquet``. A path that does not
exist and has none of these suffixes is taken as a Hugging Face hub dataset (``name`` or
``name@split``, default split ``train``) and loaded with ``datasets`` (needs internet).

Every problem with a row raises ``DataError`` naming the file, the line (JSON lines) or row
(1-based, other readers) and the field, with a short ``reason`` the writer counts when skipping.
"""

from __future__ import annotations

import json
import os
import re
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from composer_remask.data.formats import ChatExample, CoTExample, Example, FormatError, chat_exchanges

TINYCOT = "tinycot"
OASST2 = "oasst2"
REDDIT = "reddit"
JSONL_AUTO = "jsonl"
JSONL_MESSAGES = "jsonl-messages"
JSONL_PROMPT_RESPONSE = "jsonl-prompt-response"
JSONL_COT = "jsonl-cot"
SOURCE_KINDS = (TINYCOT, OASST2, REDDIT, JSONL_AUTO, JSONL_MESSAGES, JSONL_PROMPT_RESPONSE, JSONL_COT)

REDDIT_TEXT_COLUMNS = ("post_title", "post_text", "comment_text")
REDDIT_SCORE_COLUMNS = ("post_scores", "comment_score")

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
SOURCE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # a folder name and a YAML key

# Reasons a row is rejected (keys of the manifest's ``rows_skipped``).
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_TEXT = "empty_text"
INVALID_UTF8 = "invalid_utf8"
UNKNOWN_ROLE = "unknown_role"
BAD_TURN_ORDER = "bad_turn_order"
LAST_TURN_NOT_ASSISTANT = "last_turn_not_assistant"
UNKNOWN_SHAPE = "unknown_shape"
TOO_DEEP = "too_deep"
TOO_LONG = "too_long"

# A JSON line longer than this is a row error, found without holding the line in memory (parsing
# and tokenizing one line costs about a hundred times its size); a real row is far shorter.
MAX_ROW_BYTES = 16 << 20

# Rows nested deeper than this are refused before the JSON parser recurses into them: the same
# verdict in every process (the main one or a worker), far below Python's recursion limit.
MAX_JSON_DEPTH = 128
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


class DataError(ValueError):
    """A bad input row: ``reason`` is a short key; the message names file, line/row and field."""

    def __init__(self, reason: str, detail: str, *, path: str, unit: str = "line",
                 number: int | None = None, field: str | None = None) -> None:
        self.reason, self.detail, self.path = reason, detail, path
        self.unit, self.number, self.field = unit, number, field
        where = path if number is None else f"{path}, {unit} {number}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {detail}")

    def __reduce__(self):
        return (_rebuild_data_error, (self.reason, self.detail, self.path, self.unit, self.number, self.field))


def _rebuild_data_error(reason, detail, path, unit, number, field) -> DataError:
    return DataError(reason, detail, path=path, unit=unit, number=number, field=field)


class _FieldProblem(Exception):
    """A row-level problem before the location is known; ``parse_record`` adds file and line."""

    def __init__(self, reason: str, field: str | None, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


@dataclass(frozen=True)
class SourceSpec:
    """One ``--source``: the dataset name under ``--out``, the row kind and where to read."""

    name: str
    kind: str
    path: str


def parse_source_arg(arg: str) -> SourceSpec:
    """Parse ``NAME=PATH`` (NAME a kind such as ``tinycot``) or ``NAME=KIND:PATH``."""
    name, sep, rest = arg.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--source {arg!r}: expected NAME=PATH or NAME=KIND:PATH")
    if not SOURCE_NAME_PATTERN.match(name):
        raise ValueError(f"--source {arg!r}: name {name!r} must be letters, digits, '_' or '-'")
    kind, colon, path = rest.partition(":")
    if colon and kind in SOURCE_KINDS and path:
        return SourceSpec(name, kind, path)
    if name in SOURCE_KINDS:
        return SourceSpec(name, name, rest)
    raise ValueError(f"--source {arg!r}: say which kind of rows it holds, e.g. {name}=jsonl:{rest} "
                     f"(kinds: {', '.join(SOURCE_KINDS)})")


# --------------------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class RawRecord:
    """One input row before parsing: a JSON line (bytes) or an already decoded object."""

    number: int
    payload: Any


@dataclass(frozen=True)
class RowTooLong:
    """The payload of a line over ``MAX_ROW_BYTES``: only its size was read."""

    size: int


class RecordReader:
    """Iterates the raw rows of one input; ``unit`` says how rows are numbered ("line" or "row")."""

    unit = "row"

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def total(self) -> int | None:
        """Number of rows when cheap to know (for the progress bar)."""
        return None

    def __iter__(self) -> Iterator[RawRecord]:
        raise NotImplementedError


class JsonLinesReader(RecordReader):
    unit = "line"

    @property
    def total(self) -> int | None:
        count, last = 0, b"\n"
        with open(self.path, "rb") as f:
            while block := f.read(1 << 20):
                count += block.count(b"\n")
                last = block[-1:]
        return count + (last != b"\n")

    def __iter__(self) -> Iterator[RawRecord]:
        with open(self.path, "rb") as f:
            number = 0
            while line := f.readline(MAX_ROW_BYTES + 1):
                number += 1
                if len(line) > MAX_ROW_BYTES and not line.endswith(b"\n"):
                    size = len(line)
                    while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                        size += len(rest)
                    yield RawRecord(number, RowTooLong(size + len(rest)))
                    continue
                if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                if line.strip():
                    yield RawRecord(number, line)


class JsonArrayReader(RecordReader):
    def __init__(self, path: str, text: str) -> None:
        super().__init__(path)
        too_deep = find_too_deep(text, MAX_JSON_DEPTH + 1, key_depth=2)  # + 1: the array of rows
        if too_deep is not None:  # the whole file is one JSON value: no row can be read apart
            raise _too_deep_error(too_deep, path=path, unit="line", number=too_deep.line)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(MALFORMED_JSON, f"malformed JSON ({e.msg}, column {e.colno})", path=path,
                            number=e.lineno) from None
        self._rows: list[Any] = rows

    @property
    def total(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[RawRecord]:
        for index, row in enumerate(self._rows):
            yield RawRecord(index + 1, row)


class ParquetReader(RecordReader):
    @property
    def total(self) -> int:
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.path).metadata.num_rows

    def __iter__(self) -> Iterator[RawRecord]:
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield RawRecord(number, row)


class HubReader(RecordReader):
    """A Hugging Face hub dataset, ``name`` or ``name@split``; needs ``datasets`` and internet."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        import datasets

        name, _, split = path.partition("@")
        self._dataset = datasets.load_dataset(name, split=split or "train")

    @property
    def total(self) -> int:
        return len(self._dataset)

    def __iter__(self) -> Iterator[RawRecord]:
        for index, row in enumerate(self._dataset):
            yield RawRecord(index + 1, row)


def _first_significant_byte(path: str) -> bytes:
    """The first byte after a BOM and whitespace: ``[`` for a JSON array."""
    with open(path, "rb") as f:
        head = f.read(3)
        if head != b"\xef\xbb\xbf":
            f.seek(0)
        while byte := f.read(1):
            if not byte.isspace():
                return byte
    return b""


def open_records(path: str) -> RecordReader:
    """The reader for a local file (by suffix) or, when no such file exists, a hub dataset."""
    lowered = path.lower()
    if not os.path.exists(path):
        if lowered.endswith(FILE_SUFFIXES) or path.startswith((".", os.sep)):
            raise FileNotFoundError(f"no such input file: {path}")
        return HubReader(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"expected a .jsonl, .json or .parquet file, got a folder: {path}")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path}: not a regular file (a named pipe, device or socket); a source is read twice "
                         "(its rows counted, then read), so write it to a file first")
    if lowered.endswith(".parquet"):
        return ParquetReader(path)
    if lowered.endswith(".jsonl"):
        return JsonLinesReader(path)
    if lowered.endswith(".json"):
        if _first_significant_byte(path) != b"[":
            return JsonLinesReader(path)
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape").lstrip("\ufeff")
        return JsonArrayReader(path, text)
    raise ValueError(f"unsupported input file type (use {', '.join(FILE_SUFFIXES)}): {path}")


# ---------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class TooDeep:
    """Where a JSON text first nests deeper than allowed: 1-based line, top-level key if any."""

    line: int
    field: str | None


def _max_depth(text: str) -> int:
    """Deepest nesting of arrays/objects in a JSON text, vectorized (strings removed first)."""
    structure = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8", "surrogateescape"), np.uint8)
    steps = (np.isin(structure, (ord("["), ord("{"))).astype(np.int64)
             - np.isin(structure, (ord("]"), ord("}"))))
    return int(np.cumsum(steps).max(initial=0))


def find_too_deep(text: str, max_depth: int = MAX_JSON_DEPTH, key_depth: int = 1) -> TooDeep | None:
    """The first place ``text`` nests more than ``max_depth`` arrays/objects, or None.

    The field reported is the key, in the object at ``key_depth`` (1: the row itself), under which
    the deep value sits. A scan of strings and brackets only (no recursion), so it copes with any
    depth; ordinary rows have fewer brackets than the limit and are not scanned at all.
    """
    if text.count("[") + text.count("{") <= max_depth or _max_depth(text) <= max_depth:
        return None
    depth, opener_at_key_depth, last_key = 0, "", None
    for match in _JSON_STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token[0] == '"':
            if depth == key_depth and opener_at_key_depth == "{":
                last_key = token
        elif token in "[{":
            depth += 1
            if depth == key_depth:
                opener_at_key_depth, last_key = token, None
            if depth > max_depth:
                try:
                    field = None if last_key is None else json.loads(last_key)
                except ValueError:
                    field = None
                return TooDeep(text.count("\n", 0, match.start()) + 1, field)
        else:
            depth -= 1
    return None


def _too_deep_error(found: TooDeep, *, path: str, unit: str, number: int | None) -> DataError:
    return DataError(TOO_DEEP, f"JSON nested deeper than {MAX_JSON_DEPTH} levels", path=path, unit=unit,
                     number=number, field=found.field)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(container: dict, key: str, field: str, *, allow_empty: bool = False) -> str:
    if key not in container:
        raise _FieldProblem(MISSING_FIELD, field, "missing field")
    value = container[key]
    if not isinstance(value, str):
        raise _FieldProblem(WRONG_TYPE, field, f"expected a string, got {_type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _FieldProblem(INVALID_UTF8, field, "invalid UTF-8 in text") from None
    if not allow_empty and not value.strip():
        raise _FieldProblem(EMPTY_TEXT, field, "empty text")
    return value


def _number(container: dict, key: str) -> float:
    if key not in container:
        raise _FieldProblem(MISSING_FIELD, key, "missing field")
    value = container[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _FieldProblem(WRONG_TYPE, key, f"expected a number, got {_type_name(value)}")
    return value


def _parse_messages(row: dict, key: str = "messages") -> ChatExample:
    if key not in row:
        raise _FieldProblem(MISSING_FIELD, key, "missing field")
    messages = row[key]
    if not isinstance(messages, list):
        raise _FieldProblem(WRONG_TYPE, key, f"expected a list of turns, got {_type_name(messages)}")
    if not messages:
        raise _FieldProblem(EMPTY_TEXT, key, "conversation has no turns")
    turns = []
    for index, message in enumerate(messages):
        field = f"{key}[{index}]"
        if not isinstance(message, dict):
            raise _FieldProblem(WRONG_TYPE, field, f"expected an object {{role, content}}, got "
                                f"{_type_name(message)}")
        turns.append((_text(message, "role", f"{field}.role"), _text(message, "content", f"{field}.content")))
    try:
        chat_exchanges(turns)
    except FormatError as e:
        part = "content" if e.reason == EMPTY_TEXT else "role"
        raise _FieldProblem(e.reason, f"{key}[{e.turn}].{part}", str(e)) from None
    return ChatExample(tuple(turns))


def _parse_cot(row: dict, answer_key: str) -> CoTExample:
    return CoTExample(_text(row, "prompt", "prompt"), _text(row, "rationale", "rationale"),
                      _text(row, answer_key, answer_key))


def _parse_prompt_response(row: dict) -> ChatExample:
    return ChatExample((("user", _text(row, "prompt", "prompt")),
                        ("assistant", _text(row, "response", "response"))))


def _parse_reddit(row: dict) -> ChatExample:
    title = _text(row, "post_title", "post_title")
    body = _text(row, "post_text", "post_text", allow_empty=True)
    comment = _text(row, "comment_text", "comment_text")
    for key in REDDIT_SCORE_COLUMNS:
        _number(row, key)
    instruction = f"{title.strip()}\n\n{body.strip()}" if body.strip() else title.strip()
    return ChatExample((("user", instruction), ("assistant", comment)))


def _parse_generic(row: dict) -> Example:
    if "messages" in row:
        return _parse_messages(row)
    if "rationale" in row or "answer" in row:
        return _parse_cot(row, "answer")
    if "response" in row:
        return _parse_prompt_response(row)
    raise _FieldProblem(UNKNOWN_SHAPE, "messages|response|rationale",
                        "row is none of: messages; prompt+response; prompt+rationale+answer")


def _origin(value: Any) -> str | None:
    """A row's sub-source label for the manifest's counts; anything unusable is simply not counted."""
    if not isinstance(value, str) or not value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _parse_row(kind: str, row: dict) -> tuple[Example, str | None]:
    if kind == TINYCOT:
        return _parse_cot(row, "target"), _origin(row.get("source"))
    if kind in (OASST2, JSONL_MESSAGES):
        return _parse_messages(row), None
    if kind == REDDIT:
        return _parse_reddit(row), None
    if kind == JSONL_AUTO:
        return _parse_generic(row), None
    if kind == JSONL_COT:
        return _parse_cot(row, "answer"), None
    if kind == JSONL_PROMPT_RESPONSE:
        return _parse_prompt_response(row), None
    raise ValueError(f"unknown source kind {kind!r} (kinds: {', '.join(SOURCE_KINDS)})")


def parse_record(kind: str, record: RawRecord, *, path: str, unit: str) -> tuple[Example, str | None]:
    """Validate one raw row of ``kind``; return ``(example, origin)`` or raise ``DataError``.

    ``origin`` is the row's own sub-source where the kind has one (TinyCoT's ``source``).
    """
    row = record.payload
    if isinstance(row, RowTooLong):
        raise DataError(TOO_LONG, f"the line is {row.size} bytes, over the {MAX_ROW_BYTES} a row may have "
                        "(it was not read into memory)", path=path, unit=unit, number=record.number)
    if isinstance(row, (bytes, bytearray)):
        # Undecodable bytes become lone surrogates, reported later by the field that holds them.
        text = bytes(row).decode("utf-8", "surrogateescape")
        too_deep = find_too_deep(text)
        if too_deep is not None:
            raise _too_deep_error(too_deep, path=path, unit=unit, number=record.number)
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(MALFORMED_JSON, f"malformed JSON ({e.msg}, column {e.colno})", path=path,
                            unit=unit, number=record.number) from None
    if not isinstance(row, dict):
        raise DataError(NOT_AN_OBJECT, f"expected a JSON object, got {_type_name(row)}", path=path,
                        unit=unit, number=record.number)
    try:
        return _parse_row(kind, row)
    except _FieldProblem as problem:
        raise DataError(problem.reason, problem.detail, path=path, unit=unit, number=record.number,
                        field=problem.field) from None


def choose_rows(available: int, limit: int | None, seed: int, source_name: str) -> np.ndarray:
    """Sorted indices of ``limit`` rows out of ``available``, the same for the same seed and name."""
    if limit is None or limit >= available:
        return np.arange(available)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    rng = np.random.default_rng([seed, zlib.crc32(source_name.encode())])
    return np.sort(rng.choice(available, size=limit, replace=False))
