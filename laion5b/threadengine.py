"""The threads engine: ``thread_num`` download threads, each with its own requests session."""

from __future__ import annotations

import queue
import ssl
import threading
import time

from laion5b.fetch import Fetcher
from laion5b.fetchpolicy import Fetched, FetchPolicy
from laion5b.limits import ByteBudget, HostSlots
from laion5b.pipeline import Outcome, Parked, Pipeline, admit, next_turn
from laion5b.robots import RobotsGate
from laion5b.tasks import Task


class ThreadEngine:
    """Downloads submitted tasks on a pool of threads and puts each outcome on ``done``."""

    def __init__(
        self,
        pipeline: Pipeline,
        policy: FetchPolicy,
        threads: int,
        done: queue.SimpleQueue[Outcome],
        max_per_host: int,
        max_inflight_bytes: int,
        tls: ssl.SSLContext,
        robots: RobotsGate | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.policy = policy
        self.capacity = threads
        self.done = done
        self.slots: HostSlots[Parked] = HostSlots(max_per_host)
        self.budget = ByteBudget(max_inflight_bytes)
        self.tls = tls
        self.robots = robots
        self._todo: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for number in range(self.capacity):
            thread = threading.Thread(target=self._download_loop, name=f"download-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, raws: list[str]) -> None:
        for raw in raws:
            self._todo.put(raw)

    def drain_unstarted(self) -> list[str]:
        """Take back every submitted task not started yet (waiting for a thread, or parked behind its host)."""
        unstarted = []
        while True:
            try:
                raw = self._todo.get_nowait()
            except queue.Empty:
                break
            if raw is not None:
                unstarted.append(raw)
        unstarted.extend(raw for raw, _ in self.slots.take_waiting())
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
        fetcher = Fetcher(self.policy, self.tls, self.budget, self.robots)
        try:
            while (raw := self._todo.get()) is not None:
                self._run(raw, fetcher)
        finally:
            fetcher.close()

    def _run(self, raw: str, fetcher: Fetcher) -> None:
        """Handle one task; while its host has tasks parked behind it, handle those too (the slot passes on). Each
        ends as exactly one outcome, whatever raises."""
        admitted = admit(self.pipeline, self.slots, self.done, raw)
        if admitted is None:
            return
        host, first = admitted
        turn: Parked | None = first
        while turn is not None:
            try:
                outcome = self._download(*turn, fetcher)
            except Exception as error:  # one task's exception is its outcome
                outcome = self.pipeline.crashed(turn[1], turn[0], error)
            self.done.put(outcome)
            turn = next_turn(self.slots, host, self.done)

    def _download(self, raw: str, task: Task, fetcher: Fetcher) -> Outcome:
        fetched: Fetched | None = None
        try:
            fetched = fetcher.fetch(task.url)
            return self.pipeline.finish(task, raw, fetched)
        except Exception as error:
            return self.pipeline.crashed(task, raw, error)
        finally:
            if fetched is not None:
                fetcher.release(fetched)
