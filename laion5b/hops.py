"""Redirect targets count against their own host: a download redirected to another host name takes a slot of that
host (laion5b/fleetslots.py) before it follows the redirect, and holds it until the download ends (or a further hop
leads elsewhere). Its task keeps the slot of the host it started from meanwhile.

A download that would wait for the target's slot past its deadline, or whose target is paused, ends as POSTPONED:
its task is tried again later without using an attempt. The engines call ``begin`` before and ``end`` after each
download; the fetchers call ``enter`` for each redirect target.

With ``max_per_ip``, every request of a download (each hop) also holds a slot of the server address it connects to,
from just before it is sent until its response is read or dropped (``reach`` and ``part``, in a second FleetSlots
whose keys are addresses); a request never waits for it while holding another address's slot, so waits cannot
form a cycle. A wait too long postpones the task the same way.
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
    """What both engines share: the slot held for a redirect target, given back at the end; the address slots."""

    def __init__(self, slots: FleetSlots[Parked], ips: FleetSlots[Parked] | None = None) -> None:
        self.slots = slots
        self.ips = ips if ips is not None and ips.limit else None
        """Slots per server address (max_per_ip), None when off."""

    def part(self, address: str) -> None:
        """A request to ``address`` ended: its slot goes back."""
        assert self.ips is not None
        _give_back(self.ips, address)

    def stop_waiting(self) -> None:
        """The engine stops: requests waiting for an address slot give up (their tasks are postponed)."""
        if self.ips is not None:
            self.ips.take_waiting()

    def _held(self) -> Held | None:
        raise NotImplementedError

    def _leave(self, held: Held) -> None:
        if held[1]:
            _give_back(self.slots, held[1])
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


def _give_back(slots: FleetSlots[Parked], host: str) -> None:
    """Release a slot of ``host``; a parked task it passes to is started."""
    item = slots.release(host)
    if item is not None:
        slots.start([(host, item)])


def _patience(deadline: float) -> float:
    """Seconds a redirected download waits for its target's slot: half the time it has left, so that a long wait
    postpones its task rather than time it out (the wait is not the URL's fault)."""
    return max(0.0, (deadline - time.monotonic()) / 2)


def _postponed(host: str, hop: Hop, what: str = "redirect target") -> FetchFailure:
    return FetchFailure(POSTPONED, f"{what} {host} is paused or busy", hop.delay or PARK_DELAY)


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

    def __init__(self, slots: FleetSlots[Parked], ips: FleetSlots[Parked] | None = None) -> None:
        super().__init__(slots, ips)
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
        await _take_async(self.slots, host, deadline, "redirect target")
        held[1] = host

    async def reach(self, address: str, deadline: float) -> None:
        """Before a request to ``address``: hold one of its slots (the caller bounds the wait)."""
        assert self.ips is not None
        await _take_async(self.ips, address, deadline, "server address")


async def _take_async(slots: FleetSlots[Parked], host: str, deadline: float, what: str) -> None:
    """Hold a slot of ``host``, waiting on the event loop; POSTPONED when it is paused or the wait too long."""
    hop = _AsyncHop(asyncio.get_running_loop())
    if slots.acquire(host, hop):
        return
    try:
        async with asyncio.timeout(_patience(deadline)):
            await hop.done
    except TimeoutError:
        if slots.withdraw(host, hop):
            raise _postponed(host, hop, what) from None
        await hop.done  # woken meanwhile: its answer is set
    except asyncio.CancelledError:
        if not slots.withdraw(host, hop) and hop.granted:
            _give_back(slots, host)  # granted just as the wait was given up
        raise
    if not hop.granted:
        raise _postponed(host, hop, what)


class _ThreadHop(Hop):
    def __init__(self) -> None:
        self.done = threading.Event()

    def woken(self) -> None:
        self.done.set()


class ThreadHops(_Hops):
    """The threads engine's: a download is its thread's until it ends."""

    def __init__(self, slots: FleetSlots[Parked], ips: FleetSlots[Parked] | None = None) -> None:
        super().__init__(slots, ips)
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
        _take(self.slots, host, deadline, "redirect target")
        held[1] = host

    def reach(self, address: str, deadline: float) -> None:
        """Before a request to ``address``: hold one of its slots, waiting at most until ``deadline``."""
        assert self.ips is not None
        _take(self.ips, address, deadline, "server address")


def _take(slots: FleetSlots[Parked], host: str, deadline: float, what: str) -> None:
    """Hold a slot of ``host``, waiting on this thread; POSTPONED when it is paused or the wait too long."""
    hop = _ThreadHop()
    if slots.acquire(host, hop):
        return
    if not hop.done.wait(_patience(deadline)) and slots.withdraw(host, hop):
        raise _postponed(host, hop, what)
    hop.done.wait()  # woken meanwhile: its answer is set
    if not hop.granted:
        raise _postponed(host, hop, what)
