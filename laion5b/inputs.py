"""Finding the URL lists under the input folder and reading any of them as rows: one seam for every format."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from laion5b import parquet, textinput
from laion5b.config import Config
from laion5b.objectstore import Bucket, Location, RemotePath
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

    path: Path | RemotePath
    key: str
    subset: str
    part: str
    format: str = "parquet"


def find_files(folder: Path | str, input_format: str = "auto", bucket: Bucket | None = None) -> list[SourceFile]:
    """Every input file below ``folder`` (hidden ones aside), sorted, with its format and subset and part names;
    ``folder`` is an s3:// URL in ``bucket`` when that is given."""
    formats = [name for name in EXTENSIONS if name != "txt"] if input_format == "auto" else [input_format]
    found: dict[PurePosixPath, tuple[Path | RemotePath, str]] = {}
    for relative, path in sorted(_listing(folder, bucket), key=lambda item: item[0]):
        file_format = next((name for name in formats if relative.name.endswith(EXTENSIONS[name])), None)
        if file_format is not None and not relative.name.startswith("."):
            found[relative] = (path, file_format)
    names = {relative: _part_name(relative.name, file_format) for relative, (_, file_format) in found.items()}
    clashes = Counter((relative.parent, name) for relative, name in names.items())
    files = []
    for relative, (path, file_format) in found.items():
        folder_name = relative.parent.as_posix()
        unique = clashes[relative.parent, names[relative]] == 1
        part = names[relative] if unique else relative.name.removesuffix(".parquet")
        files.append(
            SourceFile(
                path=path,
                key=relative.as_posix(),
                subset="/".join(safe_id(n) for n in folder_name.split("/")) if folder_name != "." else ROOT_SUBSET,
                part=safe_id(part),
                format=file_format,
            )
        )
    return files


def _listing(folder: Path | str, bucket: Bucket | None) -> Iterator[tuple[PurePosixPath, Path | RemotePath]]:
    """(path relative to ``folder``, the file) of every file below it: on disk, or objects under a bucket's prefix."""
    if bucket is None:
        folder = Path(folder)
        for path in folder.rglob("*"):
            if path.is_file():
                yield PurePosixPath(path.relative_to(folder).as_posix()), path
        return
    location = Location.parse(str(folder))
    prefix = f"{location.prefix}/" if location.prefix else ""
    for key, size in bucket.list_keys(prefix):
        yield PurePosixPath(key[len(prefix) :]), RemotePath(f"s3://{location.bucket}/{key}", size, bucket)


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
