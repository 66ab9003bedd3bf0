"""Per-process bounds shared by both download engines: body bytes in memory, open files (downloads per host are the
fleet's: laion5b/fleetslots.py)."""

from __future__ import annotations

import asyncio
import resource
import threading
import time
from collections import deque


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
