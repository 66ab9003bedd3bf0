"""Finding LAION parquet files and streaming their rows in batches, for both LAION schemas."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from laion5b.tasks import safe_id

ROOT_SUBSET = "default"
"""Subset name of files that lie directly in parquet_dir."""
_SPARK_PART = re.compile(r"^part-(\d+)-[0-9a-fA-F-]{8,}(?:\.c\d+)?(?:\.snappy|\.gz|\.zstd)?\.parquet$")
_URL_COLUMNS = ("url",)
_ID_COLUMNS = ("hash", "sample_id")
_TEXT_COLUMNS = ("text", "caption")


class ParquetError(ValueError):
    """A parquet file that cannot be used; the message is one line."""


@dataclass(frozen=True)
class SourceFile:
    """A parquet file and the names its rows' tasks carry."""

    path: Path
    key: str
    subset: str
    part: str


class Row(NamedTuple):
    """One row: its 0-based position in the file, its sample id (None: use the position), URL and caption."""

    row: int
    sample_id: object
    url: object
    text: str | None


def find_files(parquet_dir: Path) -> list[SourceFile]:
    """Every ``*.parquet`` file below ``parquet_dir``, sorted, with subset and part names."""
    paths = sorted(p for p in parquet_dir.rglob("*.parquet") if p.is_file())
    names = {path: _part_name(path.name) for path in paths}
    clashes = Counter((path.parent, name) for path, name in names.items())
    files = []
    for path in paths:
        folder = path.parent.relative_to(parquet_dir).as_posix()
        part = names[path] if clashes[path.parent, names[path]] == 1 else path.name.removesuffix(".parquet")
        files.append(
            SourceFile(
                path=path,
                key=path.relative_to(parquet_dir).as_posix(),
                subset="/".join(safe_id(name) for name in folder.split("/")) if folder != "." else ROOT_SUBSET,
                part=safe_id(part),
            )
        )
    return files


def _part_name(file_name: str) -> str:
    spark = _SPARK_PART.match(file_name)
    if spark:
        return spark.group(1)
    return file_name.removesuffix(".parquet").removesuffix(".snappy")


def count_rows(path: Path) -> int:
    """Rows in a parquet file, read from its footer."""
    return _open(path).metadata.num_rows


def read_rows(path: Path, start: int, batch_size: int) -> Iterator[list[Row]]:
    """Rows from position ``start`` on, in lists of at most ``batch_size``; never loads the whole file."""
    parquet = _open(path)
    columns = _pick_columns(parquet.schema_arrow, path)
    groups, first_row = _groups_from(parquet.metadata, start)
    if not groups:
        return
    position = first_row
    batches = parquet.iter_batches(batch_size=batch_size, row_groups=groups, columns=list(columns.values()))
    for batch in _read_or_raise(batches, path):
        skip = max(0, start - position)
        count = batch.num_rows - skip
        position += batch.num_rows
        if count <= 0:
            continue
        values = {name: batch.column(column).slice(skip).to_pylist() for name, column in columns.items()}
        first = position - count
        yield list(
            map(
                Row._make,
                zip(
                    range(first, position),
                    values.get("id") or repeat(None, count),
                    values["url"],
                    map(_text, values["text"]) if "text" in values else repeat(None, count),
                    strict=False,
                ),
            )
        )


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise ParquetError(f"{path}: not a readable parquet file: {_one_line(error)}") from None


def _read_or_raise(batches: Iterator[pa.RecordBatch], path: Path) -> Iterator[pa.RecordBatch]:
    try:
        yield from batches
    except (OSError, pa.ArrowException) as error:
        raise ParquetError(f"{path}: unreadable data: {_one_line(error)}") from None


def _pick_columns(schema: pa.Schema, path: Path) -> dict[str, str]:
    """Map our names (url, id, text) to the file's column names, ignoring case."""
    by_lower = {name.lower(): name for name in schema.names}
    picked = {}
    for ours, candidates in (("url", _URL_COLUMNS), ("id", _ID_COLUMNS), ("text", _TEXT_COLUMNS)):
        found = next((by_lower[c] for c in candidates if c in by_lower), None)
        if found is not None:
            picked[ours] = found
    if "url" not in picked:
        raise ParquetError(f"{path}: no URL column (columns: {', '.join(schema.names)[:200]})")
    return picked


def _groups_from(metadata: pq.FileMetaData, start: int) -> tuple[list[int], int]:
    """The row groups that hold rows from ``start`` on, and the position of the first of them."""
    first = 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if start < first + rows:
            return list(range(group, metadata.num_row_groups)), first
        first += rows
    return [], first


def _text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200]
