"""A process's DNS answers, reused for ``dns_cache_ttl`` seconds (failed look-ups for NEGATIVE_TTL), with one
look-up per name at a time: a dead domain with hundreds of URLs in flight costs a handful of look-ups. Every look-up
is given up after ``dns_timeout`` seconds (a gaierror: status ``dns``), and runs on a pool of threads of its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable

Answer = list[str] | socket.gaierror
Resolver = Callable[[str, int], list[str]]
AsyncResolver = Callable[[str, int], Awaitable[list[str]]]

NEGATIVE_TTL = 5.0
MAX_NAMES = 100_000
DNS_THREADS = 256
"""Look-ups in progress at once in the async engine, dead names' and live ones' alike: enough that slow look-ups of
dead names (each at most dns_timeout) leave turns for the live ones."""
SPARE_THREADS = 64
"""Threads for look-ups given up that are still stuck in getaddrinfo; until they fill, a stuck look-up hands its turn
on, so a few hanging names cannot take every thread."""


class DnsCache:
    """Answers by host name, each kept until it expires; the oldest go first past MAX_NAMES."""

    def __init__(self, ttl: float, negative_ttl: float = NEGATIVE_TTL, max_names: int = MAX_NAMES) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_names = max_names
        self.lookups = 0
        self._answers: dict[str, tuple[float, Answer]] = {}
        self._lock = threading.Lock()

    def get(self, host: str) -> Answer | None:
        entry = self._answers.get(host)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, host: str, answer: Answer) -> None:
        ttl = self.negative_ttl if isinstance(answer, socket.gaierror) else self.ttl
        with self._lock:
            self.lookups += 1
            if ttl <= 0:
                return
            self._answers.pop(host, None)
            while len(self._answers) >= self.max_names:
                del self._answers[next(iter(self._answers))]
            self._answers[host] = (time.monotonic() + ttl, answer)


def _answer(answer: Answer | BaseException) -> list[str]:
    if isinstance(answer, BaseException):
        raise answer
    return answer


def _look_up(resolver: Resolver, host: str, port: int) -> Answer:
    try:
        return resolver(host, port)
    except socket.gaierror as error:
        return error


class _Pending:
    """A look-up in progress that other threads wait for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: Answer | BaseException = socket.gaierror(socket.EAI_AGAIN, "look-up did not finish")


class CachedResolver:
    """A blocking resolver (threads engine) before a DnsCache; concurrent look-ups of a name wait for the first."""

    def __init__(self, resolver: Resolver, cache: DnsCache) -> None:
        self._resolver = resolver
        self._cache = cache
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    def __call__(self, host: str, port: int) -> list[str]:
        answer = self._cache.get(host)
        return _answer(self._shared_look_up(host, port) if answer is None else answer)

    def _shared_look_up(self, host: str, port: int) -> Answer | BaseException:
        with self._lock:
            pending = self._pending.get(host)
            first = pending is None
            if pending is None:
                pending = self._pending[host] = _Pending()
        if not first:
            pending.done.wait()
            return pending.answer
        try:
            pending.answer = _look_up(self._resolver, host, port)
            self._cache.put(host, pending.answer)
        except Exception as error:
            pending.answer = error
        finally:
            with self._lock:
                del self._pending[host]
            pending.done.set()
        return pending.answer


class AsyncCachedResolver:
    """An awaitable resolver (async engine) in front of a DnsCache; concurrent look-ups of one name share one."""

    def __init__(self, resolver: AsyncResolver, cache: DnsCache) -> None:
        self._resolver = resolver
        self._cache = cache
        self._pending: dict[str, asyncio.Future[Answer]] = {}

    async def __call__(self, host: str, port: int) -> list[str]:
        answer = self._cache.get(host)
        if answer is not None:
            return _answer(answer)
        pending = self._pending.get(host)
        if pending is None:
            pending = asyncio.ensure_future(self._look_up(host, port))
            self._pending[host] = pending
            pending.add_done_callback(lambda _: self._pending.pop(host, None))
        return _answer(await asyncio.shield(pending))

    async def _look_up(self, host: str, port: int) -> Answer:
        try:
            answer: Answer = await self._resolver(host, port)
        except socket.gaierror as error:
            answer = error
        self._cache.put(host, answer)
        return answer


def timed_out(host: str, timeout: float) -> socket.gaierror:
    """The answer of a look-up given up after ``timeout`` s."""
    return socket.gaierror(socket.EAI_AGAIN, f"no DNS answer for {host} within {timeout:g} s")


class LookupPool:
    """Blocking look-ups (``resolver``: getaddrinfo) on threads of their own for an event loop, each given up after
    ``timeout`` s, its answer then a gaierror (status ``dns``; not cached for longer than any failure).

    At most ``threads`` look-ups run at once; a caller waits for a turn first, and that wait is no part of its
    timeout (``queued`` tells which names wait: a download whose deadline passes meanwhile gave way to local
    pressure). A look-up given up keeps its thread until getaddrinfo returns, but hands its turn on while fewer than
    ``spare`` are stuck like it; the pool has ``threads + spare`` threads, so a turn always finds a free thread.
    """

    def __init__(
        self, resolver: Resolver, timeout: float, threads: int = DNS_THREADS, spare: int = SPARE_THREADS
    ) -> None:
        self.timeout = timeout
        self.stuck = 0
        self.queued: Counter[str] = Counter()
        self._resolver = resolver
        self._spare = spare
        self._turns = asyncio.Semaphore(threads)
        self._executor = concurrent.futures.ThreadPoolExecutor(threads + spare, thread_name_prefix="dns")

    async def __call__(self, host: str, port: int) -> list[str]:
        await self._turn(host)
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._resolver, host, port)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            raise timed_out(host, self.timeout) from None
        finally:
            self._hand_back(future)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _turn(self, host: str) -> None:
        self.queued[host] += 1
        try:
            await self._turns.acquire()
        finally:
            self.queued[host] -= 1
            if not self.queued[host]:
                del self.queued[host]

    def _hand_back(self, future: asyncio.Future[list[str]]) -> None:
        """Give the turn back now, or (a look-up stuck while the spare threads are full) once it returns."""
        if future.done():
            self._turns.release()
        elif self.stuck < self._spare:
            self.stuck += 1
            future.add_done_callback(self._unstuck)
            self._turns.release()
        else:
            future.add_done_callback(lambda _: self._turns.release())

    def _unstuck(self, _: asyncio.Future[list[str]]) -> None:
        self.stuck -= 1


class BlockingLookups:
    """The threads engine's look-ups, each given up after ``timeout`` s (a gaierror: status ``dns``): a look-up runs
    on a thread of this pool while the download thread waits for its answer, so a getaddrinfo that never returns
    holds a pool thread, not the download. ``threads`` exceeds the download threads by the stuck look-ups it absorbs
    (beyond those, a look-up waits for a free thread within its ``timeout``)."""

    def __init__(self, resolver: Resolver, timeout: float, threads: int) -> None:
        self.timeout = timeout
        self._resolver = resolver
        self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="dns")

    def __call__(self, host: str, port: int) -> list[str]:
        future = self._executor.submit(self._resolver, host, port)
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise timed_out(host, self.timeout) from None
