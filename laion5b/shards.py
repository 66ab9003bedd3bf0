"""Webdataset output: a worker writes its samples into tar shards in its temporary folder, and a shard is finished
(fsynced, renamed to ``store_dir/<subset>/<host_id>-<NAME>-<seq>-<incarnation>.tar`` beside its ``.parquet``
index) before its samples count as succeeded. The protocol and its crash windows are in docs/output.md
("Webdataset output")."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from laion5b.imaging import Processed
from laion5b.leases import FENCED, KEPT, RETURN, Leases, Lock, Owner
from laion5b.objectstore import Bucket, is_remote
from laion5b.sidecars import Sidecars, caption_file, metadata_file
from laion5b.store import Claimed, file_safe, fresh_temp_folder, worker_temp_folder
from laion5b.storehealth import StoreHealth, write_all
from laion5b.tasks import Task, one_line
from laion5b.uploads import STORE_ERRORS, Uploader, describe, drop_objects, recover_files, remove_local

log = logging.getLogger(__name__)

TAR_BLOCK = 512
TAR_END = bytes(2 * TAR_BLOCK)
USTAR_NAME_BYTES = 100
USTAR_TEMPLATE = bytes(100) + b"0000644\0" + b"0000000\0" * 2 + bytes(24) + b" " * 8 + b"0" + bytes(100)
USTAR_TEMPLATE += b"ustar\x0000" + bytes(TAR_BLOCK - len(USTAR_TEMPLATE) - 8)
"""A ustar header of a regular file, mode 0644, owner 0, with its checksum field blank (spaces)."""
RECOVERY_LOCK_SECONDS = 60
"""How long the shard recovery lock of a host lives unless renewed; its holder renews it before each shard."""
INCARNATION_CHARS = 8
"""Characters of the process's incarnation in its shards' names: two processes of one worker name never share one."""
FINISHED, LOST, TAKEN = "finished", "lost", "taken"
"""What renaming a prepared shard's files found: both under their final names, a file gone, a final name taken."""
MAX_INDEX_NESTING = 16
"""Lists and objects nested deeper than this are kept as JSON text in a shard's index (parquet reads back only
so much nesting)."""
LOCK_WAIT = 0.05
"""Seconds the worker's main thread waits for the shards' lock: a write that does not return holds it."""

T = TypeVar("T")
Retry = Callable[[Callable[[], T]], T]
"""Runs a Redis step, repeating it while Redis is unreachable."""


def tar_member(name: str, data: bytes, mtime: int) -> list[bytes]:
    """One tar member's pieces: header, data, padding to the block size."""
    return [tar_header(name, len(data), mtime), data, bytes(-len(data) % TAR_BLOCK)]


def tar_header(name: str, size: int, mtime: int) -> bytes:
    """A regular file's ustar header, built directly (a tenth of ``TarInfo.tobuf``'s time); a name over the ustar
    field's 100 bytes gets tarfile's pax header instead."""
    encoded = name.encode("utf-8")
    if len(encoded) > USTAR_NAME_BYTES:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, mtime, 0o644
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8")
    header = bytearray(USTAR_TEMPLATE)
    header[: len(encoded)] = encoded
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"%011o\0" % mtime
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


@dataclass
class Shard:
    """One shard of a worker: where its files go, and what its tar holds so far."""

    subset: str
    name: str
    temp_dir: str
    final_dir: str
    file: Any = None
    opened: float = field(default_factory=time.monotonic)
    rows: list[dict[str, Any]] = field(default_factory=list)
    bytes: int = 0
    end: int = 0
    """Bytes of its tar's members so far (where the tar end goes)."""
    error: Exception | None = None
    """Why it could not be sealed: it is discarded, its tasks queued again (unless the store refused it for now)."""
    uploaded: bool = False
    """Object storage: both its objects are in the bucket."""

    @property
    def id(self) -> str:
        """The shard's name in Redis: unique among the shards of a store."""
        return f"{self.subset}/{self.name}"

    @property
    def samples(self) -> int:
        return len(self.rows)

    def paths(self) -> dict[str, str]:
        """Temporary and final paths of its tar and its index, absolute (final ones are URLs in object storage)."""
        temp = os.path.abspath(self.temp_dir)
        final = self.final_dir if is_remote(self.final_dir) else os.path.abspath(self.final_dir)
        return {
            "temp_tar": f"{temp}/{self.name}.tar",
            "temp_index": f"{temp}/{self.name}.parquet",
            "tar": f"{final}/{self.name}.tar",
            "index": f"{final}/{self.name}.parquet",
        }


class ShardSink:
    """Webdataset output of one worker process: ``put`` appends a sample to the open shard of its subset (any
    thread); a full or old shard is sealed by a thread of its own (tar end, index, fsync); the worker's main thread
    takes sealed shards from ``ready`` and finishes them in Redis and on disk (``finish``). With a ``bucket`` (an
    s3:// store_dir), shards are written under ``staging_dir`` and a finished shard is uploaded by an ``Uploader``
    thread, then counted by the main thread (``commit_uploaded``)."""

    fsync = False
    """``put`` only appends to an open file: the fsync is the sealer's, once per shard."""

    def __init__(
        self,
        store_dir: Path | str,
        host_id: str,
        worker_name: str,
        identity: str,
        shard_size: int,
        max_seconds: float,
        incarnation: str,
        staging_dir: Path | None = None,
        bucket: Bucket | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.host_id = host_id
        self.prefix = f"{file_safe(host_id)}-{file_safe(worker_name)}-"
        self.suffix = f"-{incarnation[:INCARNATION_CHARS]}"
        self.shard_size = shard_size
        self.max_seconds = max_seconds
        self.sidecars = Sidecars(True, True, host_id, identity)
        self.temp_dir = worker_temp_folder(staging_dir or Path(store_dir), host_id, worker_name)
        self.bucket = bucket
        self.uploader = Uploader(bucket) if bucket is not None else None
        self.health = StoreHealth()
        self.closing = False
        """Set once the worker stops: a put then returns its task (a shard opened now would never be sealed)."""
        self._open: dict[str, Shard] = {}
        self._next_seq: dict[str, int] = {}
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._sealing: queue.SimpleQueue[Shard | None] = queue.SimpleQueue()
        self.ready: queue.SimpleQueue[Shard] = queue.SimpleQueue()
        self._sealer = threading.Thread(target=self._seal_loop, name="shard-sealer", daemon=True)
        self.unfinished = 0
        """Shards opened and not finished or discarded yet (open, sealing, or ready)."""
        self.left_prepared = 0
        """Shards prepared in Redis that could not be renamed: their files stay for ``recover`` once this process
        is gone."""

    def open(self, claimed: Claimed | None = None) -> None:
        """Create this worker's empty temporary folder, removing those of dead workers of this host (``claimed``:
        see ``remove_dead_temp_folders``)."""
        fresh_temp_folder(self.temp_dir, claimed)
        self._sealer.start()
        if self.uploader is not None:
            self.uploader.start()

    def abandon(self) -> None:
        """This process lost its identity: drop its open shards (files removed, nothing asked of Redis), then close."""
        with self._lock:
            for shard in self._open.values():
                shard.file.close()
            self._open.clear()
        self.close()

    def close(self) -> None:
        """Stop the sealer (and the uploader) and remove the temporary folder, unless it holds shards left
        prepared."""
        self._sealing.put(None)
        self._sealer.join()
        if self.uploader is not None:
            self.uploader.stop(0)
            self.left_prepared += self.uploader.waiting  # prepared, not counted: recovered by the host's next worker
        if self.left_prepared:
            log.warning("shards_left_prepared folder=%s shards=%d: a worker of this host finishes them",
                        self.temp_dir, self.left_prepared)  # fmt: skip
            return
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def existing(self, task: Task) -> Path | None:
        """Samples are not looked up: a task comes back only when its shard was discarded."""
        return None

    def put(self, task: Task, raw: str, image: Processed, final_url: str | None) -> tuple[str, str, str]:
        """Append the sample (image, caption, metadata) to its subset's open shard; the outcome keeps its task held
        until that shard is finished."""
        assert image.data is not None and image.extension is not None
        metadata = self.sidecars.describe(task, image, final_url)
        key = metadata["key"]
        members = [
            (f"{key}.{image.extension}", image.data),
            (f"{key}.txt", caption_file(task)),
            (f"{key}.json", metadata_file(metadata)),
        ]
        mtime = int(time.time())
        block = b"".join([piece for name, data in members for piece in tar_member(name, data, mtime)])
        row = index_row(task, metadata, [name for name, _ in members])
        with self._lock:
            if self.closing:
                return RETURN, raw, ""
            shard = self._open.get(task.subset) or self._new_shard(task.subset)
            self._append(shard, block)
            shard.rows.append(row)
            shard.bytes += len(image.data)
            if shard.samples >= self.shard_size:
                self._seal(shard)
        return KEPT, raw, shard.id

    def seal_old(self, now: float) -> None:
        """Seal every open shard that has been open for ``shard_max_seconds``."""
        with self._try_lock() as locked:
            for shard in list(self._open.values()) if locked else []:
                if now - shard.opened >= self.max_seconds:
                    self._seal(shard)

    def seal_all(self) -> None:
        """Seal every open shard that holds a sample (the worker stops, pauses or has nothing left to do). Like
        ``seal_old``, it seals nothing while a write that does not return holds the shards: call it again later."""
        with self._try_lock() as locked:
            for shard in list(self._open.values()) if locked else []:
                self._seal(shard)

    def reseal(self, shard: Shard) -> None:
        """Seal again a shard whose sealing the store refused (full, read-only): its tar is cut back to its members
        first. When that fails, it comes back on ``ready`` with the error."""
        try:
            shard.file = open(shard.paths()["temp_tar"], "r+b", buffering=0)  # noqa: SIM115 - closed by the sealer
            shard.file.truncate(shard.end)
            shard.file.seek(shard.end)
        except OSError as error:
            shard.error = error
            self.ready.put(shard)
            return
        shard.error = None
        self._sealing.put(shard)

    @property
    def open_samples(self) -> int:
        """Samples in open shards (read without the lock: a figure for the log)."""
        return sum(shard.samples for shard in list(self._open.values()))

    def finish(self, shard: Shard, leases: Leases, retry: Retry) -> int:
        """Finish a sealed shard: its tasks move to the shard in Redis (all or none), its files get their final names,
        then its samples are counted; return how many. A shard that could not be sealed, or one of whose tasks is no
        longer held (a lease was lost), is discarded instead: its files are dropped, its tasks queued again (-1).
        Each Redis step runs through ``retry`` (which repeats it while Redis is unreachable): each is safe to repeat.
        When renaming fails, the error is raised and the shard stays prepared: a worker of this host finishes it once
        this process is gone (``recover``). Every Redis step is fenced: IdentityLost is raised, nothing done, once
        another incarnation owns the identity."""
        field_name = shard_field(self.host_id, shard.id)
        paths = shard.paths()
        try:
            record = shard_record(shard, leases.owner, leases.worker)
        except OSError as error:
            shard.error = shard.error or error
            record = ""
        try:
            if shard.error is None and retry(lambda: leases.prepare_shard(shard.id, shard.samples, field_name, record)):
                if self.uploader is not None:
                    self.uploader.submit(shard)
                    return 0
                try:
                    move_into_place(paths)
                except OSError:
                    self.left_prepared += 1
                    raise
                counted = retry(lambda: leases.commit_shard(field_name, self.host_id, shard.bytes))
                log.info("shard_finished shard=%s samples=%d bytes=%d", paths["tar"], shard.samples, shard.bytes)
                self._forget()
                return counted
            returned = retry(lambda: leases.release_kept(shard.id))
            for path in (paths["temp_tar"], paths["temp_index"]):
                _remove(path)
            self._forget()
        except BaseException:
            self._forget()
            raise
        log.warning("shard_discarded shard=%s samples=%d returned=%d error=%s", shard.id, shard.samples, returned,
                    shard.error or "a task was no longer held, or the name was taken")  # fmt: skip
        return -1

    def uploads_waiting(self) -> int:
        """Shards handed to the uploader and not counted yet (0 without object storage)."""
        return self.uploader.waiting if self.uploader is not None else 0

    def commit_uploaded(self, leases: Leases, retry: Retry) -> tuple[Shard, int] | None:
        """Count one shard whose upload ended and delete its local copy: (shard, samples counted), or None when no
        upload ended. A shard not uploaded (the worker stops) stays prepared for the host's next worker (0)."""
        assert self.uploader is not None
        shard = self.uploader.take()
        if shard is None:
            return None
        assert isinstance(shard, Shard)
        try:
            if not shard.uploaded:
                self.left_prepared += 1
                return shard, 0
            paths = shard.paths()
            counted = retry(lambda: leases.commit_shard(shard_field(self.host_id, shard.id), self.host_id, shard.bytes))
            remove_local(paths)
            log.info("shard_finished shard=%s samples=%d bytes=%d", paths["tar"], shard.samples, shard.bytes)
            return shard, counted
        finally:
            self._forget()

    def _forget(self) -> None:
        with self._count_lock:
            self.unfinished -= 1

    @contextlib.contextmanager
    def _try_lock(self) -> Iterator[bool]:
        """The shards' lock, if it comes within LOCK_WAIT: the main thread must not wait on a write that hangs."""
        locked = self._lock.acquire(timeout=LOCK_WAIT)
        try:
            yield locked
        finally:
            if locked:
                self._lock.release()

    def _append(self, shard: Shard, block: bytes) -> None:
        """Append a sample's members to the shard's tar. A write that fails is cut back off; a shard that cannot be
        cut back is sealed with the error (discarded once sealed)."""
        with self.health.watch(shard.file.name):
            try:
                write_all(shard.file, block)
            except OSError:
                self._cut_back(shard)
                raise
        shard.end += len(block)

    def _cut_back(self, shard: Shard) -> None:
        try:
            shard.file.truncate(shard.end)
            shard.file.seek(shard.end)
        except OSError as error:
            shard.error = error
            self._seal(shard)

    def _new_shard(self, subset: str) -> Shard:
        final_dir = f"{self.store_dir}/{subset}"
        temp_dir = os.path.join(self.temp_dir, subset)  # shards of two subsets may have the same name
        with self.health.watch(temp_dir):
            seq = self._next_seq.get(subset)
            if seq is None and is_remote(final_dir):
                seq = 0  # the incarnation in its name keeps it apart from every other process's shards
            elif seq is None:
                os.makedirs(final_dir, exist_ok=True)
                seq = next_sequence(final_dir, self.prefix)
            self._next_seq[subset] = seq + 1
            shard = Shard(subset, f"{self.prefix}{seq:06d}{self.suffix}", temp_dir, final_dir)
            os.makedirs(temp_dir, exist_ok=True)
            shard.file = open(shard.paths()["temp_tar"], "wb", buffering=0)  # noqa: SIM115 - closed by the sealer
        self._open[subset] = shard
        with self._count_lock:
            self.unfinished += 1
        return shard

    def _seal(self, shard: Shard) -> None:
        """Hand a shard to the sealer (caller holds the lock). A shard without a sample (its first write failed) is
        dropped instead: nothing of it is in Redis."""
        del self._open[shard.subset]
        if shard.samples:
            self._sealing.put(shard)
            return
        with contextlib.suppress(OSError):  # else the file goes with the temporary folder
            shard.file.close()
            os.unlink(shard.paths()["temp_tar"])
        self._forget()
        log.info("shard_empty_dropped shard=%s", shard.id)

    def _seal_loop(self) -> None:
        """Seal each shard handed over; one that cannot be sealed, whatever the reason, is marked failed (``finish``
        then discards it): the sealer itself never stops before ``close``."""
        while (shard := self._sealing.get()) is not None:
            try:
                with self.health.watch(shard.paths()["temp_tar"]):
                    seal(shard)
            except Exception as error:  # one shard's failure is that shard's outcome
                shard.error = error
                log.error("shard_seal_failed shard=%s error=%s: %s", shard.id, type(error).__name__, one_line(error))
            self.ready.put(shard)


def seal(shard: Shard) -> None:
    """End the shard's tar and write its index, both fsynced, under their temporary names."""
    with shard.file as file:
        write_all(file, TAR_END)
        os.fsync(file.fileno())
    paths = shard.paths()
    with open(paths["temp_index"], "wb") as file:
        pq.write_table(index_table(shard.rows), file)
        file.flush()
        os.fsync(file.fileno())
    pa.default_memory_pool().release_unused()  # else the pool keeps ~50 MB a worker after each index is written


def index_row(task: Task, metadata: dict[str, Any], members: list[str]) -> dict[str, Any]:
    """The index row of one sample, its values taken from the sample's metadata."""
    row = {name: metadata[name] for name in ("key", "id", "url", "caption", *(task.meta or {}))}
    row.update(part=task.part, row=task.row, members=members)
    row.update({name: metadata[name] for name in ("bytes", "sha256", "width", "height")})
    return row


def index_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The rows as a table that parquet can store and read back: a column Arrow cannot take as it is (values that mix
    types, an integer past 64 bits, an empty object, nesting too deep) is stored as JSON text."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    return pa.table({name: index_column([row.get(name) for row in rows]) for name in names})


def index_column(values: list[Any]) -> pa.Array:
    """The values as an Arrow column of the type they share, or as JSON text (None stays null)."""
    try:
        column = pa.array(values)
    except Exception:  # whatever Arrow refuses of a sample's values is kept as text
        column = None
    if column is not None and storable(column.type):
        return column
    return pa.array([None if value is None else json_text(value) for value in values], pa.string())


def storable(kind: pa.DataType, depth: int = 0) -> bool:
    """Whether parquet writes and reads back a column of this type: no struct without fields anywhere in it, nesting
    no deeper than ``MAX_INDEX_NESTING``."""
    if depth > MAX_INDEX_NESTING:
        return False
    if pa.types.is_struct(kind):
        return kind.num_fields > 0 and all(storable(kind.field(i).type, depth + 1) for i in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return storable(kind.value_type, depth + 1)
    return True


def json_text(value: Any) -> str:
    """A value as JSON text (valid Unicode: a lone surrogate is written as its ``\\u`` escape)."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):
        text = repr(value)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def next_sequence(folder: str, prefix: str) -> int:
    """One more than the highest sequence number of the shards named ``<prefix><seq>[-<incarnation>].tar`` or
    ``.parquet`` there."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)(?:-[0-9a-f]+)?\.(?:tar|parquet)$")
    highest = -1
    with os.scandir(folder) as entries:
        for entry in entries:
            match = pattern.match(entry.name)
            if match:
                highest = max(highest, int(match[1]))
    return highest + 1


def shard_record(shard: Shard, owner: Owner, worker: str) -> str:
    """What Redis keeps of a shard being finished: enough for a worker of its host to finish it after a crash. Its
    ``owner`` (the incarnation's token) and ``worker`` (the identity) tell whether the process that prepared it still
    holds its identity."""
    fields = {"owner": owner.token(), "worker": worker, "samples": shard.samples, "bytes": shard.bytes}
    paths = shard.paths()
    if is_remote(paths["tar"]):  # what recovery checks the objects against when the local copy is gone
        fields.update(tar_size=os.path.getsize(paths["temp_tar"]), index_size=os.path.getsize(paths["temp_index"]))
    return json.dumps({**fields, **paths})


def shard_field(host_id: str, shard_id: str) -> str:
    """The shard's field in the Redis hash of shards being finished."""
    return f"{host_id}|{shard_id}"


def move_into_place(paths: dict[str, str]) -> None:
    """Rename the index, then the tar, to their final names (a tar under its final name always has its index), and
    make the renames durable. A step already done, by this process or by another one racing it, is skipped, so a
    recovery can run it again; nothing is renamed when a final name is taken by another file (a shard is never
    rewritten): FileExistsError. FileNotFoundError when a file is gone under both names."""
    moves = ((paths["temp_index"], paths["index"]), (paths["temp_tar"], paths["tar"]))
    for temp, final in moves:
        if os.path.exists(final) and os.path.exists(temp):  # final first: a racing rename cannot fake "both"
            raise FileExistsError(f"{final} exists: a shard is never rewritten")
    for temp, final in moves:
        _move(temp, final)
    folder = os.open(os.path.dirname(paths["tar"]), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _move(temp: str, final: str) -> None:
    """Rename ``temp`` to ``final`` unless that is done already (by anyone)."""
    if os.path.exists(final):
        return
    try:
        os.rename(temp, final)
    except FileNotFoundError:
        if not os.path.exists(final):  # not renamed by a racing process either
            raise FileNotFoundError(f"{final}: neither it nor its temporary file exists") from None


def recover(leases: Leases, host_id: str, wait: float = 0.0, bucket: Bucket | None = None) -> int:
    """Finish the shards that dead workers of this host left prepared: renamed (or uploaded to ``bucket``) and
    counted when their files are there, else their tasks go back to the queue. One worker of a host does it at a
    time, under a lock it renews before each shard and that fences each step in Redis; ``wait`` seconds for that
    lock. With a bucket, the recovering worker's own heartbeat is kept alive before each shard too (uploads take
    seconds each). Return how many shards were recovered."""
    if not _orphans(leases, host_id):
        return 0
    lock = Lock(leases.client, leases.keys.shard_lock(host_id), RECOVERY_LOCK_SECONDS)
    if not lock.acquire(wait):
        return 0
    recovered = 0
    try:
        for field_name, record in _orphans(leases, host_id):
            if not lock.renew():
                log.warning("shard_recovery_lock_lost host=%s: another worker of the host goes on", host_id)
                break
            if bucket is not None:
                leases.heartbeat()
            recovered += _recover_one(leases, host_id, field_name, record, lock, bucket)
    finally:
        lock.release()
    return recovered


def count_own_prepared(leases: Leases, host_id: str, retry: Retry) -> int:
    """Count the shards this process prepared whose files are under their final names but that Redis still holds as
    being finished (a failover lost their commit: ``finish`` never leaves one so while it runs). A shard whose files
    cannot be moved into place is left to ``recover`` once this process is gone. Return how many were counted."""
    token, counted = leases.owner.token(), 0
    for field_name, text in retry(lambda: leases.client.hgetall(leases.keys.shards)).items():
        record = json.loads(text)
        if not field_name.startswith(f"{host_id}|") or record.get("owner") != token:
            continue
        try:
            state = settle_files(record)
        except OSError:
            continue
        if state == FINISHED:
            size = int(record["bytes"])
            count = retry(lambda field_name=field_name, size=size: leases.commit_shard(field_name, host_id, size))
            log.warning("shard_commit_redone shard=%s counted=%d", record["tar"], count)
            counted += max(count, 0)
    return counted


def _orphans(leases: Leases, host_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The shards of this host being finished whose owner incarnation no longer holds its identity (its heartbeat
    expired, or another process of that name took it over): (field, record)."""
    records = [
        (field_name, json.loads(text))
        for field_name, text in leases.client.hgetall(leases.keys.shards).items()
        if field_name.startswith(f"{host_id}|")
    ]
    if not records:
        return []
    for field_name, record in records:
        record.setdefault("worker", _worker_of(host_id, field_name))
    holders = leases.client.mget([leases.keys.heartbeat(record["worker"]) for _, record in records])
    return [(field_name, record) for (field_name, record), holder in zip(records, holders, strict=True)
            if holder != record["owner"]]  # fmt: skip


def _worker_of(host_id: str, field_name: str) -> str:
    """The identity that wrote a shard, read from its name: for records written before they named it."""
    name = field_name.rpartition("/")[2].removeprefix(f"{file_safe(host_id)}-")
    return f"{host_id}:{name.rpartition('-')[0]}"


def _recover_one(
    leases: Leases, host_id: str, field_name: str, record: dict[str, Any], lock: Lock, bucket: Bucket | None
) -> int:
    """Finish one orphaned shard; 1 when this call settled it (counted, or its tasks queued again), else 0. Safe
    when another recoverer races it: renames only go forward, the decision is the Redis record's (counted or
    released once, fenced by the lock), and files are removed only after this call released the shard."""
    owner, worker = record["owner"], record["worker"]
    if is_remote(record["tar"]):
        return _recover_remote(leases, host_id, field_name, record, lock, bucket)
    try:
        state = settle_files(record)
    except OSError as error:
        log.warning("shard_recovery_failed field=%s error=%s: tried again later", field_name, error)
        return 0
    if state == FINISHED:
        counted = leases.commit_recovered(field_name, host_id, int(record["bytes"]), lock, owner, worker)
        if counted < 0:
            return _skipped(record, counted)
        log.info("shard_recovered shard=%s counted=%d", record["tar"], counted)
        return 1
    returned = leases.release_recovered(field_name, host_id, lock, owner, worker)
    if returned < 0:  # its files are not ours to remove
        return _skipped(record, returned)
    drop_leftovers(record, state)
    log.warning("shard_lost shard=%s returned=%d state=%s: its files are gone or its name is taken, its tasks are "
                "queued again", record["tar"], returned, state)  # fmt: skip
    return 1


def _recover_remote(
    leases: Leases, host_id: str, field_name: str, record: dict[str, Any], lock: Lock, bucket: Bucket | None
) -> int:
    """Finish one orphaned shard of object storage: its unfinished uploads aborted, its local files uploaded, then
    counted; when neither its local files nor both whole objects are there, its objects are removed and its tasks
    queued again."""
    owner, worker = record["owner"], record["worker"]
    if bucket is None:
        log.warning("shard_recovery_skipped shard=%s reason=no_bucket: store_dir is no longer s3://", record["tar"])
        return 0
    try:
        whole = recover_files(bucket, record)
    except STORE_ERRORS as error:
        log.warning("shard_recovery_failed field=%s error=%s: tried again later", field_name, describe(error))
        return 0
    if whole:
        counted = leases.commit_recovered(field_name, host_id, int(record["bytes"]), lock, owner, worker)
        if counted < 0:
            return _skipped(record, counted)
        remove_local(record)
        log.info("shard_recovered shard=%s counted=%d", record["tar"], counted)
        return 1
    returned = leases.release_recovered(field_name, host_id, lock, owner, worker)
    if returned < 0:
        return _skipped(record, returned)
    remove_local(record)
    try:
        drop_objects(bucket, record)
    except STORE_ERRORS as error:  # never counted: a reader sees an index without its tar at most
        log.warning("shard_objects_left shard=%s error=%s", record["tar"], describe(error))
    log.warning("shard_lost shard=%s returned=%d: its local files are gone, its tasks are queued again",
                record["tar"], returned)  # fmt: skip
    return 1


def _skipped(record: dict[str, Any], reply: int) -> int:
    """A recovery step refused: the shard was counted or released by another process (-1), or this one lost the
    lock or the owner holds its identity again (FENCED)."""
    why = "fenced" if reply == FENCED else "settled_elsewhere"
    log.info("shard_recovery_skipped shard=%s reason=%s", record["tar"], why)
    return 0


def settle_files(paths: dict[str, str]) -> str:
    """Move a prepared shard's files into place as far as they go: FINISHED, LOST (a file is gone) or TAKEN."""
    try:
        move_into_place(paths)
    except FileExistsError:
        return TAKEN
    except FileNotFoundError:
        return LOST
    return FINISHED


def drop_leftovers(paths: dict[str, str], state: str) -> None:
    """Remove what is left of a released shard: its temporary files first (so that nobody can rename them any more),
    then, when its tar is lost, its index; never an index whose tar exists."""
    for path in (paths["temp_tar"], paths["temp_index"]):
        _remove(path)
    if state == LOST and not os.path.exists(paths["tar"]):
        _remove(paths["index"])


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
