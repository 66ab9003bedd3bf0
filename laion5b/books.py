"""The books of one input part: what the store, the saved error records and Redis say of each of its rows, the
state each row is in, and the problems (rows stored twice, lost, in no state, ...), for ``reconcile.py``.

A row's state, the first that applies: ``stored`` (a sample or file; ``open`` while its shard is still being
finished), ``failed`` (an error record, saved or still in Redis, not queued again since), ``queued`` / ``delayed``
/ ``held`` / ``open`` (its task in Redis), ``unqueued`` (no trace of it anywhere). A stored or failed row's tasks
still in Redis are redundant (a Redis that lost writes gave them back, and they would be fetched again).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from laion5b import inputs
from laion5b.inputs import SourceFile, Spec
from laion5b.redisrows import ERROR, FINISHING, OPEN, QUEUED, TASK_PLACES, Entry, PartEntries, record_fields
from laion5b.rows import Row
from laion5b.rowstatus import PENDING, Location, Locator, Outcome, PartErrors
from laion5b.tasks import Task, is_transient, safe_id

STORED, FAILED, UNQUEUED = "stored", "failed", "unqueued"
STATES = (STORED, FAILED, *reversed(TASK_PLACES[1:]), UNQUEUED)
"""The states a row is counted in (``finishing`` tasks count as ``open``)."""
DUPLICATE, REDUNDANT, LOST, STATELESS, AHEAD = "stored_twice", "redundant", "lost", "no_state", "ahead"
PROBLEMS = {
    DUPLICATE: "rows stored more than once",
    REDUNDANT: "Redis entries of rows already stored or failed, or a row's second entry",
    LOST: "rows counted (queued once) but neither stored, nor recorded, nor in Redis",
    STATELESS: "rows in no state at all (the producer will not queue them)",
    AHEAD: "rows done or in Redis that the producer would queue again (its position is behind)",
}
EXAMPLES = 5
"""Problems of each kind described per part, beside their count."""
GAP_ROWS = 65_536
"""Rows of a run without a state kept in memory for repair to queue (a longer run is read again)."""
Requeue = Callable[[SourceFile, list[Row]], None]


@dataclass
class PartBooks:
    """One part's counts by state and by problem, and what repair needs: the extra copies of duplicates, the
    redundant Redis entries, the producer position the books call for."""

    source: SourceFile
    rows: int = 0
    states: Counter[str] = field(default_factory=Counter)
    problems: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter[str] = field(default_factory=Counter)
    """Failed rows by status."""
    extra_copies: list[Location] = field(default_factory=list)
    redundant: list[Entry] = field(default_factory=list)
    position: int | None = None
    """Where the producer stands in this part (None: no position in Redis)."""
    settled_position: int = 0
    """The producer position repair sets: past every row with a state (the rows' count when the file is done)."""

    def problem(self, kind: str, row: int, detail: str, count: int = 1) -> None:
        self.problems[kind] += count
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(f"row {row}: {detail}")


@dataclass
class PartInput:
    """What is known of one part before its rows are read."""

    source: SourceFile
    spec: Spec
    errors: PartErrors
    entries: PartEntries
    position: int | None
    done: bool


def audit(part: PartInput, locator: Locator, requeue: Requeue | None = None, transient_too: bool = False,
          batch_size: int = 65_536) -> PartBooks:  # fmt: skip
    """Read the part's rows once, in order, and keep its books. ``requeue`` (repair) is given the rows that have no
    state but should, batch by batch; with ``transient_too``, also the failed rows whose status is transient. With
    ``requeue``, the tasks of a shard being finished whose samples are stored are redundant too (its worker is gone:
    repair settles it).

    A row without a state is ``lost`` before the producer's position, ``no_state`` past it when a later row has a
    state (or the file is marked done): the producer would not queue it, or would queue the later rows again."""
    source = part.source
    books = PartBooks(source, position=part.position)
    groups = part.entries.by_row()
    group = next(groups, None)
    total = inputs.count_rows(source, part.spec)
    counted = part.position or 0
    start = total if part.done and part.position is None else counted
    gap, last = Gap(), -1
    picked = inputs.columns_of(source, part.spec)
    for rows in inputs.read_rows(source, part.spec, picked, 0, batch_size):
        again = []
        for row in rows:
            entries: list[Entry] = []
            if group is not None and group[0] == row.row:
                entries, group = group[1], next(groups, None)
            state, status = _row_state(books, row, locator, entries, part.errors.get(row.row), requeue is not None)
            if state == UNQUEUED and row.row < counted:
                books.problem(LOST, row.row, "no sample, record or task")
                again.append(row)
            elif state == UNQUEUED:
                gap.add(row, keep=requeue is not None)
            else:
                gap.close(books, part, requeue, row.row)
                last = row.row
                if row.row >= start:
                    books.problem(AHEAD, row.row, f"{state}, but the producer is at row {start}")
            if transient_too and state == FAILED and _transient(status):
                again.append(row)
                state = QUEUED
            elif state == FAILED:
                books.statuses[status] += 1
            books.states[state] += 1
        books.rows += len(rows)
        if requeue is not None and again:
            requeue(source, again)
    if part.done:
        gap.close(books, part, requeue, total)
    books.settled_position = total if part.done else max(counted, last + 1)
    while group is not None:  # rows past the input's end
        _redundant(books, group[0], group[1], "not in the input")
        group = next(groups, None)
    return books


@dataclass
class Gap:
    """A run of rows without a state past the producer's position: ``no_state`` once a later row has one. Its rows
    are kept for repair to queue, up to GAP_ROWS (a longer run is read again if it has to be queued)."""

    start: int | None = None
    rows: list[Row] | None = None

    def add(self, row: Row, keep: bool) -> None:
        if self.start is None:
            self.start, self.rows = row.row, ([] if keep else None)
        if self.rows is not None:
            self.rows.append(row)
            if len(self.rows) > GAP_ROWS:
                self.rows = None

    def close(self, books: PartBooks, part: PartInput, requeue: Requeue | None, end: int) -> None:
        """The run ends before row ``end``: note it, and queue its rows when repairing."""
        start, kept = self.start, self.rows
        self.start, self.rows = None, None
        if start is None or start >= end:
            return
        books.problem(STATELESS, start, f"rows {start} to {end - 1}: no sample, record or task", end - start)
        if requeue is None:
            return
        if kept is not None:
            requeue(part.source, kept)
            return
        picked = inputs.columns_of(part.source, part.spec)
        for rows in inputs.read_rows(part.source, part.spec, picked, start, GAP_ROWS):
            wanted = [row for row in rows if row.row < end]
            if wanted:
                requeue(part.source, wanted)
            if len(wanted) < len(rows):
                break


def _row_state(
    books: PartBooks, row: Row, locator: Locator, entries: list[Entry], saved: Outcome | None, settle: bool
) -> tuple[str, str]:
    """The row's state (and its status when failed); its problems noted in ``books``."""
    sample_id = safe_id(row.row if row.sample_id is None or row.problem else row.sample_id) if locator.by_id else ""
    task = Task(sample_id, "", books.source.subset, books.source.part, row.row)
    found = locator.copies(task)
    if found > 1:
        copies = locator.locate_all(task)
        books.extra_copies.extend(copies[1:])
        books.problem(DUPLICATE, row.row, "; ".join(_where(location) for location in copies))
    if not entries:  # the common case, decided without the checks below
        if found:
            return STORED, ""
        return (FAILED, saved.status) if saved is not None and saved.status != PENDING else (UNQUEUED, "")
    tasks = [entry for entry in entries if entry.place != ERROR]
    fresh, stale = _split_records([entry for entry in entries if entry.place == ERROR], saved)
    if found:
        finishing = tasks and all(entry.place == FINISHING for entry in tasks)
        state = OPEN if finishing and not settle else STORED
        _redundant(books, row.row, (tasks if state == STORED else []) + fresh + stale, "stored")
        return state, ""
    if fresh or (saved is not None and saved.status != PENDING):
        _redundant(books, row.row, tasks + fresh[1:] + stale, "failed")
        return FAILED, _status(fresh[0]) if fresh else saved.status  # type: ignore[union-attr]
    _redundant(books, row.row, stale, "requeued")
    if not tasks:
        return UNQUEUED, ""
    tasks.sort(key=lambda entry: TASK_PLACES.index(entry.place))
    _redundant(books, row.row, tasks[1:], tasks[0].place)
    return OPEN if tasks[0].place == FINISHING else tasks[0].place, ""


def _split_records(records: list[Entry], saved: Outcome | None) -> tuple[list[Entry], list[Entry]]:
    """The row's error records in Redis: those not saved yet (newest first), and those saved already (the saved
    outcome has their time and status)."""
    fresh = sorted(records, key=lambda entry: -_ts(entry))
    if saved is None:
        return fresh, []
    stale = [entry for entry in fresh if (_ts(entry), _status(entry)) == (saved.ts, saved.status)]
    return [entry for entry in fresh if entry not in stale], stale


def _redundant(books: PartBooks, row: int, entries: list[Entry], state: str) -> None:
    if entries:
        books.redundant.extend(entries)
        places = ", ".join(sorted({entry.place for entry in entries}))
        books.problem(REDUNDANT, row, f"{state}, and still in Redis ({places})", len(entries))


def _where(location: Location) -> str:
    return location.path or f"{location.shard}#{location.member}"


def _ts(entry: Entry) -> float:
    ts = (record_fields(entry.raw) or {}).get("ts")
    return float(ts) if isinstance(ts, int | float) else 0.0


def _status(entry: Entry) -> str:
    return str((record_fields(entry.raw) or {}).get("status"))


def _transient(status: str) -> bool:
    return is_transient(int(status) if status.isdigit() else status)
