"""What ``reconcile.py`` does: read the books of every input part (``laion5b.books``) against Redis, repair them or
rebuild Redis from them (``laion5b.mend``), and say what was found."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from laion5b import errorfiles, inputs, mend, redisrows, rowstatus
from laion5b.books import PROBLEMS, STATES, STORED, UNQUEUED, PartBooks, PartInput, audit
from laion5b.config import Config
from laion5b.inputs import SourceFile, Spec
from laion5b.rows import InputError
from laion5b.shardlocator import LOCATORS

log = logging.getLogger(__name__)
EXIT_PROBLEMS, EXIT_NOT_RUN = 1, 2
LABELS = {"open": "in open shards", UNQUEUED: "not queued yet"}


@dataclass
class Books:
    """The books of every part read, by subset, and the parts that could not be read."""

    subsets: dict[str, PartBooks] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    unreadable_parts: int = 0
    rows: int = 0

    def add(self, books: PartBooks) -> None:
        subset = books.source.subset
        total = self.subsets.setdefault(subset, PartBooks(books.source))
        total.rows += books.rows
        total.states.update(books.states)
        total.problems.update(books.problems)
        total.statuses.update(books.statuses)
        for kind, lines in books.examples.items():
            self.examples[f"{subset}|{kind}"].extend(f"{books.source.part} {line}" for line in lines)
        self.rows += books.rows

    def total(self, what: str) -> Counter[str]:
        found: Counter[str] = Counter()
        for books in self.subsets.values():
            found.update(getattr(books, what))
        return found


def reconcile(
    client: redis.Redis, config: Config, command: str, sources: list[SourceFile], whole_run: bool
) -> tuple[int, str]:
    """Run ``check``, ``repair`` or ``rebuild`` on the given parts: (exit code, what to print). Counters are checked
    and set only for the whole run."""
    spec = Spec.of(config)
    if command != "check":
        repair(client, config, spec, sources, rebuild=command == "rebuild")
    books = read_books(client, config, spec, sources)
    if command != "check" and whole_run:
        set_counters(client, config, books, sources, spec)
    counters = counter_drift(client, config, books) if whole_run else {}
    problems = sum(books.total("problems").values()) + len(counters) + books.unreadable_parts
    return (EXIT_PROBLEMS if problems else 0), render(books, counters)


def alive(client: redis.Redis, config: Config) -> list[str]:
    """The workers whose heartbeat lives, the producer if it runs, and the error savers."""
    keys = config.keys
    workers = sorted(client.smembers(keys.workers))
    beats = client.mget([keys.heartbeat(worker) for worker in workers]) if workers else []
    found = [worker for worker, beat in zip(workers, beats, strict=True) if beat]
    savers = sorted(client.scan_iter(match=f"{keys.error_saver('')}*", count=1000))
    return found + (["add_task.py"] if client.exists(keys.producer) else []) + savers


def part_inputs(
    client: redis.Redis, config: Config, spec: Spec, sources: list[SourceFile], keep_tasks: bool = True
) -> Iterator[PartInput]:
    """Each part's input (its error records, Redis entries, position) in turn, with the Redis entries of the rest."""
    found = redisrows.read(client, config.keys, keep_tasks)
    errors = rowstatus.saved_errors(Path(config.store_error_dir), {(s.subset, s.part) for s in sources})
    positions = client.hgetall(config.keys.positions)
    done = done_files(Path(config.done_path))
    for source in sources:
        position = positions.get(source.key)
        yield PartInput(source, spec, errors.pop((source.subset, source.part)), found.pop(source.subset, source.part),
                        None if position is None else int(position), source.key in done)  # fmt: skip


def repair(client: redis.Redis, config: Config, spec: Spec, sources: list[SourceFile], rebuild: bool) -> None:
    """Drop extra copies and redundant entries, queue rows without a state (and, to rebuild, transient failures),
    move the producer's positions up to what the books show."""
    locator = LOCATORS[config.output_format](config.store_dir)
    requeue = mend.Requeue(client, config.keys, spec)
    copies, positions, dropped = [], {}, 0
    sizes = {path: path.stat().st_size for path in errorfiles.error_files(Path(config.store_error_dir))}
    for part in part_inputs(client, config, spec, sources):
        try:
            books = audit(part, locator, requeue, transient_too=rebuild)
        except InputError as error:
            log.error("part_failed %s", error)
            continue
        copies.extend(books.extra_copies)
        mend.drop_entries(client, books.redundant)
        dropped += len(books.redundant)
        if books.settled_position != books.position:
            positions[part.source.key] = books.settled_position
    requeue.flush()
    mend.set_positions(client, config.keys, positions)
    if rebuild:
        mend.mark_requeued(sizes)
    rewritten = mend.drop_copies(copies)
    mend.forget_empty_shards(client, config.keys)
    mend.set_open_counts(client, config.keys)
    log.info("repaired copies_dropped=%d shards_rewritten=%d entries_dropped=%d queued=%d recorded=%d positions=%d",
             len(copies), rewritten, dropped, requeue.queued, requeue.recorded, len(positions))  # fmt: skip


def read_books(client: redis.Redis, config: Config, spec: Spec, sources: list[SourceFile]) -> Books:
    """The books of every part, read part by part."""
    locator = LOCATORS[config.output_format](config.store_dir)
    books = Books()
    for part in part_inputs(client, config, spec, sources, keep_tasks=False):
        try:
            books.add(audit(part, locator))
        except InputError as error:
            log.error("part_failed %s", error)
            books.unreadable_parts += 1
    return books


def counter_drift(client: redis.Redis, config: Config, books: Books) -> dict[str, tuple[int, int]]:
    """Counters that differ from the books: name -> (counter, books)."""
    keys = config.keys
    states = books.total("states")
    expected = {"succeeded": states[STORED], "failed": states["failed"], "added": books.rows - states[UNQUEUED]}
    values = client.mget([keys.tongji_succ, keys.tongji_error, keys.tongji_all])
    found = {name: int(value or 0) for name, value in zip(expected, values, strict=True)}
    return {name: (found[name], expected[name]) for name in expected if found[name] != expected[name]}


def set_counters(client: redis.Redis, config: Config, books: Books, sources: list[SourceFile], spec: Spec) -> None:
    total = sum(inputs.count_rows(source, spec) for source in sources)
    stored_bytes = mend.stored_bytes(Path(config.store_dir), config.output_format)
    mend.set_counters(client, config.keys, books.total("states"), books.total("statuses"), total, stored_bytes)


def done_files(path: Path) -> set[str]:
    """The files the producer has marked done."""
    if not path.exists():
        return set()
    return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def render(books: Books, counters: dict[str, tuple[int, int]]) -> str:
    lines = []
    for subset, part in sorted(books.subsets.items()):
        states = "  ".join(f"{LABELS.get(state, state)} {part.states[state]:,}" for state in STATES)
        lines.append(f"{subset}: {part.rows:,} rows  {states}")
        for kind, count in part.problems.items():
            if count:
                lines.append(f"  {kind} {count:,}: {PROBLEMS[kind]}")
                lines.extend(f"    {example}" for example in books.examples[f"{subset}|{kind}"][:5])
    for name, (counter, expected) in counters.items():
        lines.append(f"counter {name} {counter:,}, the books say {expected:,}")
    problems = sum(books.total("problems").values()) + len(counters) + books.unreadable_parts
    lines.append(f"{problems:,} problems" if problems else "books exact: no problem")
    return "\n".join(lines) + "\n"
