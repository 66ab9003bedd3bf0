"""Download slots per web host, shared by the whole fleet: the engines' side (laion5b/hostledger.py is Redis's).

An engine asks for a slot of a task's host (``acquire``): it gets one at once when this worker holds a free slot of
that host, else the task is parked. The worker's main thread syncs every SYNC_EVERY s at most (sooner once SYNC_BATCH
hosts newly wait or a host throttled), and only when something changed: ``reports`` takes, for every host whose
state changed, the slots held and wanted and what the host answered, the ledger answers them in one Lua call, and
``apply`` hands the slots granted to parked tasks (``start``, the engine's: call_soon_threadsafe on the async loop, a
ready queue for the threads). A slot freed while tasks of its host wait passes to the next of them here, with no
Redis call; it goes back to the fleet when none waits, or when the ledger asked the worker to keep fewer (another
worker wants the host, or its limit was cut). The engines never wait for Redis.

A paused host's tasks (a Retry-After) are postponed, without using an attempt, until the pause ends (plus a little
jitter); so are tasks parked longer than PARK_SECONDS while parked tasks crowd the worker's buffer. A download
redirected to another host waits here too (a ``Hop``, laion5b/hops.py).
``limit`` 0 switches it all off: ``acquire`` always grants, nothing is sent to Redis.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from laion5b.hostledger import HostGrant, HostReport

Item = TypeVar("Item")

SYNC_EVERY = 0.25
"""Seconds between two syncs (unless SYNC_BATCH hosts newly wait, or a host throttled): a sync costs about six Redis
commands whatever it carries, so at a few hundred tasks per second it costs a few hundredths of a command per task."""
SYNC_BATCH = 64
"""Hosts newly waiting for a slot that make a sync due at once."""
REASK_SECONDS = 0.2
"""A host whose tasks still wait is asked for again after this long."""
PARK_SECONDS = 5.0
"""A task parked this long behind its host is postponed (PARK_DELAY s later, plus jitter) when the parked tasks are
as many as the engine's downloads in flight (``crowd``): they would keep the worker's buffer from other hosts' tasks."""
PARK_DELAY = 2.0
THROTTLE_STATUSES = frozenset({429, 503})
TIMEOUT_STATUS = "timeout"
UNJUDGED = frozenset({"gave_way", "postponed", "dns", "blocked_address", "bad_url", "ssl", "connection"})
"""Statuses that say nothing about the host's load (local pressure, a refusal before sending, a network problem)."""


class Hop:
    """A download redirected to another host, waiting (parked like a task) for a slot of that host; woken once with
    whether it got one (else how long its task should wait). laion5b/hops.py makes them."""

    granted: bool | None = None
    delay: float = 0.0

    def wake(self, granted: bool, delay: float) -> None:
        self.granted, self.delay = granted, delay
        self.woken()

    def woken(self) -> None:
        """Tell the waiting download (its engine's way)."""
        raise NotImplementedError


def jitter(seconds: float) -> float:
    """``seconds`` plus up to a tenth more (at least up to half a second), so postponed tasks do not return at once."""
    return seconds + random.uniform(0, max(0.5, seconds / 10))


@dataclass
class _Host(Generic[Item]):
    granted: int = 0  # fleet slots this worker holds
    known: int = 0  # ... as the ledger counted them at the last reply
    busy: int = 0  # of which in use by a download
    waiting: deque[tuple[float, Item | Hop]] = field(default_factory=deque)  # (parked at, item)
    keep: int = -1  # slots it may keep (-1: all)
    paused_until: float = 0.0
    asked_at: float = -1.0  # when its want was last sent (-1: nothing asked)
    dirty: bool = False
    good: int = 0
    throttles: int = 0
    timeouts: int = 0
    retry_after: float = 0.0

    def idle(self, now: float) -> bool:
        return not (self.granted or self.waiting or self.dirty or self.paused_until > now)


class FleetSlots(Generic[Item]):
    """At most the fleet's share of ``limit`` downloads per host (0: no limit). Thread-safe."""

    def __init__(
        self,
        limit: int,
        postpone: Callable[[Item, float, str], None],
        crowd: int = 1,
        max_pause: float = 3600.0,
    ) -> None:
        self.limit = limit
        self.postpone = postpone
        self.crowd = crowd
        self.max_pause = max_pause
        """The longest Retry-After that pauses a host for the fleet (max_retry_after)."""
        self.start: Callable[[list[tuple[str, Item]]], None] = lambda granted: None
        """Where granted parked items go (set by the engine): each now holds a slot of its host."""
        self._hosts: dict[str, _Host[Item]] = {}
        self._lock = threading.Lock()
        self._urgent = 0  # hosts newly waiting, throttle reports: a sync is due soon
        self._news = False  # something to report, or tasks parked (to ask for again)
        self._last_sync = 0.0

    # --- engine side ---

    def acquire(self, host: str, item: Item | Hop) -> bool:
        """Take a slot of ``host`` for ``item`` (True), or park it until one is granted, or postpone it when the host
        is paused (False: the item is taken care of)."""
        if not self.limit:
            return True
        now = time.monotonic()
        with self._lock:
            state = self._hosts.get(host)
            if state is None:
                state = self._hosts[host] = _Host()
            if state.paused_until > now:
                delay = state.paused_until - now
            else:
                if state.granted > state.busy:
                    state.busy += 1
                    return True
                if not state.waiting:
                    self._urgent += 1
                state.waiting.append((now, item))
                state.dirty = self._news = True
                return False
        self._postpone([(item, jitter(delay), f"host {host} paused")])
        return False

    def report(self, host: str, status: int | str | None, retry_after: float | None) -> None:
        """Record what ``host`` answered a download that held a slot (its load signal)."""
        if not self.limit or status in UNJUDGED:
            return
        with self._lock:
            state = self._hosts.get(host)
            if state is None:
                return
            if status in THROTTLE_STATUSES:
                state.throttles += 1
                state.retry_after = max(state.retry_after, min(retry_after or 0.0, self.max_pause))
                state.keep = state.granted // 2  # halve at once here; the fleet's answer comes with the next sync
                self._urgent += SYNC_BATCH
            elif status == TIMEOUT_STATUS:
                state.timeouts += 1
            elif state.waiting:  # a good answer while tasks wait: the host may take more
                state.good += 1
            else:
                return
            state.dirty = self._news = True

    def release(self, host: str) -> Item | None:
        """Give the slot of ``host`` back; return the next item parked for it, which now holds the slot (a redirected
        download waiting for it is woken instead)."""
        if not self.limit:
            return None
        now = time.monotonic()
        with self._lock:
            state = self._hosts[host]
            state.busy -= 1
            if not (state.waiting and state.paused_until <= now and (state.keep < 0 or state.granted <= state.keep)):
                state.granted -= 1
                state.dirty = self._news = True
                return None
            state.busy += 1
            item = state.waiting.popleft()[1]
        if isinstance(item, Hop):
            item.wake(True, 0.0)
            return None
        return item

    def withdraw(self, host: str, hop: Hop) -> bool:
        """Take a redirected download that gave up waiting off ``host``'s queue; False when it was woken first."""
        with self._lock:
            state = self._hosts.get(host)
            for entry in state.waiting if state is not None else ():
                if entry[1] is hop:
                    state.waiting.remove(entry)
                    return True
            return False

    def take_waiting(self) -> list[Item]:
        """Remove and return every parked item (when the worker stops or pauses: they were never started); redirected
        downloads waiting are woken without a slot."""
        with self._lock:
            items = []
            for state in self._hosts.values():
                items.extend(item for _, item in state.waiting)
                state.waiting.clear()
                if state.granted > state.busy:
                    state.granted = state.busy
                    state.dirty = self._news = True
        for hop in [item for item in items if isinstance(item, Hop)]:
            hop.wake(False, PARK_DELAY)
        return [item for item in items if not isinstance(item, Hop)]

    def give_back(self, host: str) -> None:
        """A granted item that will not run (the engine stopped before starting it) gives its slot back."""
        with self._lock:
            state = self._hosts[host]
            state.busy -= 1
            state.granted -= 1
            state.dirty = self._news = True

    def waiting(self) -> int:
        with self._lock:
            return sum(len(state.waiting) for state in self._hosts.values())

    # --- main thread side ---

    def due(self, now: float) -> bool:
        """Whether a sync is worth its round trip now."""
        if not self.limit:
            return False
        since = now - self._last_sync
        return (self._urgent >= SYNC_BATCH and since >= 0.01) or (since >= SYNC_EVERY and self._news)

    def reports(self, now: float) -> list[HostReport]:
        """Take what changed since the last sync, one report per host (counters are reset)."""
        self._last_sync = now
        reports = []
        with self._lock:
            self._urgent = 0
            self._news = False
            for host, state in self._hosts.items():
                self._news = self._news or bool(state.waiting)
                wants = len(state.waiting) - (state.granted - state.busy)
                reask = wants > 0 and now - state.asked_at >= REASK_SECONDS
                if not (state.dirty or reask):
                    continue
                want = max(0, wants) if state.paused_until <= now else 0
                report = HostReport(host, state.granted, want, known=state.known)
                report.good, report.throttles, report.timeouts = state.good, state.throttles, state.timeouts
                report.retry_after = state.retry_after
                reports.append(report)
                state.asked_at = now if want else -1.0
                state.dirty = False
                state.good = state.throttles = state.timeouts = 0
                state.retry_after = 0.0
        return reports

    def apply(self, reports: list[HostReport], grants: list[HostGrant], now: float) -> None:
        """Hand granted slots to parked items; postpone those of paused hosts and those parked too long."""
        started: list[tuple[str, Item]] = []
        postponed: list[tuple[Item, float, str]] = []
        with self._lock:
            for report, grant in zip(reports, grants, strict=True):
                state = self._hosts.get(report.host)
                if state is None:
                    continue
                state.granted += grant.granted
                state.known = report.held + grant.granted
                state.keep = grant.keep
                if grant.pause > 0:
                    state.paused_until = now + grant.pause
                    reason = f"host {report.host} paused"
                    postponed += [(item, jitter(grant.pause), reason) for _, item in state.waiting]
                    state.waiting.clear()
                while state.waiting and state.granted > state.busy:
                    state.busy += 1
                    started.append((report.host, state.waiting.popleft()[1]))
                if state.granted > state.busy and not state.waiting:
                    state.granted = state.busy  # granted for items gone meanwhile: given back next sync
                    state.dirty = self._news = True
            crowded = sum(len(state.waiting) for state in self._hosts.values()) >= self.crowd
            for host, state in list(self._hosts.items()):
                while crowded and state.waiting and now - state.waiting[0][0] >= PARK_SECONDS:
                    postponed.append((state.waiting.popleft()[1], jitter(PARK_DELAY), f"host {host} busy"))
                if state.idle(now):
                    del self._hosts[host]
        for _, hop in [entry for entry in started if isinstance(entry[1], Hop)]:
            hop.wake(True, 0.0)
        tasks = [entry for entry in started if not isinstance(entry[1], Hop)]
        if tasks:
            self.start(tasks)
        self._postpone(postponed)

    def _postpone(self, postponed: list[tuple[Item, float, str]]) -> None:
        for item, delay, reason in postponed:
            if isinstance(item, Hop):
                item.wake(False, delay)
            else:
                self.postpone(item, delay, reason)
