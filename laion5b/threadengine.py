"""The threads engine: ``thread_num`` download threads, each with its own requests session."""

from __future__ import annotations

import queue
import ssl
import threading
import time
from collections import deque

from laion5b.fetch import Fetcher
from laion5b.fetchpolicy import Fetched, FetchPolicy
from laion5b.fleetslots import FleetSlots
from laion5b.hops import ThreadHops
from laion5b.limits import ByteBudget
from laion5b.pipeline import Outcome, Parked, Pipeline, admit, next_turn
from laion5b.robots import RobotsGate
from laion5b.tasks import Task

WAKE = "\0wake"
"""A mark on the task queue that wakes a thread to run the parked tasks just granted a slot."""


class ThreadEngine:
    """Downloads submitted tasks on a pool of threads and puts each outcome on ``done``."""

    def __init__(
        self,
        pipeline: Pipeline,
        policy: FetchPolicy,
        threads: int,
        done: queue.SimpleQueue[Outcome],
        slots: FleetSlots[Parked],
        max_inflight_bytes: int,
        tls: ssl.SSLContext,
        robots: RobotsGate | None = None,
        ips: FleetSlots[Parked] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.policy = policy
        self.capacity = threads
        self.done = done
        self.slots = slots
        slots.start = self._granted
        self.hops = ThreadHops(slots, ips)
        self.budget = ByteBudget(max_inflight_bytes)
        self.tls = tls
        self.robots = robots
        self._todo: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        """Tasks submitted, WAKE marks and the threads' stop marks (None)."""
        self._ready: deque[tuple[str, Parked]] = deque()
        """Parked tasks granted a slot of their host: run before any task submitted (the slot is held meanwhile)."""
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for number in range(self.capacity):
            thread = threading.Thread(target=self._download_loop, name=f"download-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, raws: list[str]) -> None:
        for raw in raws:
            self._todo.put(raw)

    def _granted(self, granted: list[tuple[str, Parked]]) -> None:
        self._ready.extend(granted)
        for _ in granted:
            self._todo.put(WAKE)

    def drain_unstarted(self) -> list[str]:
        """Take back every submitted task not started yet (waiting for a thread, or parked behind its host)."""
        unstarted = []
        while True:
            try:
                entry = self._todo.get_nowait()
            except queue.Empty:
                break
            if entry is not None and entry is not WAKE:
                unstarted.append(entry)
        while True:
            try:
                host, (raw, _) = self._ready.popleft()
            except IndexError:
                break
            self.slots.give_back(host)
            unstarted.append(raw)
        unstarted.extend(raw for raw, _ in self.slots.take_waiting())
        self.hops.stop_waiting()
        return unstarted

    def stop(self, timeout: float) -> list[str]:
        """Stop taking tasks; return those not started; wait up to ``timeout`` s for those in flight."""
        unstarted = self.drain_unstarted()
        for _ in self._threads:
            self._todo.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return unstarted

    def _download_loop(self) -> None:
        fetcher = Fetcher(self.policy, self.tls, self.budget, self.robots, self.hops)
        try:
            while (entry := self._todo.get()) is not None:
                self._run_ready(fetcher)
                if entry is not WAKE:
                    self._run(entry, fetcher)
        finally:
            fetcher.close()

    def _run_ready(self, fetcher: Fetcher) -> None:
        while True:
            try:
                host, turn = self._ready.popleft()
            except IndexError:
                return
            self._turns(host, turn, fetcher)

    def _run(self, raw: str, fetcher: Fetcher) -> None:
        """Handle one task; while its host has tasks parked behind it, handle those too (the slot passes on). Each
        ends as exactly one outcome, whatever raises."""
        admitted = admit(self.pipeline, self.slots, self.done, raw)
        if admitted is not None:
            self._turns(*admitted, fetcher)

    def _turns(self, host: str, turn: Parked | None, fetcher: Fetcher) -> None:
        """Download ``turn``, holding a slot of ``host``, then each task parked behind it that the slot passes to."""
        while turn is not None:
            fetched: Fetched | None = None
            try:
                outcome, fetched = self._download(host, *turn, fetcher)
            except Exception as error:  # one task's exception is its outcome
                outcome = self.pipeline.crashed(turn[1], turn[0], error)
            self.done.put(outcome)
            turn = next_turn(self.slots, host, self.done, fetched)

    def _download(self, host: str, raw: str, task: Task, fetcher: Fetcher) -> tuple[Outcome, Fetched | None]:
        fetched: Fetched | None = None
        try:
            self.hops.begin(host)
            try:
                fetched = fetcher.fetch(task.url)
            finally:
                self.hops.end(fetched)
            return self.pipeline.finish(task, raw, fetched), fetched
        except Exception as error:
            return self.pipeline.crashed(task, raw, error), fetched
        finally:
            if fetched is not None:
                fetcher.release(fetched)
