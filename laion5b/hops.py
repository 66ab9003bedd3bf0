"""Redirect targets count against their own host: a download redirected to another host name takes a slot of that
host (laion5b/fleetslots.py) before it follows the redirect, and holds it until the download ends (or a further hop
leads elsewhere). Its task keeps the slot of the host it started from meanwhile.

A download that would wait for the target's slot past its deadline, or whose target is paused, ends as POSTPONED:
its task is tried again later without using an attempt. The engines call ``begin`` before and ``end`` after each
download; the fetchers call ``enter`` for each redirect target.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

from laion5b.fetchpolicy import POSTPONED, Fetched, FetchFailure
from laion5b.fleetslots import PARK_DELAY, FleetSlots, Hop
from laion5b.pipeline import Parked, host_key

Held = list[str]
"""[host the download started from, host of the redirect target whose slot it holds ('' for none)]."""


class _Hops:
    """What both engines share: the slot held for a redirect target, given back at the end."""

    def __init__(self, slots: FleetSlots[Parked]) -> None:
        self.slots = slots

    def _held(self) -> Held | None:
        raise NotImplementedError

    def _leave(self, held: Held) -> None:
        if held[1]:
            item = self.slots.release(held[1])
            if item is not None:
                self.slots.start([(held[1], item)])
            held[1] = ""

    def _needs(self, url: str) -> tuple[Held, str] | None:
        """The download's state and the target's host when the hop to ``url`` needs a slot of another host."""
        held = self._held()
        if held is None or not self.slots.limit:
            return None
        host = host_key(url)
        if host in held:
            return None
        self._leave(held)
        return held, host

    def end(self, fetched: Fetched | None) -> None:
        """The download ended: what the target answered is its host's signal; its slot goes back."""
        held = self._held()
        if held is not None and held[1]:
            if fetched is not None:
                self.slots.report(held[1], fetched.status, fetched.retry_after)
            self._leave(held)


def _patience(deadline: float) -> float:
    """Seconds a redirected download waits for its target's slot: half the time it has left, so that a long wait
    postpones its task rather than time it out (the wait is not the URL's fault)."""
    return max(0.0, (deadline - time.monotonic()) / 2)


def _postponed(host: str, hop: Hop) -> FetchFailure:
    return FetchFailure(POSTPONED, f"redirect target {host} is paused or busy", hop.delay or PARK_DELAY)


class _AsyncHop(Hop):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.done = loop.create_future()

    def woken(self) -> None:
        self.loop.call_soon_threadsafe(self._set)

    def _set(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class AsyncHops(_Hops):
    """The async engine's: each download is an asyncio task, its state a context variable."""

    def __init__(self, slots: FleetSlots[Parked]) -> None:
        super().__init__(slots)
        self._state: contextvars.ContextVar[Held | None] = contextvars.ContextVar("hops", default=None)

    def begin(self, host: str) -> None:
        self._state.set([host, ""])

    def _held(self) -> Held | None:
        return self._state.get()

    async def enter(self, url: str, deadline: float) -> None:
        """Before following a redirect to ``url``: hold a slot of its host (the caller bounds the wait)."""
        needed = self._needs(url)
        if needed is None:
            return
        held, host = needed
        hop = _AsyncHop(asyncio.get_running_loop())
        if not self.slots.acquire(host, hop):
            try:
                async with asyncio.timeout(_patience(deadline)):
                    await hop.done
            except TimeoutError:
                if self.slots.withdraw(host, hop):
                    raise _postponed(host, hop) from None
                await hop.done  # woken meanwhile: its answer is set
            except asyncio.CancelledError:
                if not self.slots.withdraw(host, hop) and hop.granted:
                    held[1] = host  # granted just as the wait was given up: given back by end()
                raise
            if not hop.granted:
                raise _postponed(host, hop)
        held[1] = host


class _ThreadHop(Hop):
    def __init__(self) -> None:
        self.done = threading.Event()

    def woken(self) -> None:
        self.done.set()


class ThreadHops(_Hops):
    """The threads engine's: a download is its thread's until it ends."""

    def __init__(self, slots: FleetSlots[Parked]) -> None:
        super().__init__(slots)
        self._local = threading.local()

    def begin(self, host: str) -> None:
        self._local.held = [host, ""]

    def _held(self) -> Held | None:
        return getattr(self._local, "held", None)

    def enter(self, url: str, deadline: float) -> None:
        """Before following a redirect to ``url``: hold a slot of its host, waiting at most until ``deadline``."""
        needed = self._needs(url)
        if needed is None:
            return
        held, host = needed
        hop = _ThreadHop()
        if not self.slots.acquire(host, hop):
            if not hop.done.wait(_patience(deadline)) and self.slots.withdraw(host, hop):
                raise _postponed(host, hop)
            hop.done.wait()  # woken meanwhile: its answer is set
            if not hop.granted:
                raise _postponed(host, hop)
        held[1] = host
