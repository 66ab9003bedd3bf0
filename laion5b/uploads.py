"""Webdataset output to object storage: a worker's sealed and prepared shards are uploaded by a thread of their own
(index first, tar second), tried again on a backoff while the store refuses or does not answer (shown as
``upload_failing``), and handed back to the worker's main thread, which counts them in Redis and deletes the local
copy. The protocol and its crash windows are in docs/output.md ("Object storage")."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from typing import Any, Protocol

import boto3.exceptions
import botocore.exceptions

from laion5b.objectstore import Bucket, error_code
from laion5b.storehealth import StoreProblem
from laion5b.tasks import one_line

log = logging.getLogger(__name__)

UPLOAD_FAILING = "upload_failing"
RETRY_FIRST = 2.0
RETRY_MAX = 30.0
"""Seconds between two tries of a shard's upload: the first delay, doubled after each failure up to this."""
STORE_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, boto3.exceptions.Boto3Error,
                OSError)  # fmt: skip
"""What a store that refuses, throttles or does not answer raises (a local read error of the staging disk too)."""


class Uploadable(Protocol):
    id: str
    uploaded: bool

    def paths(self) -> dict[str, str]: ...


def upload_files(bucket: Bucket, paths: dict[str, str], clean: bool) -> None:
    """Upload a sealed shard's index, then its tar (a tar in the bucket always has its index); with ``clean``, abort
    the unfinished multipart uploads that earlier tries of either left."""
    bucket.upload(paths["temp_index"], paths["index"])
    bucket.upload(paths["temp_tar"], paths["tar"])
    if clean:
        abort_unfinished(bucket, paths)


def abort_unfinished(bucket: Bucket, paths: dict[str, str]) -> None:
    """Abort the unfinished multipart uploads of a shard's objects; a store that refuses (no permission to list
    them, say) is logged, not raised: the shard is whole all the same, and a lifecycle rule is the backstop."""
    for url in (paths["index"], paths["tar"]):
        try:
            bucket.abort_unfinished(url)
        except STORE_ERRORS as error:
            log.warning("multipart_abort_failed key=%s error=%s", url, describe(error))


def in_bucket(bucket: Bucket, record: dict[str, Any]) -> bool:
    """Whether both objects of a prepared shard are in the bucket, whole (sizes as sealed)."""
    return all(bucket.size(record[name]) == int(record[f"{name}_size"]) for name in ("index", "tar"))


def drop_objects(bucket: Bucket, record: dict[str, Any]) -> None:
    """Remove what a released shard left in the bucket: its unfinished uploads, its tar, then its index."""
    abort_unfinished(bucket, record)
    for name in ("tar", "index"):
        bucket.delete(record[name])


class Uploader:
    """The upload thread of one worker process. ``submit`` (main thread) hands it a prepared shard; the shard comes
    back on ``done`` with ``uploaded`` set, or unset when the worker stopped first (it stays prepared: a worker of this
    host uploads and counts it once this process is gone)."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self.todo: queue.SimpleQueue[Uploadable | None] = queue.SimpleQueue()
        self.done: queue.SimpleQueue[Uploadable] = queue.SimpleQueue()
        self.waiting = 0
        """Shards submitted and not yet taken back from ``done`` (main thread only)."""
        self.problem: StoreProblem | None = None
        """Why uploads fail now (the latest error), or None."""
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shard-uploader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, shard: Uploadable) -> None:
        self.waiting += 1
        self.todo.put(shard)

    def take(self) -> Uploadable | None:
        """A shard whose upload ended, or None."""
        try:
            shard = self.done.get_nowait()
        except queue.Empty:
            return None
        self.waiting -= 1
        return shard

    def stop(self, seconds: float) -> None:
        """Stop trying (an upload under way ends or fails on its own), waiting up to ``seconds`` for the thread."""
        self.stopping.set()
        self.todo.put(None)
        if self._thread.is_alive():
            self._thread.join(seconds)

    def _loop(self) -> None:
        while (shard := self.todo.get()) is not None:
            shard.uploaded = not self.stopping.is_set() and self._upload(shard)
            self.done.put(shard)

    def _upload(self, shard: Uploadable) -> bool:
        """Upload until it succeeds (True) or the worker stops (False)."""
        paths, delay, tries = shard.paths(), RETRY_FIRST, 0
        while not self.stopping.is_set():
            tries += 1
            try:
                upload_files(self.bucket, paths, clean=tries > 1)
            except Exception as error:  # whatever it is, the shard is tried again: this thread must not end
                self.problem = StoreProblem(UPLOAD_FAILING, error_code(error), paths["tar"])
                log.warning("upload_failed shard=%s try=%d error=%s: %s next_in=%.0f", shard.id, tries,
                            error_code(error), one_line(error), delay)  # fmt: skip
                self.stopping.wait(delay)
                delay = min(2 * delay, RETRY_MAX)
                continue
            if self.problem is not None:
                log.info("upload_resumed shard=%s tries=%d", shard.id, tries)
            self.problem = None
            return True
        return False


def remove_local(paths: dict[str, str]) -> None:
    """Delete an uploaded (or released) shard's local files."""
    for name in ("temp_tar", "temp_index"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths[name])


def recover_files(bucket: Bucket, record: dict[str, Any]) -> bool:
    """Bring a dead worker's prepared shard into the bucket: its unfinished multipart uploads aborted, then its local
    files uploaded when they are there; True when both objects are in the bucket then, whole. Raise the store's
    error when it fails (the recovery is tried again later)."""
    abort_unfinished(bucket, record)
    if all(os.path.exists(record[name]) for name in ("temp_index", "temp_tar")):
        upload_files(bucket, record, clean=False)
        return True
    return in_bucket(bucket, record)


def describe(error: BaseException) -> str:
    return f"{error_code(error)}: {one_line(error)}"
