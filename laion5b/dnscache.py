"""A process's DNS answers, reused for ``dns_cache_ttl`` seconds (failed look-ups for NEGATIVE_TTL), with one
look-up per name at a time: a dead domain with hundreds of URLs in flight costs a handful of look-ups."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable

Answer = list[str] | socket.gaierror
Resolver = Callable[[str, int], list[str]]
AsyncResolver = Callable[[str, int], Awaitable[list[str]]]

NEGATIVE_TTL = 5.0
MAX_NAMES = 100_000


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
