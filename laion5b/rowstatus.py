"""The status table of an input part: one row per input row, in input order, saying what became of it and where it is.

Sources, all on disk: the input file, the stored samples (found by a ``Locator``), and the saved error files. A stored
sample wins over any error record of its row (a requeued row that was stored later); of the error records of a row
the latest counts, once however often its line was saved; a record that requeue.py put back on the queue means the
row is ``pending`` again until a later outcome is on disk.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from laion5b import errorfiles, inputs
from laion5b.imageformat import EXTENSIONS
from laion5b.inputs import SourceFile, Spec
from laion5b.requeue import matches
from laion5b.store import image_folder
from laion5b.tasks import Task, safe_id

SUCCESS = "success"
PENDING = "pending"
MAX_ERROR_MSG = 200
SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("id", pa.string()),
        ("url", pa.string()),
        ("status", pa.string()),
        ("error_msg", pa.string()),
        ("path", pa.string()),
        ("shard", pa.string()),
        ("member", pa.string()),
    ]
)
"""``path``: the stored file (``files`` output); ``shard`` and ``member``: the tar and the key (the stem of the
member names) of the sample in it (``webdataset`` output)."""


class Location(NamedTuple):
    """Where a stored sample is: a file path, or a shard and the member names' stem inside it."""

    path: str | None = None
    shard: str | None = None
    member: str | None = None


class Locator(Protocol):
    """Finds the stored sample of a row: FileLocator for the ``files`` output, shardlocator.ShardLocator (reading the
    shard indexes) for the ``webdataset`` output."""

    duplicates: int
    """Rows located so far that are stored more than once (each is reported once)."""

    def locate(self, task: Task) -> Location | None: ...

    def locate_all(self, task: Task) -> list[Location]:
        """Every stored copy of the row's sample, the one ``locate`` finds first."""
        ...

    def copies(self, task: Task) -> int:
        """How many stored copies the row's sample has (quicker than ``locate_all``)."""
        ...

    by_id: bool
    """Whether a task's ``id`` is needed to find its sample (else its subset, part and row are enough)."""


class FileLocator:
    """Stored files under ``store_dir``, found by listing each image folder once (rows come in order)."""

    by_id = True

    def __init__(self, store_dir: str) -> None:
        self.store_dir = store_dir
        self.duplicates = 0
        self._folder = ""
        self._names: set[str] = set()

    def locate(self, task: Task) -> Location | None:
        found = self.locate_all(task)
        return found[0] if found else None

    def locate_all(self, task: Task) -> list[Location]:
        """The row's image files: one per image extension found under its id (more than one is a duplicate)."""
        folder = image_folder(self.store_dir, task)
        if folder != self._folder:
            self._folder = folder
            try:
                self._names = set(os.listdir(folder))
            except (FileNotFoundError, NotADirectoryError):
                self._names = set()
        return [Location(path=f"{folder}/{task.id}.{ext}") for ext in EXTENSIONS if f"{task.id}.{ext}" in self._names]

    def copies(self, task: Task) -> int:
        return len(self.locate_all(task))


class Outcome(NamedTuple):
    ts: float
    status: str
    error_msg: str


PartErrors = dict[int, Outcome]
"""The latest error outcome of each row of one part."""


def saved_errors(folder: Path, parts: set[tuple[str, str]]) -> dict[tuple[str, str], PartErrors]:
    """The latest saved outcome of each failed row of the given (subset, part)s, from every error file."""
    found: dict[tuple[str, str], PartErrors] = {part: {} for part in parts}
    for path in errorfiles.error_files(folder):
        marks = errorfiles.read_marks(path)
        for offset, _, line in errorfiles.lines_from(path):
            record = errorfiles.parse(line)
            if record is None or not isinstance(record.get("row"), int):
                continue
            rows = found.get((record.get("subset"), record.get("part")))  # type: ignore[arg-type]
            if rows is None:
                continue
            outcome = _outcome(record, offset, marks)
            known = rows.get(record["row"])
            if known is None or outcome.ts >= known.ts:
                rows[record["row"]] = outcome
    return found


def _outcome(record: dict, offset: int, marks: dict[str, int]) -> Outcome:
    ts = record.get("ts")
    status = record.get("status")
    message = str(record.get("error_msg", ""))[:MAX_ERROR_MSG]
    requeued = any(offset < end and matches(selector, status) for selector, end in marks.items())
    if requeued:
        return Outcome(
            float(ts) if isinstance(ts, int | float) else 0.0, PENDING, f"requeued after {status}: {message}"
        )
    return Outcome(float(ts) if isinstance(ts, int | float) else 0.0, str(status), message)


@dataclass
class Summary:
    """What the table of one part says."""

    key: str
    rows: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    """Rows stored more than once (reported once each)."""


def write_table(
    source: SourceFile, spec: Spec, errors: PartErrors, locator: Locator, target: Path, batch_size: int = 65_536
) -> Summary:
    """Write the part's status table to ``target`` (through a temporary file, batch by batch); return its summary."""
    picked = inputs.columns_of(source, spec)
    summary = Summary(source.key)
    duplicates_before = locator.duplicates
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    with pq.ParquetWriter(temporary, SCHEMA) as writer:
        for rows in inputs.read_rows(source, spec, picked, 0, batch_size):
            columns: dict[str, list] = {name: [] for name in SCHEMA.names}
            for row in rows:
                sample_id = safe_id(row.row if row.sample_id is None or row.problem else row.sample_id)
                task = Task(sample_id, "", source.subset, source.part, row.row)
                location = locator.locate(task)
                outcome = errors.get(row.row)
                if location is not None:
                    status, message = SUCCESS, None
                elif outcome is not None:
                    status, message = outcome.status, outcome.error_msg
                else:
                    status, message = PENDING, None
                location = location or Location()
                url = row.url.strip() if isinstance(row.url, str) else None
                for name, value in zip(
                    SCHEMA.names, (row.row, sample_id, url, status, message, *location), strict=True
                ):
                    columns[name].append(value)
                summary.statuses[status] += 1
            summary.rows += len(rows)
            writer.write_batch(pa.record_batch(columns, schema=SCHEMA))
    temporary.replace(target)
    summary.duplicates = locator.duplicates - duplicates_before
    return summary


def render(summary: Summary, target: Path, top: int = 6) -> str:
    """A few lines on one part: rows, successes, failures by status, pending."""
    rows = max(summary.rows, 1)
    success, pending = summary.statuses[SUCCESS], summary.statuses[PENDING]
    failed = summary.rows - success - pending
    lines = [
        f"{summary.key}: {summary.rows:,} rows -> {target}",
        f"  success {success:,} ({success / rows:.1%})  failed {failed:,} ({failed / rows:.1%})  "
        f"pending {pending:,} ({pending / rows:.1%})",
    ]
    errors = [(status, count) for status, count in summary.statuses.most_common() if status not in (SUCCESS, PENDING)]
    if errors:
        shown = ", ".join(f"{status} {count:,}" for status, count in errors[:top])
        lines.append(f"  failures: {shown}" + (f", {len(errors) - top} more statuses" if len(errors) > top else ""))
    if summary.duplicates:
        lines.append(f"  duplicates: {summary.duplicates:,} (rows stored more than once, each reported once)")
    return "\n".join(lines) + "\n"


def selected(files: Iterable[SourceFile], subset: str | None, part: str | None) -> list[SourceFile]:
    """The input parts that ``--subset`` and ``--part`` select (None: any)."""
    return [f for f in files if (subset is None or f.subset == subset) and (part is None or f.part == part)]
