"""What ``reconcile.py repair`` and ``rebuild`` change: extra copies of samples dropped from the store, redundant
Redis entries removed, rows without a state queued again, producer positions and counters set from the books.

A shard that holds an extra copy is rewritten without it: the new tar and index are written under hidden names
beside it, fsynced, and renamed over the old ones (index first, as a shard is finished), so a reader (webdataset,
Hugging Face ``datasets``) sees either the old shard or the new one under the same name, never a partial file."""

from __future__ import annotations

import logging
import os
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis

from laion5b import errorfiles
from laion5b.control import redis_time
from laion5b.imageformat import EXTENSIONS
from laion5b.inputs import SourceFile, Spec
from laion5b.keys import Keys
from laion5b.producer import Batch
from laion5b.redisrows import DELAYED, Entry
from laion5b.requeue import TRANSIENT, merge
from laion5b.rows import Row
from laion5b.rowstatus import Location
from laion5b.store import TEMP_FOLDER

log = logging.getLogger(__name__)

PUSH_CHUNK = 1000
IMAGE_SUFFIXES = tuple(f".{extension}" for extension in EXTENSIONS)


def drop_copies(copies: Iterable[Location]) -> int:
    """Remove the extra copies: image files, or samples rewritten out of their shards. Return the shards rewritten."""
    members: dict[str, set[str]] = defaultdict(set)
    for copy in copies:
        if copy.path is not None:
            os.unlink(copy.path)
            log.info("copy_removed file=%s", copy.path)
        elif copy.shard is not None and copy.member is not None:
            members[copy.shard].add(copy.member)
    for shard, keys in members.items():
        rewrite_shard(Path(shard), keys)
    return len(members)


def rewrite_shard(tar: Path, drop: set[str]) -> None:
    """Rewrite a finished shard and its index without the samples whose key is in ``drop``; a shard left without a
    sample is removed (its tar first: an index without its tar is not a shard)."""
    index = tar.with_suffix(".parquet")
    table = pq.read_table(index)
    table = table.filter(pc.invert(pc.is_in(table["key"], pa.array(sorted(drop), pa.string()))))
    if not table.num_rows:
        tar.unlink()
        index.unlink()
        log.info("shard_removed shard=%s: every sample was a copy", tar)
        return
    new_tar, new_index = tar.with_name(f".{tar.name}.new"), index.with_name(f".{index.name}.new")
    with tarfile.open(tar) as source, new_tar.open("wb") as file:
        with tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as target:
            for member in source:
                if member.name.partition(".")[0] not in drop:
                    target.addfile(member, source.extractfile(member))
        file.flush()
        os.fsync(file.fileno())
    with new_index.open("wb") as file:
        pq.write_table(table, file)
        file.flush()
        os.fsync(file.fileno())
    new_index.replace(index)
    new_tar.replace(tar)
    errorfiles.fsync_folder(tar.parent)
    log.info("shard_rewritten shard=%s dropped=%d samples=%d", tar, len(drop), table.num_rows)


def drop_entries(client: redis.Redis, entries: Sequence[Entry]) -> None:
    """Remove each entry once from where it is; then forget shard records and open shards left without tasks."""
    for first in range(0, len(entries), PUSH_CHUNK):
        pipe = client.pipeline(transaction=False)
        for entry in entries[first : first + PUSH_CHUNK]:
            if entry.place == DELAYED:
                pipe.zrem(entry.key, entry.raw)
            else:
                pipe.lrem(entry.key, 1, entry.raw)
        pipe.execute()


def forget_empty_shards(client: redis.Redis, keys: Keys) -> None:
    """Drop the records of shards being finished, and of open shards, whose task lists are gone."""
    for field in client.hkeys(keys.shards):
        if not client.exists(keys.shard_tasks(field)):
            client.hdel(keys.shards, field)
    for key in client.scan_iter(match=f"{keys.task}:kept:*", count=1000):
        if client.type(key) == "hash":
            for shard in client.hkeys(key):
                if not client.exists(f"{key}:{shard}"):
                    client.hdel(key, shard)


def set_open_counts(client: redis.Redis, keys: Keys) -> None:
    """Set each host's ``<host>:open`` to the tasks of its open shards and of its shards being finished."""
    counts: Counter[str] = Counter()
    for field in client.hkeys(keys.shards):
        counts[field.partition("|")[0]] += client.llen(keys.shard_tasks(field))
    for key in client.scan_iter(match=f"{keys.task}:kept:*", count=1000):
        if client.type(key) == "hash":
            for shard, host in client.hgetall(key).items():
                counts[host] += client.llen(f"{key}:{shard}")
    for name in client.hkeys(keys.host_counters):
        if name.endswith(":open"):
            counts.setdefault(name.removesuffix(":open"), 0)
    if counts:
        client.hset(keys.host_counters, mapping={f"{host}:open": count for host, count in counts.items()})


class Requeue:
    """Queues rows again as fresh tasks (the producer's encoding), a thousand to a push: a row whose URL is unusable
    gets its error record instead, as when the producer first read it. ``flush`` pushes what is left."""

    def __init__(self, client: redis.Redis, keys: Keys, spec: Spec) -> None:
        self.client = client
        self.keys = keys
        self.spec = spec
        self.queued = 0
        self.recorded = 0
        self._tasks: list[str] = []
        self._errors: list[str] = []

    def __call__(self, source: SourceFile, rows: list[Row]) -> None:
        batch = Batch.of(source, rows, self.spec.verify_hash)
        self._tasks.extend(batch.tasks)
        self._errors.extend(batch.errors)
        if len(self._tasks) + len(self._errors) >= PUSH_CHUNK:
            self.flush()

    def flush(self) -> None:
        for key, values in ((self.keys.task, self._tasks), (self.keys.error, self._errors)):
            for first in range(0, len(values), PUSH_CHUNK):
                self.client.lpush(key, *values[first : first + PUSH_CHUNK])
        self.queued += len(self._tasks)
        self.recorded += len(self._errors)
        self._tasks, self._errors = [], []


def mark_requeued(sizes: dict[Path, int]) -> None:
    """Mark every transient record of the error files, up to the size each had when read, as queued again (the
    ``transient`` mark that ``save_error_task.py --requeue`` writes): ``report.py`` and ``check`` then count those rows
    as pending, not failed, and ``--requeue`` does not queue them a second time."""
    for path, size in sizes.items():
        errorfiles.write_marks(path, merge(errorfiles.read_marks(path), {TRANSIENT: size}))


def set_positions(client: redis.Redis, keys: Keys, positions: dict[str, int]) -> None:
    """Set the producer's position in each file."""
    if positions:
        client.hset(keys.positions, mapping=positions)


def set_counters(client: redis.Redis, keys: Keys, states: dict[str, int], statuses: dict[str, int], total: int,
                 stored_bytes: int) -> None:  # fmt: skip
    """Set the run-wide counters to the books: succeeded, failed, added, bytes, failures by status, total rows."""
    added = sum(count for state, count in states.items() if state != "unqueued")
    pipe = client.pipeline(transaction=True)
    pipe.set(keys.tongji_succ, states.get("stored", 0))
    pipe.set(keys.tongji_error, states.get("failed", 0))
    pipe.set(keys.tongji_all, added)
    pipe.set(keys.tongji_bytes, stored_bytes)
    pipe.set(keys.tongji_total, total)
    pipe.set(keys.started, f"{redis_time(client):.3f}", nx=True)
    pipe.delete(keys.failures)
    if statuses:
        pipe.hset(keys.failures, mapping={status: count for status, count in statuses.items() if count})
    pipe.execute()


def stored_bytes(store_dir: Path, output_format: str) -> int:
    """Bytes of the stored images: the files' sizes, or the ``bytes`` column of the finished shards' indexes."""
    total = 0
    for folder, _, names in os.walk(store_dir):
        if TEMP_FOLDER in Path(folder).relative_to(store_dir).parts[:1]:
            continue
        for name in names:
            if output_format == "files" and name.endswith(IMAGE_SUFFIXES):
                total += os.stat(f"{folder}/{name}").st_size
            elif output_format == "webdataset" and name.endswith(".tar") and not name.startswith("."):
                total += _index_bytes(f"{folder}/{name.removesuffix('.tar')}.parquet")
    return total


def _index_bytes(index: str) -> int:
    """The ``bytes`` column's sum of a finished shard's index (0 when it is missing)."""
    try:
        return pc.sum(pq.read_table(index, columns=["bytes"])["bytes"]).as_py() or 0
    except FileNotFoundError:
        return 0
