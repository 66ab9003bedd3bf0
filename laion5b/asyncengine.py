"""The async engine: one event loop (uvloop's or asyncio's, as engine_loop says), on a thread of its own, with
``concurrency`` downloads in flight.

The worker's main thread keeps talking to Redis while the loop downloads: only two threads share the interpreter,
so heartbeats stay on time at any concurrency. Finishing a task (hashing, processing pixels, writing to the store)
is done off the loop by a small pool of daemon threads: a store that does not answer holds those threads, never the
loop (downloads go on, the engine answers) nor the process's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue
import ssl
import threading
from collections import deque
from collections.abc import Callable

from laion5b.aiofetch import AsyncFetcher
from laion5b.dnscache import DnsCache
from laion5b.eventloop import loop_factory
from laion5b.fetchpolicy import Fetched, FetchPolicy
from laion5b.fleetslots import FleetSlots
from laion5b.hops import AsyncHops
from laion5b.limits import AsyncByteBudget
from laion5b.pipeline import Outcome, Parked, Pipeline, admit, next_turn
from laion5b.robots import AsyncRobotsGate
from laion5b.tasks import Task

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
ANSWER_TIMEOUT = 5.0
"""Seconds the worker waits for the loop to answer (take back tasks, stop): it answers in milliseconds, unless a
call on it hangs (a listing of a store that does not answer)."""


def finish_threads(pipeline: Pipeline) -> int:
    """Threads that finish tasks: one per core for pixels, a few more for fsyncs (as asyncio's default executor),
    else two: hashing and appending hold the interpreter, more threads would only contend for it with the loop."""
    cores = os.cpu_count() or 1
    if pipeline.processing is not None:
        return cores
    return min(32, cores + 4) if pipeline.sink.fsync else 2


class FinishPool:
    """Daemon threads running jobs in order. A job never raises; one that never returns holds its thread only."""

    def __init__(self, size: int) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"async-finish-{number}", daemon=True) for number in range(size)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        """Let each thread end once the jobs before are done (none is waited for)."""
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()


class AsyncEngine:
    """Downloads submitted tasks on an event loop and puts each outcome on ``done``."""

    def __init__(
        self,
        pipeline: Pipeline,
        policy: FetchPolicy,
        concurrency: int,
        done: queue.SimpleQueue[Outcome],
        slots: FleetSlots[Parked],
        max_inflight_bytes: int,
        tls: ssl.SSLContext,
        dns_cache: DnsCache | None,
        engine_loop: str = "asyncio",
        robots: AsyncRobotsGate | None = None,
        ips: FleetSlots[Parked] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.policy = policy
        self.capacity = concurrency
        self.done = done
        self.slots = slots
        slots.start = self._granted_elsewhere
        self.hops = AsyncHops(slots, ips)
        self.max_inflight_bytes = max_inflight_bytes
        self.tls = tls
        self.dns_cache = dns_cache
        self.robots = robots
        self.loop_name, new_loop = loop_factory(engine_loop)
        self._loop = new_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="async-engine", daemon=True)
        self._waiting: deque[str] = deque()
        self._ready: deque[tuple[str, Parked]] = deque()
        """Parked tasks granted a slot of their host by the main thread's sync, to start first."""
        self._running: set[asyncio.Task[None]] = set()
        self._finishing: set[asyncio.Future[None]] = set()
        """Tasks fetched and handed to the pool, not finished yet (they hold no download slot)."""
        self._stopping = False
        self._fetcher: AsyncFetcher | None = None
        self._finishers = FinishPool(finish_threads(pipeline))

    def start(self) -> None:
        self._thread.start()
        self._finishers.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(START_TIMEOUT)

    def submit(self, raws: list[str]) -> None:
        self._loop.call_soon_threadsafe(self._accept, raws)

    def drain_unstarted(self) -> list[str]:
        """Take back every submitted task not started yet (waiting for room on the loop, or parked behind its host);
        none when the loop does not answer in time (they stay held, and go back to the queue with the leases)."""
        future = asyncio.run_coroutine_threadsafe(self._take_unstarted(), self._loop)
        try:
            return future.result(ANSWER_TIMEOUT)
        except TimeoutError:
            log.error("engine_unresponsive what=drain_unstarted seconds=%.0f", ANSWER_TIMEOUT)
            return []

    def stop(self, timeout: float) -> list[str]:
        """Stop taking tasks; return those not started; wait up to ``timeout`` s for those in flight. Bounded: a
        task whose finish does not return stays held (it goes back to the queue with the leases)."""
        future = asyncio.run_coroutine_threadsafe(self._stop(timeout), self._loop)
        try:
            unstarted = future.result(timeout + ANSWER_TIMEOUT)
        except TimeoutError:
            log.error("engine_unresponsive what=stop seconds=%.0f", timeout + ANSWER_TIMEOUT)
            unstarted = []
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(ANSWER_TIMEOUT)
        self._finishers.stop()
        return unstarted

    async def _open(self) -> None:
        budget = AsyncByteBudget(self.max_inflight_bytes)
        self._fetcher = AsyncFetcher(self.policy, self.tls, budget, self.dns_cache, robots=self.robots, hops=self.hops)

    def _accept(self, raws: list[str]) -> None:
        self._waiting.extend(raws)
        self._start_waiting()

    def _granted_elsewhere(self, granted: list[tuple[str, Parked]]) -> None:
        """From the main thread: parked tasks that now hold a slot of their host."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
            self._loop.call_soon_threadsafe(self._granted, granted)

    def _granted(self, granted: list[tuple[str, Parked]]) -> None:
        if self._stopping:
            for host, _ in granted:
                self.slots.give_back(host)
            return
        self._ready.extend(granted)
        self._start_waiting()

    def _start_waiting(self) -> None:
        while (self._ready or self._waiting) and len(self._running) < self.capacity and not self._stopping:
            if self._ready:
                task = self._loop.create_task(self._turns(*self._ready.popleft()))
            else:
                task = self._loop.create_task(self._run(self._waiting.popleft()))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._start_waiting()

    async def _run(self, raw: str) -> None:
        """Handle one task; while its host has tasks parked behind it, handle those too (the slot passes on). Each
        ends as exactly one outcome, whatever raises."""
        admitted = admit(self.pipeline, self.slots, self.done, raw)
        if admitted is not None:
            await self._turns(*admitted)

    async def _turns(self, host: str, turn: Parked | None) -> None:
        """Download ``turn``, holding a slot of ``host``, then each task parked behind it that the slot passes to."""
        while turn is not None:
            fetched = None
            try:
                fetched = await self._download(host, *turn)
            except Exception as error:  # one task's exception is its outcome
                self.done.put(self.pipeline.crashed(turn[1], turn[0], error))
            turn = next_turn(self.slots, host, self.done, fetched)

    async def _download(self, host: str, raw: str, task: Task) -> Fetched | None:
        """Fetch on the loop, then hand the task to the pool, which puts its outcome on ``done``: the download slot
        is free at once, so a store that does not answer holds the pool's threads, not the downloads."""
        assert self._fetcher is not None
        fetched = None
        self.hops.begin(host)
        try:
            fetched = await self._fetcher.fetch(task.url)
        except Exception as error:
            self.done.put(self.pipeline.crashed(task, raw, error))
            return None
        finally:
            self.hops.end(fetched)
        finished = self._loop.create_future()
        self._finishing.add(finished)
        self._finishers.submit(functools.partial(self._finish, raw, task, fetched, finished))
        return fetched

    def _finish(self, raw: str, task: Task, fetched: Fetched, finished: asyncio.Future[None]) -> None:
        """In the pool: process and store a fetched image, report its outcome, then give its bytes back on the loop."""
        try:
            outcome = self.pipeline.finish(task, raw, fetched)
        except Exception as error:
            outcome = self.pipeline.crashed(task, raw, error)
        self.done.put(outcome)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
            self._loop.call_soon_threadsafe(self._release, fetched, finished)

    def _release(self, fetched: Fetched, finished: asyncio.Future[None]) -> None:
        assert self._fetcher is not None
        self._fetcher.release(fetched)
        self._finishing.discard(finished)
        finished.set_result(None)

    async def _take_unstarted(self) -> list[str]:
        unstarted = list(self._waiting)
        self._waiting.clear()
        for host, (raw, _) in self._ready:
            self.slots.give_back(host)
            unstarted.append(raw)
        self._ready.clear()
        unstarted.extend(raw for raw, _ in self.slots.take_waiting())
        self.hops.stop_waiting()
        return unstarted

    async def _stop(self, timeout: float) -> list[str]:
        self._stopping = True
        unstarted = await self._take_unstarted()
        deadline = self._loop.time() + timeout
        while (self._running or self._finishing) and self._loop.time() < deadline:
            left = deadline - self._loop.time()
            await asyncio.wait(self._running | self._finishing, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        for task in self._running:
            task.cancel()
        if self._fetcher is not None:
            await self._fetcher.close()
        return unstarted
