"""Per-process bounds shared by both download engines: downloads per host, body bytes in memory, open files."""

from __future__ import annotations

import asyncio
import resource
import threading
import time
from collections import deque
from typing import Generic, TypeVar

Item = TypeVar("Item")


class HostSlots(Generic[Item]):
    """At most ``limit`` downloads in progress per host name; the others wait here, in order, without blocking the
    engine: whoever releases a host's slot is handed its next waiting item. ``limit`` 0 means no limit.

    Thread-safe; the async engine calls it from its one event-loop thread.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._busy: dict[str, int] = {}
        self._waiting: dict[str, deque[Item]] = {}
        self._lock = threading.Lock()

    def acquire(self, host: str, item: Item) -> bool:
        """Take a slot of ``host`` for ``item`` (True), or park ``item`` until a slot frees (False)."""
        if not self.limit:
            return True
        with self._lock:
            busy = self._busy.get(host, 0)
            if busy < self.limit:
                self._busy[host] = busy + 1
                return True
            self._waiting.setdefault(host, deque()).append(item)
            return False

    def release(self, host: str) -> Item | None:
        """Give the slot of ``host`` back; return the next item parked for it, which now holds the slot."""
        if not self.limit:
            return None
        with self._lock:
            waiting = self._waiting.get(host)
            if waiting:
                item = waiting.popleft()
                if not waiting:
                    del self._waiting[host]
                return item
            busy = self._busy[host] - 1
            if busy:
                self._busy[host] = busy
            else:
                del self._busy[host]
            return None

    def take_waiting(self) -> list[Item]:
        """Remove and return every parked item (when the worker stops: they were never started)."""
        with self._lock:
            items = [item for waiting in self._waiting.values() for item in waiting]
            self._waiting.clear()
            return items

    def waiting(self) -> int:
        with self._lock:
            return sum(len(waiting) for waiting in self._waiting.values())


class ByteBudget:
    """Body bytes that a process's downloads may hold in memory at once; a download waits for budget rather than
    exceed it (threads engine: blocking waits)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = threading.Condition()

    def take(self, size: int, deadline: float) -> bool:
        """Reserve ``size`` bytes, waiting at most until ``deadline`` (monotonic); False when it passed first."""
        with self._changed:
            while self.used + size > self.limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            self.used += size
            return True

    def give(self, size: int) -> None:
        if size:
            with self._changed:
                self.used -= size
                self._changed.notify_all()


class AsyncByteBudget:
    """The same budget for the async engine: waits are awaited on the event loop, first come first served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, size: int) -> None:
        """Reserve ``size`` bytes, waiting for them (the caller bounds the wait with its deadline)."""
        if not self._waiters and self.used + size <= self.limit:
            self.used += size
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((size, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give(size)  # granted just as the wait was given up
            else:
                self._waiters.remove((size, waiter))
                self._grant()
            raise

    def give(self, size: int) -> None:
        if size:
            self.used -= size
            self._grant()

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            size, waiter = self._waiters.popleft()
            self.used += size
            waiter.set_result(None)


class OpenFilesTooLow(RuntimeError):
    """The hard limit of open files is too low for the configured number of downloads in flight."""


def raise_open_files_limit(in_flight: int) -> int:
    """Raise the soft RLIMIT_NOFILE as far as the hard limit allows; return it.

    Raise OpenFilesTooLow when even the hard limit cannot hold ``in_flight`` downloads (a socket each, a file being
    written, DNS look-ups) and the worker's own files.
    """
    needed = 2 * in_flight + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise OpenFilesTooLow(
            f"open-files limit {hard} is too low for {in_flight} downloads in flight (needs {needed}): "
            f"raise it (ulimit -n, or LimitNOFILE= in the systemd unit) or lower thread_num/concurrency"
        )
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft
