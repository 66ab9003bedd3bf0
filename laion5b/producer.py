"""Queueing the rows of URL list files as tasks: batched, exactly once, resumable after a crash."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import redis

from laion5b import control, inputs
from laion5b.inputs import Picked, Row, SourceFile, Spec
from laion5b.keys import Keys
from laion5b.objectstore import Bucket
from laion5b.redisconn import retrying
from laion5b.replicas import Replicas
from laion5b.rows import InputError
from laion5b.tasks import BAD_ROW, BAD_URL, HASH_DIGITS, Task, safe_id, url_problem

log = logging.getLogger(__name__)

PRODUCER_TTL = 30
THRESHOLD_POLL = 1.0

# Queues one batch only if the file's recorded position is still where this batch starts, so a batch re-sent
# after a lost reply is never queued twice. KEYS: task, error, tongji_all, tongji_error, positions, failures hash.
# ARGV: file key, start, end, number of tasks, then the tasks, then the error records. Returns the position.
# Pushes go in chunks of 1000 values, under Lua's limit on unpacked values. Each error record's status (bad_url,
# bad_row: rare) is counted in the failures hash.
_PUSH_BATCH = """
local position = tonumber(redis.call('HGET', KEYS[5], ARGV[1]) or '0')
if position ~= tonumber(ARGV[2]) then return position end
local tasks = tonumber(ARGV[4])
local total = #ARGV - 4
for first = 5, 4 + tasks, 1000 do
  redis.call('LPUSH', KEYS[1], unpack(ARGV, first, math.min(first + 1000 - 1, 4 + tasks)))
end
for first = 5 + tasks, 4 + total, 1000 do
  redis.call('LPUSH', KEYS[2], unpack(ARGV, first, math.min(first + 1000 - 1, 4 + total)))
end
redis.call('INCRBY', KEYS[3], total)
if total > tasks then redis.call('INCRBY', KEYS[4], total - tasks) end
for i = 5 + tasks, 4 + total do
  local ok, record = pcall(cjson.decode, ARGV[i])
  local status = ok and type(record) == 'table' and record.status ~= nil and tostring(record.status) or 'unknown'
  redis.call('HINCRBY', KEYS[6], status, 1)
end
redis.call('HSET', KEYS[5], ARGV[1], ARGV[3])
return tonumber(ARGV[3])
"""


class Rewind(Exception):
    """Redis holds an earlier position of the file than this run reached: queue again from ``position``."""

    def __init__(self, position: int) -> None:
        super().__init__(position)
        self.position = position


@dataclass
class Progress:
    """What the producer has done in this run."""

    rows: int = 0
    failed_files: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def rate(self) -> float:
        return self.rows / max(time.monotonic() - self.started, 1e-9)


@dataclass
class Producer:
    """Pushes every row of every input file not yet done into the task queue, under a queue-length threshold."""

    client: redis.Redis
    keys: Keys
    parquet_dir: Path | str
    done_path: Path
    threshold: int
    batch_size: int
    spec: Spec = field(default_factory=Spec)
    stop: threading.Event = field(default_factory=threading.Event)
    progress: Progress = field(default_factory=Progress)
    on_batch: Callable[[Progress, SourceFile], None] = lambda progress, source: None
    min_replicas: int = 0
    """Replicas that must hold a batch before the next one is pushed (redis_min_replicas)."""
    bucket: Bucket | None = None
    """The bucket of an s3:// parquet_dir."""

    def __post_init__(self) -> None:
        self._push = self.client.register_script(_PUSH_BATCH)
        self._replicas = Replicas(self.min_replicas)
        self._pusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="push")
        self._heartbeat_at = 0.0
        self._columns: dict[SourceFile, Picked] = {}

    def run(self) -> Progress:
        """Queue everything; return what was done (``failed_files`` lists files that could not be read)."""
        positions = self._call(lambda: self.client.hgetall(self.keys.positions), "read_positions")
        sizes = self._sizes(inputs.find_files(self.parquet_dir, self.spec.input_format, self.bucket), positions)
        self._record_total(sizes, positions)
        for source in sizes:
            if self.stop.is_set():
                break
            self._queue_file(source)
        self._pusher.shutdown()
        self._call(lambda: self.client.delete(self.keys.producer), "producer_stop")
        return self.progress

    def _sizes(self, files: list[SourceFile], positions: dict[str, str]) -> dict[SourceFile, int]:
        """The rows of every file still to queue: not done yet, or done but with batches a Redis crash took back."""
        done = self._done()
        sizes = {}
        for source in files:
            if source.key in done and source.key not in positions:
                continue
            try:
                self._columns[source] = inputs.columns_of(source, self.spec)
                rows = inputs.count_rows(source, self.spec)
            except InputError as error:
                self._fail(source, error)
                continue
            if source.key in done and int(positions[source.key]) >= rows:
                continue
            if source.key in done:
                log.warning("redis_lost_writes file=%s queued_up_to=%s of %d: queueing the rest again", source.key,
                            positions[source.key], rows)  # fmt: skip
            sizes[source] = rows
        return sizes

    def _done(self) -> set[str]:
        if not self.done_path.exists():
            return set()
        return {line.strip() for line in self.done_path.read_text(encoding="utf-8").splitlines() if line.strip()}

    def _record_total(self, sizes: dict[SourceFile, int], positions: dict[str, str]) -> None:
        """Record how many rows the queue will have received once every file is done."""
        remaining = sum(rows - int(positions.get(source.key, 0)) for source, rows in sizes.items())

        def record() -> None:
            added = int(self.client.get(self.keys.tongji_all) or 0)
            pipe = self.client.pipeline()
            pipe.set(self.keys.tongji_total, added + remaining)
            pipe.set(self.keys.started, f"{time.time():.3f}", nx=True)
            pipe.set(self.keys.producer, os.getpid(), ex=PRODUCER_TTL)
            pipe.execute()

        self._call(record, "record_total")
        log.info("producer_start files=%d rows_to_queue=%d", len(sizes), remaining)

    def _queue_file(self, source: SourceFile) -> None:
        start = int(self._call(lambda: self.client.hget(self.keys.positions, source.key), "read_position") or 0)
        log.info("file_start file=%s subset=%s part=%s from_row=%d", source.key, source.subset, source.part, start)
        while True:
            try:
                complete = self._queue_rows(source, start)
                break
            except Rewind as rewind:
                log.warning("redis_lost_writes file=%s queued_up_to=%d: queueing again from there", source.key,
                            rewind.position)  # fmt: skip
                start = rewind.position
            except InputError as error:
                self._fail(source, error)
                return
        if not complete or self.stop.is_set():
            return
        with self.done_path.open("a", encoding="utf-8") as done:
            done.write(source.key + "\n")
            done.flush()
            os.fsync(done.fileno())
        log.info("file_done file=%s", source.key)

    def _queue_rows(self, source: SourceFile, start: int) -> bool:
        """Queue the file's rows from ``start`` on; True when all are queued, False when stopped or in conflict."""
        in_flight: Future[bool] | None = None
        try:
            for rows in inputs.read_rows(source, self.spec, self._columns[source], start, self.batch_size):
                batch = Batch.of(source, rows, self.spec.verify_hash)
                if in_flight is not None and not in_flight.result():
                    return False
                self._wait_below_threshold()
                if self.stop.is_set():
                    return False
                in_flight = self._pusher.submit(self._push_batch, source, batch)
        finally:
            complete = in_flight is None or in_flight.result()
        return complete

    def _push_batch(self, source: SourceFile, batch: Batch) -> bool:
        """Queue one batch (in the pusher thread, while the next one is read); False when the file must stop.

        Raise Rewind when Redis holds an earlier position than this batch's start: a Redis that crashed lost the last
        batches (with their position, in the same transaction), so they are queued again from there.
        """
        args = [source.key, batch.start, batch.end, len(batch.tasks), *batch.tasks, *batch.errors]
        keys = [self.keys.task, self.keys.error, self.keys.tongji_all, self.keys.tongji_error, self.keys.positions,
                self.keys.failures]  # fmt: skip
        position = int(self._call(lambda: self._replicas.run(self._push, keys, args), "push_batch"))
        if position < batch.start:
            raise Rewind(position)
        if position != batch.end:
            log.error("position_conflict file=%s expected=%d found=%d: is another add_task.py running?",
                      source.key, batch.start, position)  # fmt: skip
            self.progress.failed_files.append(source.key)
            return False
        self.progress.rows += batch.end - batch.start
        self.on_batch(self.progress, source)
        return True

    def _wait_below_threshold(self) -> None:
        """Wait while the queue is at the threshold or the whole run is paused (control.py pause)."""
        waiting = False
        while not self.stop.is_set():
            self._beat()
            queued, paused = self._call(self._queue_state, "queue_length")
            if queued < self.threshold and not paused:
                break
            if not waiting:
                log.info("%s queued=%d threshold=%d waiting", "run_paused" if paused else "queue_full", queued,
                         self.threshold)  # fmt: skip
                waiting = True
            self.stop.wait(THRESHOLD_POLL)
        if waiting:
            log.info("producer_resuming")

    def _queue_state(self) -> tuple[int, bool]:
        """The queue's length, and whether the whole run is paused."""
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self.keys.task)
        pipe.hexists(self.keys.control, control.PAUSE)
        queued, paused = pipe.execute()
        return queued, bool(paused)

    def _beat(self) -> None:
        now = time.monotonic()
        if now - self._heartbeat_at >= PRODUCER_TTL / 3:
            self._call(lambda: self.client.set(self.keys.producer, os.getpid(), ex=PRODUCER_TTL), "heartbeat")
            self._heartbeat_at = now

    def _fail(self, source: SourceFile, error: Exception) -> None:
        log.error("file_failed %s", error)
        self.progress.failed_files.append(source.key)

    def _call(self, call, what: str):
        return retrying(call, what, self.stop)


@dataclass(frozen=True)
class Batch:
    """Rows ``start`` to ``end`` of a file, encoded: tasks for usable URLs, ``bad_url`` error records for others."""

    start: int
    end: int
    tasks: list[str]
    errors: list[str]

    @classmethod
    def of(cls, source: SourceFile, rows: list[Row], verify_hash: str = "") -> Batch:
        tasks, errors = [], []
        subset, part = source.subset, source.part
        for row, sample_id, url, text, hash_value, meta, unreadable in rows:
            if unreadable is not None:
                errors.append(Task(safe_id(row), "", subset, part, row).error_record(BAD_ROW, unreadable, "add_task"))
                continue
            problem = url_problem(url)
            expected, hash_problem = expected_hash(verify_hash, hash_value) if verify_hash else (None, None)
            task = Task(safe_id(row if sample_id is None else sample_id),
                        url.strip() if problem is None else str(url or ""), subset, part, row, text, 0, meta,
                        expected)  # fmt: skip
            if problem is None and hash_problem is None:
                tasks.append(task.encode())
            elif problem is None:
                errors.append(task.error_record(BAD_ROW, hash_problem, worker="add_task"))
            else:
                errors.append(task.error_record(BAD_URL, problem, worker="add_task"))
        return cls(rows[0].row, rows[-1].row + 1, tasks, errors)


def expected_hash(algorithm: str, value: object) -> tuple[str | None, str | None]:
    """(``<algorithm>:<hex>`` to check the body against, or None for an empty value; why the value is unusable)."""
    if value is None:
        return None, None
    text = value.hex() if isinstance(value, bytes) else str(value).strip().lower()
    if not text:
        return None, None
    if len(text) != HASH_DIGITS[algorithm] or text.strip("0123456789abcdef"):
        return None, f"{algorithm} hash {text[:80]!r} is not {HASH_DIGITS[algorithm]} hex digits"
    return f"{algorithm}:{text}", None


def show_progress(progress: Progress, source: SourceFile) -> None:
    """Redraw one progress line on a terminal."""
    sys.stderr.write(f"\rqueued {progress.rows:,} rows  {progress.rate():,.0f} rows/s  file {source.key}\x1b[K")
    sys.stderr.flush()
