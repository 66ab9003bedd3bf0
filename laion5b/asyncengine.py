"""The async engine: one asyncio event loop, on a thread of its own, with ``concurrency`` downloads in flight.

The worker's main thread keeps talking to Redis while the loop downloads: only two threads share the interpreter,
so heartbeats stay on time at any concurrency. When finishing a task may block (an fsync, or decoding and resizing
pixels), a pool of about one thread per core does it, off the loop; Pillow releases the interpreter while it works.
"""

from __future__ import annotations

import asyncio
import os
import queue
import ssl
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from laion5b.aiofetch import AsyncFetcher
from laion5b.dnscache import DnsCache
from laion5b.fetchpolicy import Fetched, FetchPolicy
from laion5b.limits import AsyncByteBudget, HostSlots
from laion5b.pipeline import Outcome, Parked, Pipeline, admit, next_turn
from laion5b.tasks import Task

START_TIMEOUT = 30.0


def finish_pool(pipeline: Pipeline) -> ThreadPoolExecutor | None:
    """Threads that finish tasks off the loop when that may block: one per core for pixels, a few more for fsyncs
    alone (as asyncio's default executor); None when finishing never blocks."""
    if not pipeline.blocks:
        return None
    cores = os.cpu_count() or 1
    size = cores if pipeline.processing is not None else min(32, cores + 4)
    return ThreadPoolExecutor(size, thread_name_prefix="async-finish")


class AsyncEngine:
    """Downloads submitted tasks on an event loop and puts each outcome on ``done``."""

    def __init__(
        self,
        pipeline: Pipeline,
        policy: FetchPolicy,
        concurrency: int,
        done: queue.SimpleQueue[Outcome],
        max_per_host: int,
        max_inflight_bytes: int,
        tls: ssl.SSLContext,
        dns_cache: DnsCache | None,
    ) -> None:
        self.pipeline = pipeline
        self.policy = policy
        self.capacity = concurrency
        self.done = done
        self.slots: HostSlots[Parked] = HostSlots(max_per_host)
        self.max_inflight_bytes = max_inflight_bytes
        self.tls = tls
        self.dns_cache = dns_cache
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="async-engine", daemon=True)
        self._waiting: deque[str] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._fetcher: AsyncFetcher | None = None
        self._finishers = finish_pool(pipeline)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(START_TIMEOUT)

    def submit(self, raws: list[str]) -> None:
        self._loop.call_soon_threadsafe(self._accept, raws)

    def drain_unstarted(self) -> list[str]:
        """Take back every submitted task not started yet (waiting for room on the loop, or parked behind its host)."""
        future = asyncio.run_coroutine_threadsafe(self._take_unstarted(), self._loop)
        return future.result(START_TIMEOUT)

    def stop(self, timeout: float) -> list[str]:
        """Stop taking tasks; return those not started; wait up to ``timeout`` s for those in flight."""
        unstarted = asyncio.run_coroutine_threadsafe(self._stop(timeout), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if self._finishers is not None:
            self._finishers.shutdown(wait=False, cancel_futures=True)
        return unstarted

    async def _open(self) -> None:
        budget = AsyncByteBudget(self.max_inflight_bytes)
        self._fetcher = AsyncFetcher(self.policy, self.tls, budget, self.dns_cache)

    def _accept(self, raws: list[str]) -> None:
        self._waiting.extend(raws)
        self._start_waiting()

    def _start_waiting(self) -> None:
        while self._waiting and len(self._running) < self.capacity and not self._stopping:
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
        if admitted is None:
            return
        host, first = admitted
        turn: Parked | None = first
        while turn is not None:
            try:
                outcome = await self._download(*turn)
            except Exception as error:  # one task's exception is its outcome
                outcome = self.pipeline.crashed(turn[1], turn[0], error)
            self.done.put(outcome)
            turn = next_turn(self.slots, host, self.done)

    async def _download(self, raw: str, task: Task) -> Outcome:
        assert self._fetcher is not None
        fetched: Fetched | None = None
        try:
            fetched = await self._fetcher.fetch(task.url)
            if self._finishers is not None:
                return await self._loop.run_in_executor(self._finishers, self.pipeline.finish, task, raw, fetched)
            return self.pipeline.finish(task, raw, fetched)
        except Exception as error:
            return self.pipeline.crashed(task, raw, error)
        finally:
            if fetched is not None:
                self._fetcher.release(fetched)

    async def _take_unstarted(self) -> list[str]:
        unstarted = list(self._waiting)
        self._waiting.clear()
        unstarted.extend(raw for raw, _ in self.slots.take_waiting())
        return unstarted

    async def _stop(self, timeout: float) -> list[str]:
        self._stopping = True
        unstarted = await self._take_unstarted()
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout)
        for task in self._running:
            task.cancel()
        if self._fetcher is not None:
            await self._fetcher.close()
        return unstarted
