"""Streaming the rows of text URL lists (CSV, TSV, JSON lines, one URL per line), plain or gzip-compressed.

A row is a record that is not blank: a blank line is no row, anywhere, so positions are the same in every pass.
A record that cannot be read (wrong number of fields, a line that is no JSON object) is a row with a ``problem``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

from laion5b.objectstore import RemotePath
from laion5b.rows import Columns, InputError, Picked, Row, json_safe

TEXT_FORMATS = ("csv", "tsv", "jsonl", "txt")
TXT_COLUMN = "url"
_PEEK_LINES = 1000  # lines searched for the first JSON object, whose keys name a JSON lines file's columns
_PROBLEM_CHARS = 120


class Unreadable(str):
    """A record that could not be parsed; the text says why."""


def open_text(path: Path | RemotePath) -> TextIO:
    """The file as UTF-8 text (undecodable bytes replaced), through gzip when its name ends in ``.gz``; a file in a
    bucket is streamed through ranged GETs."""
    raw = path.open() if isinstance(path, RemotePath) else path.open("rb")
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(raw, "rb"), encoding="utf-8", errors="replace", newline="")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")


def column_names(path: Path | RemotePath, file_format: str, columns: Columns) -> list[str]:
    """The file's column names: ``input_columns``, the header row, the first JSON object's keys, or ``url``."""
    if file_format == "txt":
        return [TXT_COLUMN]
    if file_format != "jsonl" and columns.names:
        return list(columns.names)
    with _opened(path) as file:
        try:
            if file_format == "jsonl":
                objects = (_json_object(line) for line in islice(file, _PEEK_LINES))
                return list(next((record for record in objects if isinstance(record, dict)), {}))
            header = next(_csv_records(file, file_format), None)
        except (OSError, EOFError, zlib.error) as error:
            raise InputError(f"{path}: unreadable data: {error}") from None
        return [] if header is None or isinstance(header, Unreadable) else header


def count_rows(path: Path | RemotePath, file_format: str, columns: Columns) -> int:
    """Rows in the file: one pass through it (a compressed file is decompressed on the way)."""
    with _opened(path) as file:
        return sum(1 for _ in _records(file, path, file_format, columns))


def read_rows(
    path: Path | RemotePath, file_format: str, columns: Columns, picked: Picked, start: int, batch_size: int
) -> Iterator[list[Row]]:
    """Rows from position ``start`` on (the rows before it are parsed and skipped), in lists of ``batch_size``."""
    names = column_names(path, file_format, columns)
    index = {name: position for position, name in enumerate(names)}
    with _opened(path) as file:
        records = islice(_records(file, path, file_format, columns), start, None)
        position = start
        while True:
            chunk = list(islice(records, batch_size))
            if not chunk:
                return
            if file_format == "jsonl":
                rows = [_json_row(position + offset, record, picked) for offset, record in enumerate(chunk)]
            else:
                rows = [_field_row(position + offset, record, picked, index, len(names)) for offset, record in
                        enumerate(chunk)]  # fmt: skip
            position += len(chunk)
            yield rows


def _opened(path: Path | RemotePath) -> TextIO:
    try:
        return open_text(path)
    except OSError as error:
        raise InputError(f"{path}: cannot be read: {error}") from None


def _records(file: TextIO, path: Path | RemotePath, file_format: str, columns: Columns) -> Iterator[Any]:
    """The file's rows as raw records: field lists (csv, tsv, txt), lines (jsonl); Unreadable for broken ones."""
    try:
        if file_format == "txt":
            yield from ([line.strip()] for line in file if line.strip())
        elif file_format == "jsonl":
            yield from (line for line in file if line.strip())
        else:
            records = _csv_records(file, file_format)
            if not columns.names:
                next(records, None)
            yield from records
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path}: unreadable data: {error}") from None


def _csv_records(file: TextIO, file_format: str) -> Iterator[list[str] | Unreadable]:
    """Records of a CSV or TSV file, without blank ones. TSV fields are never quoted (CC3M's captions hold quotes)."""
    tsv = file_format == "tsv"
    reader = csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(file)
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield Unreadable(f"unreadable CSV record: {error}")
            continue
        if record:
            yield record


def _field_row(position: int, record: list[str] | Unreadable, picked: Picked, index: dict[str, int], width: int) -> Row:
    if isinstance(record, Unreadable):
        return Row(position, None, None, None, None, None, str(record))
    if len(record) != width:
        return Row(position, None, None, None, None, None, f"row has {len(record)} fields, expected {width}")
    get = record.__getitem__
    return Row(
        position,
        None if picked.id is None else get(index[picked.id]),
        get(index[picked.url]),
        None if picked.text is None else get(index[picked.text]),
        None if picked.hash is None else get(index[picked.hash]),
        None if not picked.save else {name: get(index[column]) for name, column in picked.save},
        None,
    )


def _json_row(position: int, line: str, picked: Picked) -> Row:
    record = _json_object(line)
    if not isinstance(record, dict):
        problem = record if isinstance(record, Unreadable) else "line is not a JSON object"
        return Row(position, None, None, None, None, None, str(problem))
    get = record.get
    caption = None if picked.text is None else get(picked.text)
    return Row(
        position,
        None if picked.id is None else get(picked.id),
        get(picked.url),
        caption if caption is None or isinstance(caption, str) else json.dumps(caption, ensure_ascii=False),
        None if picked.hash is None else get(picked.hash),
        None if not picked.save else {name: json_safe(get(column)) for name, column in picked.save},
        None,
    )


def _json_object(line: str) -> object:
    try:
        return json.loads(line)
    except ValueError as error:
        return Unreadable(f"line is not JSON: {str(error)[:_PROBLEM_CHARS]}")
