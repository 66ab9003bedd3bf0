"""Putting saved error records back on the task queue, each at most once, with the counters kept balanced.

What was requeued is kept as marks: per error file, for each selector used (``transient``, or
``status=<status>``), the byte offset before which every record the selector matches has been dealt with. The marks
live twice: as JSON in Redis (one field per error file in the hash ``keys.requeued``) and in ``<file>.requeued``
beside the error file.

A chunk of records is requeued by one Lua script that checks the file's Redis marks are still what this run read,
pushes the fresh tasks, takes them off ``tongji_error`` and the failing hosts' ``<host>:error`` counters, and
replaces the Redis marks, all at once. Only then is the mark file rewritten (atomically, fsynced). A crash before
the script changes nothing; a crash after it leaves the mark file behind Redis, and the next run starts from the
larger of the two. So a record is requeued exactly once, and two runs at the same time cannot both requeue it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis

from laion5b import errorfiles
from laion5b.keys import Keys
from laion5b.redisconn import retrying
from laion5b.tasks import BadTask, decode, is_transient

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT = "transient"
CHUNK_TASKS = 1000
CHUNK_BYTES = 16 * 1024 * 1024
THRESHOLD_POLL = 1.0

# KEYS: queue, tongji_error, host counters, marks hash, failures hash, requeued counter. ARGV: file field, marks
# read ('' for none), new marks, task count, host pair count, the tasks, (host, count) pairs, then (status, count)
# pairs. Returns the tasks pushed, or -1 when the marks changed since they were read (another run requeued from this
# file). Pushes go in chunks of 1000 values, under Lua's limit. A status count never goes under 0 (records saved
# before the failures hash existed were never counted there).
_REQUEUE = """
if (redis.call('HGET', KEYS[4], ARGV[1]) or '') ~= ARGV[2] then return -1 end
local count = tonumber(ARGV[4])
local hosts_end = 5 + count + 2 * tonumber(ARGV[5])
for first = 6, 5 + count, 1000 do
  redis.call('LPUSH', KEYS[1], unpack(ARGV, first, math.min(first + 999, 5 + count)))
end
if count > 0 then
  redis.call('DECRBY', KEYS[2], count)
  redis.call('INCRBY', KEYS[6], count)
end
for i = 6 + count, hosts_end, 2 do
  redis.call('HINCRBY', KEYS[3], ARGV[i] .. ':error', -tonumber(ARGV[i + 1]))
end
for i = hosts_end + 1, #ARGV, 2 do
  if redis.call('HINCRBY', KEYS[5], ARGV[i], -tonumber(ARGV[i + 1])) <= 0 then redis.call('HDEL', KEYS[5], ARGV[i]) end
end
redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
return count
"""


def selectors(statuses: Sequence[str]) -> list[str]:
    """The selectors of a run: the statuses named, or every transient status."""
    return [f"status={status}" for status in dict.fromkeys(statuses)] or [TRANSIENT]


def matches(selector: str, status: Any) -> bool:
    if selector == TRANSIENT:
        return isinstance(status, int | str) and is_transient(status)
    return selector == f"status={status}"


def merge(*marks: dict[str, int]) -> dict[str, int]:
    """Marks that cover what any of the given marks covers."""
    merged: dict[str, int] = {}
    for each in marks:
        for selector, offset in each.items():
            merged[selector] = max(merged.get(selector, 0), int(offset))
    return merged


def failing_host(record: dict[str, Any]) -> str:
    """The host whose ``<host>:error`` counter counted the record: its worker identity up to the last ':'."""
    return str(record.get("worker", "")).rpartition(":")[0]


@dataclass
class Chunk:
    """Records of one byte range of an error file chosen for requeueing."""

    end: int
    tasks: list[str] = field(default_factory=list)
    hosts: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    unusable: int = 0


@dataclass
class Tally:
    requeued: int = 0
    unusable: int = 0
    files: int = 0


@dataclass
class Requeuer:
    """Requeues the records of error files that the selectors match, and that no earlier run requeued."""

    client: redis.Redis
    keys: Keys
    host_id: str
    threshold: int
    stop: threading.Event = field(default_factory=threading.Event)
    tally: Tally = field(default_factory=Tally)

    def __post_init__(self) -> None:
        self._requeue = self.client.register_script(_REQUEUE)

    def run(self, paths: Sequence[Path], chosen: Sequence[str]) -> Tally:
        for path in paths:
            if self.stop.is_set():
                break
            self.requeue_file(path, chosen)
        return self.tally

    def requeue_file(self, path: Path, chosen: Sequence[str]) -> int:
        """Requeue the matching records of one file that are not requeued yet; return how many."""
        requeued = 0
        while not self.stop.is_set():
            pushed = self._requeue_chunk(path, chosen)
            if pushed is None:
                break
            requeued += pushed
        if requeued:
            log.info("requeued file=%s tasks=%d selectors=%s", path.name, requeued, ",".join(chosen))
        self.tally.requeued += requeued
        self.tally.files += 1
        return requeued

    def _requeue_chunk(self, path: Path, chosen: Sequence[str]) -> int | None:
        """Requeue the next chunk of a file; return how many tasks were pushed, or None at the end of the file."""
        field_name = f"{self.host_id}:{path.resolve()}"
        stored = self._call(lambda: self.client.hget(self.keys.requeued, field_name)) or ""
        marks = merge(errorfiles.read_marks(path), errorfiles.parse_marks(stored))
        start = min(marks.get(selector, 0) for selector in chosen)
        chunk = collect(path, start, marks, chosen)
        if chunk.end == start:
            return None
        self._wait_below_threshold()
        if self.stop.is_set():
            return None
        marks.update({selector: max(marks.get(selector, 0), chunk.end) for selector in chosen})
        pushed = int(self._call(lambda: self._push(field_name, stored, marks, chunk)))
        if pushed < 0:
            log.warning("requeue_marks_moved file=%s: another requeue run, or a reply lost in a Redis outage; "
                        "rereading", path.name)  # fmt: skip
            return 0
        errorfiles.write_marks(path, marks)
        self.tally.unusable += chunk.unusable
        return pushed

    def _push(self, field_name: str, stored: str, marks: dict[str, int], chunk: Chunk) -> int:
        keys = [self.keys.task, self.keys.tongji_error, self.keys.host_counters, self.keys.requeued,
                self.keys.failures, self.keys.requeued_total]  # fmt: skip
        hosts = [value for host, count in chunk.hosts.items() for value in (host, count)]
        statuses = [value for status, count in chunk.statuses.items() for value in (status, count)]
        new = json.dumps(marks, sort_keys=True)
        args = [field_name, stored, new, len(chunk.tasks), len(chunk.hosts), *chunk.tasks, *hosts, *statuses]
        return self._requeue(keys=keys, args=args)

    def _wait_below_threshold(self) -> None:
        while not self.stop.is_set():
            if self._call(lambda: self.client.llen(self.keys.task)) < self.threshold:
                return
            self.stop.wait(THRESHOLD_POLL)

    def _call(self, call: Callable[[], T]) -> T:
        return retrying(call, "requeue", self.stop)


def collect(path: Path, start: int, marks: dict[str, int], chosen: Sequence[str]) -> Chunk:
    """The next chunk from ``start``: records a chosen selector matches and no mark covers, as fresh tasks."""
    chunk = Chunk(end=start)
    for offset, end, line in errorfiles.lines_from(path, start):
        if len(chunk.tasks) >= CHUNK_TASKS or chunk.end - start >= CHUNK_BYTES:
            break
        chunk.end = end
        record = errorfiles.parse(line)
        if record is None or not _wanted(record, offset, marks, chosen):
            continue
        try:
            task = decode(line)
        except BadTask:
            chunk.unusable += 1
            continue
        task.attempts = 0
        chunk.tasks.append(task.encode())
        chunk.statuses[str(record.get("status"))] += 1
        host = failing_host(record)
        if host:
            chunk.hosts[host] += 1
    return chunk


def _wanted(record: dict[str, Any], offset: int, marks: dict[str, int], chosen: Sequence[str]) -> bool:
    """Whether a chosen selector matches the record and no selector that matches it has handled it already."""
    status = record.get("status")
    if not any(matches(selector, status) for selector in chosen):
        return False
    return not any(matches(selector, status) and offset < mark for selector, mark in marks.items())
