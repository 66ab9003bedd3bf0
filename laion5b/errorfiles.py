"""The saved error files: their names, appending records durably, reading them back, and their requeue marks.

``store_error_dir`` holds ``YYYYMMDD_<hour // 4>.txt`` files (UTC, six a day) of JSON lines, one error record a
line, and beside each one at most a ``<file>.requeued`` mark written by requeue.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FILE_NAME = re.compile(r"^\d{8}_[0-5]\.txt$")
MARK_SUFFIX = ".requeued"


def file_name(now: float) -> str:
    """The name of the file that records saved at unix time ``now`` go to."""
    moment = datetime.fromtimestamp(now, tz=UTC)
    return f"{moment:%Y%m%d}_{moment.hour // 4}.txt"


def error_files(folder: Path) -> list[Path]:
    """The error files in ``folder``, oldest first (name order is time order)."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if FILE_NAME.match(path.name))


def recently_written(folder: Path, count: int) -> list[Path]:
    """The ``count`` error files modified last."""
    return sorted(error_files(folder), key=lambda path: path.stat().st_mtime)[-count:]


def one_line(record: str) -> str:
    """The record as one line: JSON allows whitespace between tokens and no raw newline inside strings."""
    return " ".join(record.splitlines())


def append(path: Path, lines: Sequence[str]) -> None:
    """Append ``lines`` (no newlines inside) and fsync, under an exclusive lock on the file.

    A line torn by a writer killed in the middle of its write is ended first, so it stays one unreadable line and
    never swallows the first record written after it.
    """
    data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if size == 0:
        fsync_folder(path.parent)


def lines_from(path: Path, start: int = 0) -> Iterator[tuple[int, int, bytes]]:
    """(offset, end offset, line) of each complete line from byte ``start``; a last line still being written (no
    newline yet) is left out."""
    with path.open("rb") as file:
        file.seek(start)
        offset = start
        for line in file:
            if not line.endswith(b"\n"):
                return
            yield offset, offset + len(line), line
            offset += len(line)


def parse(line: bytes | str) -> dict[str, Any] | None:
    """The record on a line, or None for a line that is not a JSON object (a torn write, an empty line)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def record_key(line: bytes | str) -> str:
    """What tells a saved record apart: its ``record_id``, or the whole line when it has none."""
    record = parse(line)
    if record is not None and isinstance(record.get("record_id"), str):
        return record["record_id"]
    return (line.decode("utf-8", "replace") if isinstance(line, bytes) else line).strip()


def keys_in_tails(paths: Iterable[Path], tail_bytes: int) -> set[str]:
    """The record keys of the complete lines in the last ``tail_bytes`` of each file."""
    keys: set[str] = set()
    for path in paths:
        size = path.stat().st_size
        start = max(0, size - tail_bytes)
        lines = lines_from(path, start)
        if start:
            next(lines, None)  # the first line read may start before the tail
        keys.update(record_key(line) for _, _, line in lines)
    return keys


def mark_path(path: Path) -> Path:
    return path.with_name(path.name + MARK_SUFFIX)


class MarksError(ValueError):
    """A requeue mark that cannot be read; requeueing from its file would risk requeueing records twice."""


def read_marks(path: Path) -> dict[str, int]:
    """The requeue marks of an error file: selector -> byte offset before which its records were handled."""
    try:
        return parse_marks(mark_path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except MarksError as error:
        raise MarksError(f"{mark_path(path)}: {error}") from None


def parse_marks(text: str) -> dict[str, int]:
    """Marks from their JSON text (empty text: no marks)."""
    try:
        marks = json.loads(text) if text else {}
        return {str(selector): int(offset) for selector, offset in marks.items()}
    except (ValueError, TypeError, AttributeError) as error:
        raise MarksError(f"bad requeue marks {text[:80]!r}: {error}") from None


def write_marks(path: Path, marks: dict[str, int]) -> None:
    """Replace the requeue marks of an error file atomically and durably."""
    target = mark_path(path)
    temporary = target.with_name(target.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as file:
        json.dump(marks, file, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(target)
    fsync_folder(target.parent)


def fsync_folder(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
