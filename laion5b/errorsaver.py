"""Moving error records from Redis into the error files, exactly once even when killed at any moment.

One step (``save_batch``):
1. a Lua script moves up to ``batch_size`` records from the error list into this saver's own processing list
   (or, when that list is not empty, returns what it holds: a batch a killed predecessor did not finish);
2. the records are appended to the current error file and fsynced; for a held-over batch, records whose
   ``record_id`` is already in the tail of the files written last are skipped;
3. a Lua script deletes the processing list.
A kill before 2 leaves the batch in the processing list; a kill during or after 2 leaves some or all of it in the
file too, and the next start skips those. A name (host_id, or host_id:--name) is owned by one live process at a time
(a Redis key with a TTL), so two savers never share a processing list.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import redis

from laion5b import errorfiles
from laion5b.keys import Keys
from laion5b.leases import Owner
from laion5b.redisconn import retrying
from laion5b.replicas import Replicas

log = logging.getLogger(__name__)
T = TypeVar("T")

NAME_TTL = 60
POLL = 2.0
TAIL_BYTES = 64 * 1024 * 1024
"""Bytes at the end of the files written last that are searched for a held-over batch's records."""
TAIL_FILES = 2
"""Files searched: the batch may sit in the previous four-hour file when the saver restarts in the next one."""

# KEYS: owner key. ARGV: token, ttl, token it may replace ('' for none). Returns nothing, or the live owner.
_ACQUIRE = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] and owner ~= ARGV[3] then return owner end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""

# KEYS: error list, processing list, owner key. ARGV: count, token, ttl.
# Returns false when another process owns the name, else {1, held records...} or {0, newly moved records...}.
_TAKE = """
local owner = redis.call('GET', KEYS[3])
if owner and owner ~= ARGV[2] then return false end
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
local held = redis.call('LRANGE', KEYS[2], 0, -1)
if #held > 0 then
  table.insert(held, 1, 1)
  return held
end
local batch = redis.call('RPOP', KEYS[1], ARGV[1])
if not batch then return {0} end
for first = 1, #batch, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(batch, first, math.min(first + 999, #batch)))
end
table.insert(batch, 1, 0)
return batch
"""

# KEYS: processing list, owner key. ARGV: token, ttl. Returns 1, or 0 when another process owns the name.
_DROP = """
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return 1
"""

# KEYS: owner key. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


class NameInUse(RuntimeError):
    """Another live save_error_task.py runs under this name."""


@dataclass
class Tally:
    """What this saver did since it started."""

    batches: int = 0
    saved: int = 0
    skipped: int = 0


@dataclass
class Saver:
    """One save_error_task.py instance: its name owns one processing list."""

    client: redis.Redis
    keys: Keys
    folder: Path
    host_id: str
    name: str
    batch_size: int
    stop: threading.Event = field(default_factory=threading.Event)
    tally: Tally = field(default_factory=Tally)
    min_replicas: int = 0
    """Replicas that must hold a batch's move to the processing list before it is written (redis_min_replicas)."""

    def __post_init__(self) -> None:
        self._replicas = Replicas(self.min_replicas)
        self.token = Owner.this_process(self.host_id).token()
        self.processing = self.keys.error_processing(self.name)
        self.owner_key = self.keys.error_saver(self.name)
        self._acquire = self.client.register_script(_ACQUIRE)
        self._take = self.client.register_script(_TAKE)
        self._drop = self.client.register_script(_DROP)
        self._release = self.client.register_script(_RELEASE)

    def acquire(self) -> None:
        """Own the name; a dead process of this host that owned it is replaced. Raise NameInUse otherwise."""
        holder = self._call(lambda: self._acquire(keys=[self.owner_key], args=[self.token, NAME_TTL, ""]))
        if holder is None:
            return
        owner = Owner.parse(holder)
        if owner is None or owner.host != self.host_id or owner.is_alive_here():
            raise NameInUse(f"save_error_task {self.name} is already running (owner {holder}); use --name")
        if self._call(lambda: self._acquire(keys=[self.owner_key], args=[self.token, NAME_TTL, holder])):
            raise NameInUse(f"save_error_task {self.name} was taken by another process while starting")

    def release(self) -> None:
        self._call(lambda: self._release(keys=[self.owner_key], args=[self.token]))

    def run(self, until_empty: bool) -> Tally:
        """Save batches until stopped, or with ``until_empty`` until the error list is empty."""
        while not self.stop.is_set():
            try:
                moved = self.save_batch()
            except OSError as error:
                log.error("error_file_write_failed folder=%s error=%s: retrying", self.folder, error)
                self.stop.wait(POLL)
                continue
            if moved == 0:
                if until_empty:
                    break
                self.stop.wait(POLL)
        return self.tally

    def save_batch(self) -> int:
        """Save one batch; return how many records it held (0 when there was nothing to save)."""
        keys, args = [self.keys.error, self.processing, self.owner_key], [self.batch_size, self.token, NAME_TTL]
        reply = self._call(lambda: self._replicas.run(self._take, keys, args))
        if reply is None:
            raise NameInUse(f"save_error_task {self.name} was taken over by another process")
        held_over, records = reply[0] == 1, reply[1:]
        if not records:
            return 0
        lines = [errorfiles.one_line(record) for record in records]
        if held_over:
            lines = self._unsaved(lines)
        if lines:
            self.folder.mkdir(parents=True, exist_ok=True)
            errorfiles.append(self.folder / errorfiles.file_name(time.time()), lines)
        if not self._call(lambda: self._drop(keys=[self.processing, self.owner_key], args=[self.token, NAME_TTL])):
            raise NameInUse(f"save_error_task {self.name} was taken over by another process")
        self.tally.batches += 1
        self.tally.saved += len(lines)
        self.tally.skipped += len(records) - len(lines)
        return len(records)

    def _unsaved(self, lines: list[str]) -> list[str]:
        """The lines of a held-over batch that are not in the files yet."""
        tail = max(TAIL_BYTES, 4 * sum(len(line) + 1 for line in lines))
        saved = errorfiles.keys_in_tails(errorfiles.recently_written(self.folder, TAIL_FILES), tail)
        unsaved = [line for line in lines if errorfiles.record_key(line) not in saved]
        log.info("held_over_batch name=%s records=%d already_saved=%d", self.name, len(lines),
                 len(lines) - len(unsaved))  # fmt: skip
        return unsaved

    def _call(self, call: Callable[[], T]) -> T:
        return retrying(call, f"save_errors:{self.name}", self.stop)
