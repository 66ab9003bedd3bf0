"""The store's health as one worker's writes see it: writes that fail for the whole store (a full disk, a quota, a
read-only or broken file system) and writes that do not return (a hung mount). The worker stops claiming while the
store is not healthy, and resumes by itself once a probe write succeeds (a failing store) or the write that hung
returns (a stalled one)."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

STORE_FAILING, STORE_STALLED = "store_failing", "store_stalled"
STORE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
"""Errors of the store itself: the task is returned, not failed. Any other (ENAMETOOLONG, say) is its task's own."""
WRITTEN_STANDS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
"""Refusals to write more: what was written before stands (after EIO, it may not)."""
PROBE_FIRST = 2.0
PROBE_MAX = 30.0
"""Seconds between two probes of a failing store: the first delay, doubled after each failed probe up to this."""
PROBE_MIN_BYTES = 64 * 1024
PROBE_MAX_BYTES = 64 * 1024 * 1024
"""A probe writes as much as the largest write that failed, within these bounds: a disk with room for a few bytes
only (the tail of a cut write) is not healthy again."""
PROBE_NAME = "probe"


@dataclass(frozen=True)
class StoreProblem:
    """Why the store is not healthy: ``state`` STORE_FAILING (with the errno's name) or STORE_STALLED."""

    state: str
    errno: str
    path: str

    def __str__(self) -> str:
        return f"{self.state} errno={self.errno or '-'} path={self.path}"

    def to_json(self) -> dict[str, str]:
        return {"store": self.state, "errno": self.errno, "path": self.path}


def write_all(file: BinaryIO, data: bytes) -> None:
    """Write all of ``data`` to an unbuffered file: a short write (the disk filling up) is followed by the write
    that raises."""
    view = memoryview(data)
    while view:
        view = view[file.write(view) :]


def probe_write(folder: Path, size: int) -> None:
    """Write ``size`` bytes to a file in ``folder``, fsync it and remove it; raise OSError when any step fails."""
    path = folder / PROBE_NAME
    try:
        with open(path, "wb", buffering=0) as file:
            write_all(file, bytes(size))
            os.fsync(file.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.unlink(path)


class StoreHealth:
    """Shared by a sink's writers (``watch``, ``failed``; any thread) and the worker's main thread (``check``)."""

    def __init__(self, probe: Callable[[int], None] | None = None) -> None:
        self.probe = probe
        """Writes ``size`` bytes to the store and removes them (an object store's own); None: a file in the folder
        ``check`` is given."""
        self._writes: dict[object, tuple[float, str]] = {}
        """Writes under way: token -> (monotonic start, path)."""
        self._lock = threading.Lock()
        self._failure: tuple[int, str] | None = None
        """(errno, path) of the first failure of the current episode (the errno is the latest one's)."""
        self._failures = 0
        self._needed = 0
        self._stall: tuple[float, str] | None = None
        self._probe: threading.Thread | None = None
        self._probe_error: OSError | None = None
        self._next_probe: float | None = None
        self._delay = PROBE_FIRST
        self._resumed = -math.inf

    @property
    def blocked(self) -> bool:
        """Whether writing now is pointless: the store fails or stalls."""
        return self._failure is not None or self._stall is not None

    @contextlib.contextmanager
    def watch(self, path: str) -> Iterator[None]:
        """Mark a write (or fsync) under way, so that one that does not return is seen."""
        token = object()
        self._writes[token] = (time.monotonic(), path)
        try:
            yield
        finally:
            del self._writes[token]

    def failed(self, error: OSError, path: str, size: int = 0) -> bool:
        """Note a failed write of ``size`` bytes (at the error's file name, else ``path``); True when the store failed
        (STORE_ERRNOS), not the task."""
        if error.errno not in STORE_ERRNOS:
            return False
        with self._lock:
            where = self._failure[1] if self._failure is not None else str(error.filename or path)
            self._failure = (error.errno, where)
            self._failures += 1
            self._needed = max(self._needed, size)
        return True

    def check(self, now: float, stall_seconds: float, folder: Path) -> StoreProblem | None:
        """The store's state (main thread, often): a write older than ``stall_seconds`` is a stall; a failing store
        is probed in ``folder`` on a backoff, by a thread of its own, and healthy again once a probe succeeds."""
        writes = list(self._writes.values())
        oldest = min(writes, default=None)
        self._stall = oldest if oldest is not None and now - oldest[0] > stall_seconds else None
        if self._failure is not None:
            self._follow_probe(now, folder)
        return self.problem()

    def problem(self) -> StoreProblem | None:
        if self._stall is not None:
            return StoreProblem(STORE_STALLED, "", self._stall[1])
        failure = self._failure
        if failure is not None:
            return StoreProblem(STORE_FAILING, errno.errorcode.get(failure[0], str(failure[0])), failure[1])
        return None

    def _follow_probe(self, now: float, folder: Path) -> None:
        if self._probe is not None:
            if not self._probe.is_alive():
                self._probe_ended(now)
            return
        if self._next_probe is None:  # a new episode: back off from where the last one left when it was recent
            if now - self._resumed > 2 * PROBE_MAX:
                self._delay = PROBE_FIRST
            self._next_probe = now + self._delay
        elif now >= self._next_probe:
            self._probe_error = None
            failures, size = self._failures, min(max(PROBE_MIN_BYTES, self._needed), PROBE_MAX_BYTES)
            self._probe = threading.Thread(
                target=self._run_probe, args=(folder, size, failures), name="store-probe", daemon=True
            )
            self._probe.start()

    def _run_probe(self, folder: Path, size: int, failures: int) -> None:
        try:
            with self.watch(str(folder / PROBE_NAME)):
                if self.probe is not None:
                    self.probe(size)
                else:
                    probe_write(folder, size)
        except OSError as error:
            self._probe_error = error
            return
        with self._lock:
            if self._failures == failures:  # no write failed meanwhile
                self._failure = None
                self._needed = 0

    def _probe_ended(self, now: float) -> None:
        self._probe = None
        error = self._probe_error
        if self._failure is None:
            log.info("store_probe_succeeded")
            self._resumed = now
            self._next_probe = None
            return
        if error is not None:
            log.info("store_probe_failed error=%s next_in=%.0f", error, self._delay)
            if error.errno in STORE_ERRNOS:
                with self._lock:
                    self._failure = (error.errno, self._failure[1])
        self._next_probe = now + self._delay
        self._delay = min(2 * self._delay, PROBE_MAX)
