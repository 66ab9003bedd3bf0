"""What happens to one task around its download, whatever the engine: decode it, skip it when an earlier try stored
it, process (filter, resize) and store what was fetched, and turn every failure into its outcome."""

from __future__ import annotations

import logging
import os
import queue
import threading
from urllib.parse import urlsplit

from laion5b.bucketstore import BucketStore
from laion5b.fetchpolicy import GAVE_WAY, POSTPONED, Fetched
from laion5b.fleetslots import FleetSlots
from laion5b.imaging import Processed, ProcessPolicy, process
from laion5b.leases import RETURN, STORED, failed_outcome, retry_outcome
from laion5b.retry import retry_delay
from laion5b.shards import ShardSink
from laion5b.store import Store
from laion5b.tasks import (
    HASH_MISMATCH,
    INTERNAL_ERROR,
    BadTask,
    Task,
    bad_task_record,
    decode,
    entry_record,
    hash_mismatch,
    is_transient,
    one_line,
)

log = logging.getLogger(__name__)

Outcome = tuple[str, str, str | int]
"""(kind, task as queued, payload): see leases.STORED, FAILED, RETRY, RETURN, KEPT."""
Sink = Store | ShardSink | BucketStore
"""Where stored images go: files (``Store``, or ``BucketStore`` in a bucket) or webdataset shards (``ShardSink``), as
``output_format`` says."""
Parked = tuple[str, Task]
"""(task as queued, task): a task waiting for a slot of its host."""

GAVE_WAY_DELAY = 1.0
"""Seconds before a download that gave way to local pressure is tried again (its attempts unchanged)."""
AS_DOWNLOADED = ProcessPolicy()
"""Bytes kept as downloaded, no filter: ``process`` then only reads the header's size and hashes the bytes."""


def host_key(url: str) -> str:
    """The URL's host name, lower-cased, for per-host limits ('' when it has none)."""
    try:
        return (urlsplit(url.strip()).hostname or "").rstrip(".")
    except ValueError:
        return ""


def admit(
    pipeline: Pipeline, slots: FleetSlots[Parked], done: queue.SimpleQueue[Outcome], raw: str
) -> tuple[str, Parked] | None:
    """Begin a task in an engine: its outcome goes to ``done`` when there is nothing to download, it is parked when its
    host is busy (postponed when its host is paused); otherwise return (host, task to download), holding a slot of
    that host. Whatever raises, the entry ends as exactly one outcome or one turn to download."""
    try:
        begun = pipeline.begin(raw)
        if isinstance(begun, tuple):
            done.put(begun)
            return None
        host = host_key(begun.url)
        if not slots.acquire(host, (raw, begun)):
            return None
    except Exception as error:  # one entry's exception is its outcome
        done.put(pipeline.lost(raw, error))
        return None
    return host, (raw, begun)


def next_turn(
    slots: FleetSlots[Parked], host: str, done: queue.SimpleQueue[Outcome], fetched: Fetched | None
) -> Parked | None:
    """Report what ``host`` answered (``fetched``), give its slot back and return the task parked for it next, which
    now holds the slot. Should the slots fail, every parked task goes back to the queue, so that none is left
    waiting."""
    try:
        if fetched is not None:
            slots.report(host, fetched.status, fetched.retry_after)
        return slots.release(host)
    except Exception:  # parked tasks must still end
        log.exception("host_slots_failed host=%s: parked tasks are queued again", host)
        for raw, _ in slots.take_waiting():
            done.put((RETURN, raw, ""))
        return None


class Pipeline:
    """The stages of a task before and after its fetch: ``begin`` (decode, already stored?) and ``finish`` (process,
    store, or classify the failure). Thread-safe: engines call it from many threads or from their event loop.

    ``processing`` is skipped entirely when it asks for nothing (``resize_mode`` "no", no filter set, images kept in
    their own format: see ``ProcessPolicy.active``); otherwise
    at most one image per core is processed at once: more would not go faster, and each holds an image's pixels.
    """

    def __init__(
        self,
        sink: Sink,
        identity: str,
        max_attempts: int,
        retry_backoff: float,
        max_retry_after: float,
        processing: ProcessPolicy | None = None,
    ) -> None:
        self.sink = sink
        self.identity = identity
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.max_retry_after = max_retry_after
        self.processing = processing if processing is not None and processing.active else None
        self._processing_slots = threading.BoundedSemaphore(os.cpu_count() or 1)

    def begin(self, raw: str) -> Task | Outcome:
        """The task to download, or the outcome when there is nothing to download (not a task, already stored, or
        looking it up failed)."""
        try:
            task = decode(raw)
        except BadTask as error:
            log.debug("bad_task worker=%s error=%s", self.identity, error)
            return failed_outcome(raw, "bad_task", bad_task_record(raw, str(error), self.identity))
        if self.sink.health.blocked:
            return RETURN, raw, ""
        try:
            if self.sink.existing(task) is not None:
                return STORED, raw, 0
        except OSError as error:
            return self._store_error(task, raw, error)
        except Exception as error:  # one task's exception is its outcome
            return self.crashed(task, raw, error)
        return task

    def finish(self, task: Task, raw: str, fetched: Fetched) -> Outcome:
        """Process (when asked) and store a fetched image, or record why there is none."""
        if fetched.status == GAVE_WAY:
            return self.gave_way(task, raw, fetched.error_msg)
        if fetched.status == POSTPONED:
            return self.postpone(task, raw, fetched.retry_after or GAVE_WAY_DELAY, fetched.error_msg)
        if fetched.status is not None or fetched.data is None or fetched.extension is None:
            return self.failure(task, raw, fetched.status or INTERNAL_ERROR, fetched.error_msg, fetched.retry_after)
        mismatch = hash_mismatch(task, fetched.data)
        if mismatch is not None:
            return self.failure(task, raw, HASH_MISMATCH, mismatch)
        if self.processing is not None:
            with self._processing_slots:
                image = process(fetched.data, fetched.extension, self.processing)
            if image.status is not None:
                return self.failure(task, raw, image.status, image.error_msg)
        elif self.sink.sidecars.metadata:
            image = process(fetched.data, fetched.extension, AS_DOWNLOADED)  # sizes from the header, and hashes
        else:
            image = Processed(fetched.data, fetched.extension, None)
        return self._save(task, raw, image, fetched.final_url)

    def _save(self, task: Task, raw: str, image: Processed, final_url: str | None) -> Outcome:
        """Store an image, and the files asked for beside it (caption, metadata); return the task, not counting an
        attempt, while the store fails or does not answer."""
        if self.sink.health.blocked:
            return RETURN, raw, ""
        try:
            return self.sink.put(task, raw, image, final_url)
        except OSError as error:
            return self._store_error(task, raw, error, len(image.data or b""))

    def crashed(self, task: Task, raw: str, error: Exception) -> Outcome:
        """The outcome of a task whose handling raised a bug's exception (never raises itself)."""
        try:
            log.exception("task_crashed worker=%s id=%s", self.identity, task.id)
            return self.failure(task, raw, INTERNAL_ERROR, f"{type(error).__name__}: {one_line(error)}")
        except Exception as second:  # the outcome must still be made
            return self.lost(raw, second)

    def lost(self, raw: str, error: Exception) -> Outcome:
        """The outcome of a queued entry whose handling raised where its task's own record cannot be made: an error
        record keeping the entry itself. Never raises."""
        message = f"{type(error).__name__}: {one_line(error)}"
        log.error("task_crashed worker=%s error=%s", self.identity, message, exc_info=error)
        return failed_outcome(raw, INTERNAL_ERROR, entry_record(raw, INTERNAL_ERROR, message, self.identity))

    def failure(
        self, task: Task, raw: str, status: int | str, error_msg: str, retry_after: float | None = None
    ) -> Outcome:
        """Retry a transient failure later while attempts remain (after the server's Retry-After, else a backoff);
        otherwise an error record."""
        task.attempts += 1
        if is_transient(status) and task.attempts < self.max_attempts:
            delay = retry_delay(task.attempts, retry_after, self.retry_backoff, self.max_retry_after)
            return retry_outcome(raw, task.encode(), delay)
        log.debug("task_failed worker=%s id=%s status=%s", self.identity, task.id, status)
        return failed_outcome(raw, status, task.error_record(status, error_msg, self.identity))

    def gave_way(self, task: Task, raw: str, reason: str) -> Outcome:
        """Local pressure (byte budget, DNS look-up threads) is not the URL's failure: retried soon, no attempt used."""
        log.debug("task_gave_way worker=%s id=%s reason=%s", self.identity, task.id, reason)
        return retry_outcome(raw, task.encode(), GAVE_WAY_DELAY)

    def postpone(self, task: Task, raw: str, delay: float, reason: str) -> Outcome:
        """A host that asked the fleet to wait is not the URL's failure: retried after ``delay`` s, no attempt used."""
        log.debug("task_postponed worker=%s id=%s delay=%.1f reason=%s", self.identity, task.id, delay, reason)
        return retry_outcome(raw, task.encode(), delay)

    def _store_error(self, task: Task, raw: str, error: OSError, size: int = 0) -> Outcome:
        """A store failure (full, read-only, broken) returns the task and pauses the worker; any other (a name too
        long, say) is this task's own error."""
        if self.sink.health.failed(error, str(self.sink.temp_dir), size):
            log.debug("store_refused worker=%s id=%s error=%s", self.identity, task.id, error)
            return RETURN, raw, ""
        log.error("store_failed worker=%s id=%s error=%s", self.identity, task.id, error)
        return self.failure(task, raw, "store_error", str(error)[:200])
