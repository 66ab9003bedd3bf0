"""What Redis holds of each input row: its tasks in the queue, the delayed set, the leases, the open shards and the
shards being finished, and the error records not saved yet. Read for ``reconcile.py``, grouped by input part."""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import redis

from laion5b.keys import Keys
from laion5b.tasks import BadTask, decode

QUEUED, DELAYED, HELD, OPEN, FINISHING, ERROR = "queued", "delayed", "held", "open", "finishing", "error"
"""Where an entry is: the queue, the delayed set, a lease list, an open shard's list (kept), the list of a shard
being finished, the error list (or a saver's processing list)."""
TASK_PLACES = (FINISHING, OPEN, HELD, DELAYED, QUEUED)
PLACES = (*TASK_PLACES, ERROR)
"""The places of tasks, the furthest along first: of two entries of one row, the first in this order is kept."""
CHUNK = 10_000
_GLOB = re.compile(r"([*?\[\]\\])")


class Entry(NamedTuple):
    """One Redis entry of a row: where it is, the key that holds it, and the member as stored (to remove it)."""

    row: int
    place: str
    key: str
    raw: str


class PartEntries:
    """The entries of one part, held flat (a row, a place and a key number each, and the text when kept: about 30
    bytes an entry without it), read back grouped by row in row order."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.rows = array("q")
        self.places = bytearray()
        self.key_numbers = array("i")
        self.raws: list[str] = []

    def add(self, row: int, place: str, key_number: int, raw: str) -> None:
        self.rows.append(row)
        self.places.append(PLACES.index(place))
        self.key_numbers.append(key_number)
        self.raws.append(raw)

    def __len__(self) -> int:
        return len(self.rows)

    def by_row(self) -> Iterator[tuple[int, list[Entry]]]:
        """(row, its entries) for each row that has some, in row order."""
        order = sorted(range(len(self.rows)), key=self.rows.__getitem__)
        i = 0
        while i < len(order):
            row, group = self.rows[order[i]], []
            while i < len(order) and self.rows[order[i]] == row:
                n = order[i]
                group.append(Entry(row, PLACES[self.places[n]], self.keys[self.key_numbers[n]], self.raws[n]))
                i += 1
            yield row, group


@dataclass
class RedisRows:
    """Every entry that names an input row, grouped by (subset, part); entries that name none are only counted."""

    keep_tasks: bool = True
    """Whether task entries keep their text (to be removed by repair); check leaves it out, to save memory."""
    parts: dict[tuple[str, str], PartEntries] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    unreadable: int = 0
    """Entries that are not a task or a record of one (``bad_task`` entries, say): left as they are."""

    def add(self, place: str, key: str, raw: str, fields: dict | None) -> None:
        if fields is None:
            self.unreadable += 1
            return
        if not self.keys or self.keys[-1] != key:
            self.keys.append(key)
        part = (fields["subset"], fields["part"])
        if part not in self.parts:
            self.parts[part] = PartEntries(self.keys)
        kept = raw if self.keep_tasks or place == ERROR else ""
        self.parts[part].add(fields["row"], place, len(self.keys) - 1, kept)

    def pop(self, subset: str, part: str) -> PartEntries:
        """The entries of one part, let go of here (a part is looked at once)."""
        return self.parts.pop((subset, part), None) or PartEntries(self.keys)


def read(client: redis.Redis, keys: Keys, keep_tasks: bool = True) -> RedisRows:
    """Every task and unsaved error record in Redis, by part (read in chunks: a live run may move some meanwhile);
    without ``keep_tasks``, tasks without their text."""
    found = RedisRows(keep_tasks=keep_tasks)
    for raw in _list(client, keys.task):
        found.add(QUEUED, keys.task, raw, _task_fields(raw))
    for raw in _sorted_set(client, keys.delayed):
        found.add(DELAYED, keys.delayed, raw, _task_fields(raw.partition("|")[2]))
    for key in _keys(client, f"{_escape(keys.task)}:lease:*"):
        for raw in _list(client, key):
            found.add(HELD, key, raw, _task_fields(raw))
    for key in _keys(client, f"{_escape(keys.task)}:kept:*"):
        if client.type(key) == "list":
            for raw in _list(client, key):
                found.add(OPEN, key, raw, _task_fields(raw))
    for shard in client.hkeys(keys.shards):
        key = keys.shard_tasks(shard)
        for raw in _list(client, key):
            found.add(FINISHING, key, raw, _task_fields(raw))
    for key in [keys.error, *_keys(client, f"{_escape(keys.error)}:processing:*")]:
        for raw in _list(client, key):
            found.add(ERROR, key, raw, record_fields(raw))
    return found


def _task_fields(raw: str) -> dict | None:
    try:
        task = decode(raw)
    except BadTask:
        return None
    return {"subset": task.subset, "part": task.part, "row": task.row}


def record_fields(raw: str) -> dict | None:
    """An error record's fields when it names a row (subset, part, row), else None."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("row"), int):
        return None
    if not isinstance(record.get("subset"), str) or not isinstance(record.get("part"), str):
        return None
    return record


def _list(client: redis.Redis, key: str) -> Iterator[str]:
    start = 0
    while chunk := client.lrange(key, start, start + CHUNK - 1):
        yield from chunk
        start += CHUNK


def _sorted_set(client: redis.Redis, key: str) -> Iterator[str]:
    start = 0
    while chunk := client.zrange(key, start, start + CHUNK - 1):
        yield from chunk
        start += CHUNK


def _keys(client: redis.Redis, pattern: str) -> list[str]:
    return sorted(client.scan_iter(match=pattern, count=1000))


def _escape(key: str) -> str:
    """A key as a SCAN pattern that matches only itself."""
    return _GLOB.sub(r"\\\1", key)
