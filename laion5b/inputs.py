"""Finding the URL lists under the input folder and reading any of them as rows: one seam for every format."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from laion5b import parquet, textinput
from laion5b.config import Config
from laion5b.rows import Columns, Picked, Row, pick
from laion5b.tasks import safe_id

ROOT_SUBSET = "default"
"""Subset name of files that lie directly in the input folder."""
EXTENSIONS = {
    "parquet": (".parquet",),
    "csv": (".csv", ".csv.gz"),
    "tsv": (".tsv", ".tsv.gz"),
    "jsonl": (".jsonl", ".jsonl.gz"),
    "txt": (".txt", ".txt.gz"),
}
"""The file name endings of each format; ``auto`` reads every format's but txt's (a README.txt is no URL list)."""
_SPARK_PART = re.compile(r"^part-(\d+)-[0-9a-fA-F-]{8,}(?:\.c\d+)?(?:\.snappy|\.gz|\.zstd)?\.parquet$")


@dataclass(frozen=True)
class Spec:
    """How to read the input files: the ``input_format`` setting and the column settings."""

    input_format: str = "auto"
    columns: Columns = field(default_factory=Columns)
    verify_hash: str = ""
    """``sha256`` or ``md5``: each task carries its row's hash (from the hash column) to be checked; empty: off."""

    @classmethod
    def of(cls, config: Config) -> Spec:
        """The input settings of ``config``."""
        columns = Columns(
            url=config.url_col,
            caption=config.caption_col,
            id=config.id_col,
            hash=config.hash_col,
            names=tuple(config.input_columns),
            save=tuple(config.save_columns),
        )
        return cls(config.input_format, columns, config.verify_hash)


@dataclass(frozen=True)
class SourceFile:
    """An input file, its format, and the names its rows' tasks carry."""

    path: Path
    key: str
    subset: str
    part: str
    format: str = "parquet"


def find_files(folder: Path, input_format: str = "auto") -> list[SourceFile]:
    """Every input file below ``folder`` (hidden ones aside), sorted, with its format and subset and part names."""
    formats = [name for name in EXTENSIONS if name != "txt"] if input_format == "auto" else [input_format]
    found: dict[Path, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        file_format = next((name for name in formats if path.name.endswith(EXTENSIONS[name])), None)
        if file_format is not None:
            found[path] = file_format
    names = {path: _part_name(path.name, file_format) for path, file_format in found.items()}
    clashes = Counter((path.parent, name) for path, name in names.items())
    files = []
    for path, file_format in found.items():
        relative = path.parent.relative_to(folder).as_posix()
        part = names[path] if clashes[path.parent, names[path]] == 1 else path.name.removesuffix(".parquet")
        files.append(
            SourceFile(
                path=path,
                key=path.relative_to(folder).as_posix(),
                subset="/".join(safe_id(name) for name in relative.split("/")) if relative != "." else ROOT_SUBSET,
                part=safe_id(part),
                format=file_format,
            )
        )
    return files


def _part_name(file_name: str, file_format: str) -> str:
    spark = _SPARK_PART.match(file_name)
    if spark:
        return spark.group(1)
    if file_format == "parquet":
        return file_name.removesuffix(".parquet").removesuffix(".snappy")
    return file_name.removesuffix(".gz").removesuffix("." + file_format)


def columns_of(source: SourceFile, spec: Spec) -> Picked:
    """The columns to read from the file; raise InputError naming the setting when the file lacks one."""
    if source.format == "parquet":
        names = parquet.column_names(source.path)
    else:
        names = textinput.column_names(source.path, source.format, spec.columns)
    return pick(spec.columns, names, source.path)


def count_rows(source: SourceFile, spec: Spec) -> int:
    """Rows in the file (parquet: from its footer; text: one pass through it)."""
    if source.format == "parquet":
        return parquet.count_rows(source.path)
    return textinput.count_rows(source.path, source.format, spec.columns)


def read_rows(source: SourceFile, spec: Spec, picked: Picked, start: int, batch_size: int) -> Iterator[list[Row]]:
    """The file's rows from position ``start`` on, in lists of at most ``batch_size``, with flat memory."""
    if source.format == "parquet":
        return parquet.read_rows(source.path, picked, start, batch_size)
    return textinput.read_rows(source.path, source.format, spec.columns, picked, start, batch_size)
