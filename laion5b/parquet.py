"""Streaming the rows of a parquet URL list in batches (both LAION schemas, DataComp, COYO, ...)."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import repeat
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laion5b.objectstore import RemotePath
from laion5b.rows import InputError, Picked, Row, meta_of, text


class ParquetError(InputError):
    """A parquet file that cannot be used; the message is one line."""


def count_rows(path: Path | RemotePath) -> int:
    """Rows in a parquet file, read from its footer."""
    return _open(path).metadata.num_rows


def column_names(path: Path | RemotePath) -> list[str]:
    """The file's column names, read from its footer."""
    return _open(path).schema_arrow.names


def read_rows(path: Path | RemotePath, picked: Picked, start: int, batch_size: int) -> Iterator[list[Row]]:
    """Rows from position ``start`` on, in lists of at most ``batch_size``; never loads the whole file."""
    parquet = _open(path)
    groups, first_row = _groups_from(parquet.metadata, start)
    if not groups:
        return
    schema = parquet.schema_arrow
    names = [name for name, _ in picked.save]
    convert = not all(_plain(schema.field(column).type) for _, column in picked.save)
    position = first_row
    batches = parquet.iter_batches(batch_size=batch_size, row_groups=groups, columns=picked.needed())
    for batch in _read_or_raise(batches, path):
        skip = max(0, start - position)
        count = batch.num_rows - skip
        position += batch.num_rows
        if count <= 0:
            continue
        values = {column: _values(batch.column(column).slice(skip)) for column in picked.needed()}
        saved = [values[column] for _, column in picked.save]
        yield list(
            map(
                Row,
                range(position - count, position),
                values[picked.id] if picked.id else repeat(None, count),
                values[picked.url],
                map(text, values[picked.text]) if picked.text else repeat(None, count),
                values[picked.hash] if picked.hash else repeat(None, count),
                meta_of(names, saved, count, convert),
                repeat(None, count),
            )
        )


def _values(column: pa.Array) -> list:
    """The column's values; NaN and infinite floats as None (not in JSON), replaced by Arrow, not row by row."""
    if pa.types.is_floating(column.type):
        column = pc.if_else(pc.is_finite(column), column, pa.scalar(None, column.type))
    return column.to_pylist()


def _plain(kind: pa.DataType) -> bool:
    """Whether the values of this type are JSON values as they come (floats: once _values made NaN None)."""
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_integer(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_floating(kind)
    )


def _open(path: Path | RemotePath) -> pq.ParquetFile:
    """The file's reader; one in a bucket is read through ranged GETs (its footer, then the column chunks of each row
    group as it is read: not pre-buffered, which would fetch every row group asked for at once)."""
    try:
        if isinstance(path, RemotePath):
            return pq.ParquetFile(path.open(), pre_buffer=False)
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise ParquetError(f"{path}: not a readable parquet file: {_one_line(error)}") from None


def _read_or_raise(batches: Iterator[pa.RecordBatch], path: Path | RemotePath) -> Iterator[pa.RecordBatch]:
    try:
        yield from batches
    except (OSError, pa.ArrowException) as error:
        raise ParquetError(f"{path}: unreadable data: {_one_line(error)}") from None


def _groups_from(metadata: pq.FileMetaData, start: int) -> tuple[list[int], int]:
    """The row groups that hold rows from ``start`` on, and the position of the first of them."""
    first = 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if start < first + rows:
            return list(range(group, metadata.num_row_groups)), first
        first += rows
    return [], first


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200]
