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
    """Body bytes that a process's downloads may hold in memory at once (threads engine: blocking waits).

    A download waits for budget rather than exceed it. Downloads that already hold bytes could all end up waiting
    for each other; the last of them to start waiting gives way instead (``take`` is False: its bytes go back and
    it is retried later), so the others always progress.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.holders = 0  # downloads holding bytes
        self._waiting_holders = 0
        self._changed = threading.Condition()

    def take(self, size: int, held: int, deadline: float) -> bool:
        """Reserve ``size`` more bytes for a download that holds ``held``; False when it must give way or the
        ``deadline`` (monotonic) passed first."""
        with self._changed:
            while self.used + size > self.limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (held and self._waiting_holders + 1 >= self.holders):
                    return False
                self._waiting_holders += bool(held)
                self._changed.wait(remaining)
                self._waiting_holders -= bool(held)
            self.holders += not held
            self.used += size
            self.peak = max(self.peak, self.used)
            return True

    def give(self, size: int) -> None:
        """Give back every byte a download holds."""
        if size:
            with self._changed:
                self.used -= size
                self.holders -= 1
                self._changed.notify_all()


class AsyncByteBudget:
    """The same budget for the async engine: waits are awaited on the event loop, first come first served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.holders = 0
        self._waiters: deque[tuple[int, bool, asyncio.Future[None]]] = deque()

    async def take(self, size: int, held: int) -> bool:
        """Reserve ``size`` more bytes for a download that holds ``held``; False when it must give way (the caller
        bounds the wait with its deadline)."""
        if not self._waiters and self.used + size <= self.limit:
            self._add(size, held)
            return True
        if held and sum(holds for _, holds, _ in self._waiters) + 1 >= self.holders:
            return False
        waiter = asyncio.get_running_loop().create_future()
        entry = (size, bool(held), waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted just as the wait was given up
                self.used -= size
                self.holders -= not held
                self._grant()
            elif entry in self._waiters:
                self._waiters.remove(entry)
                self._grant()
            raise
        return True

    def give(self, size: int) -> None:
        """Give back every byte a download holds."""
        if size:
            self.used -= size
            self.holders -= 1
            self._grant()

    def _add(self, size: int, held: int) -> None:
        self.holders += not held
        self.used += size
        self.peak = max(self.peak, self.used)

    def _grant(self) -> None:
        while self._waiters:
            size, held, waiter = self._waiters[0]
            if waiter.done():  # its task was cancelled and has not run its clean-up yet
                self._waiters.popleft()
                continue
            if self.used + size > self.limit:
                return
            self._waiters.popleft()
            self._add(size, held)
            waiter.set_result(None)


class OpenFilesTooLow(RuntimeError):
    """The hard limit of open files is too low for the configured number of downloads in flight."""


def raise_open_files_limit(in_flight: int, idle: int) -> int:
    """Raise the soft RLIMIT_NOFILE as far as the hard limit allows; return it.

    Raise OpenFilesTooLow when even the hard limit cannot hold ``in_flight`` downloads (a socket each, a file being
    written, DNS look-ups), ``idle`` kept-alive connections and the worker's own files.
    """
    needed = 2 * in_flight + idle + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise OpenFilesTooLow(
            f"open-files limit {hard} is too low for {in_flight} downloads in flight and {idle} idle connections "
            f"(needs {needed}): "
            f"raise it (ulimit -n, or LimitNOFILE= in the systemd unit) or lower thread_num/concurrency"
        )
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft
