"""The async engine's HTTP download of one image, with aiohttp: the rules of ``laion5b.fetchpolicy`` on one client
session per process. The address guard sits in the connector's resolver (names) and socket factory (the address
actually connected, IP literals included); bodies are decoded here, so the byte cap holds for gzip bombs."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextvars
import functools
import ipaddress
import socket
import ssl
import time
import zlib
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import aiohttp
import urllib3.exceptions
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

from laion5b.dnscache import DNS_THREADS, AsyncCachedResolver, DnsCache, LookupPool
from laion5b.fetchpolicy import (
    BUDGET_MESSAGE,
    CHUNK,
    DRAIN_SECONDS,
    GAVE_WAY,
    TRUNCATED,
    Body,
    Decoder,
    Fetched,
    FetchFailure,
    FetchPolicy,
    check_final,
    check_url,
    drain_length,
    failed,
    one_line,
    pressed,
    redirect_location,
    redirect_target,
    tls_context,
)
from laion5b.guard import AddressGuard, BlockedAddress, bare_host, check_host_name, system_resolver
from laion5b.limits import AsyncByteBudget
from laion5b.robots import ROBOTS_REDIRECTS, AsyncRobotsGate, RobotsText, Turn

if TYPE_CHECKING:
    from laion5b.hops import AsyncHops

IDLE_CONNECTION_SECONDS = 15.0  # an idle kept-alive connection is closed after this long (aiohttp's default)
MAX_IDLE_CONNECTIONS = 256
"""Idle kept-alive connections a process keeps at most (sockets, and TLS state of some 30 KB each): see
_BoundedIdleConnector."""
TLS_READ_BYTES = 16 * 1024 + 256
"""asyncio's TLS protocol zero-fills a 256 KiB read buffer for every new connection and asks OpenSSL for 256 KiB at
each read: on traffic where nearly every download opens a TLS connection that was 13 % of a worker's CPU, and 256 KiB
of memory per open connection (bench/RESULTS.md). A TLS record holds at most 16 KiB: a buffer of one record is
enough (worker peak RSS at 1,024 in flight 357 -> 232 MB).

On uvloop (engine_loop) this does not apply and nothing needs to: its TLS protocol is its own (uvloop.sslproto, in
C), whose 256 KiB read buffer per connection is malloc'ed, not zero-filled: its pages cost memory only as far as
one socket read fills them (worker peak RSS at 1,024 in flight: 256 MB on uvloop, 185 MB on asyncio's loop,
bench/RESULTS.md). It is compiled in: setting asyncio's class attribute leaves uvloop alone."""
asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BYTES
Final = Callable[[aiohttp.ClientResponse, str], Coroutine[Any, Any, Fetched]]
"""What turns the final response of a request (after its redirects) into its outcome: an image, or a robots.txt."""
_URL_ERRORS = (aiohttp.InvalidURL, urllib3.exceptions.LocationParseError, UnicodeError, ValueError)
_TIMEOUT_ERRORS = (TimeoutError, aiohttp.ServerTimeoutError)
_SSL_ERRORS = (aiohttp.ClientSSLError, ssl.SSLError, ssl.CertificateError)
_EXPECTED_ERRORS = (aiohttp.ClientError, OSError, ValueError, zlib.error)


_RESOLVING: contextvars.ContextVar[list[str]] = contextvars.ContextVar("resolving")
"""The name a download is resolving now (a list of at most one, set by ``fetch``): if its deadline passes while
that name waits for a look-up thread, the download gave way to local pressure."""
_PINNED: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("pinned", default=None)
"""(bare host, address) that the download's request in progress must connect to (max_per_ip: the address whose fleet
slot it holds), or None."""


class _GuardedResolver(AbstractResolver):
    """Resolves names through the process's DNS cache and keeps only the addresses the guard allows."""

    def __init__(self, guard: AddressGuard, lookup: AsyncCachedResolver) -> None:
        self._guard = guard
        self._lookup = lookup

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        pinned = _PINNED.get()
        if pinned is not None and pinned[0] == bare_host(host):
            return [_resolved(host, pinned[1], port)]  # resolved and allowed for this request already
        check_host_name(host)
        resolving = _RESOLVING.get([])
        resolving[:] = [host]  # kept when the deadline cancels the look-up: fetch then reads it
        try:
            answer = await self._lookup(host, port)
        except socket.gaierror:
            resolving.clear()
            raise
        resolving.clear()
        addresses = self._guard.allowed(answer)
        return [_resolved(host, address, port) for address in addresses]

    async def close(self) -> None:
        """Nothing to release: look-ups run on the fetcher's thread pool."""


class _BoundedIdleConnector(aiohttp.TCPConnector):
    """aiohttp's connector with a bound on idle kept-alive connections. Its ``limit`` counts only connections in use
    (it stays 0: ``concurrency`` bounds those) and ``keepalive_timeout`` only ages idle ones out, so idle sockets grew
    with the rate of downloads to distinct hosts (rate × 15 s: 15,000 at 1,000 a second). A connection given back
    while ``max_idle`` are idle is closed instead of kept: at most ``concurrency + max_idle`` sockets are open."""

    def __init__(self, max_idle: int, **options: Any) -> None:
        super().__init__(**options)
        self.max_idle = max_idle

    def idle(self) -> int:
        """Idle connections kept now (at most max_idle)."""
        return sum(len(connections) for connections in self._conns.values())

    def _release(self, key: Any, protocol: Any, *, should_close: bool = False) -> None:
        super()._release(key, protocol, should_close=should_close or self.idle() >= self.max_idle)

    def _get(self, key: Any, *args: Any) -> Any:
        """A kept-alive connection, but none to another address than the one pinned for the request (the host's
        DNS answer changed since): those are closed, so that the request connects to the pinned address. (Returns
        what aiohttp's returns, a coroutine in current versions.)"""
        pinned = _PINNED.get()
        idle = self._conns.get(key) if pinned is not None else None
        if idle:
            for entry in [entry for entry in idle if _peer(entry[0]) != pinned[1]]:
                idle.remove(entry)
                entry[0].close()
            if not idle:
                del self._conns[key]
        return super()._get(key, *args)


def _peer(protocol: Any) -> str | None:
    """The normalised address a kept-alive connection is connected to (None: closed)."""
    peer = protocol.transport.get_extra_info("peername") if protocol.transport is not None else None
    return str(ipaddress.ip_address(peer[0])) if peer else None


def _resolved(host: str, address: str, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return {"hostname": host, "host": address, "port": port, "family": family, "proto": 0, "flags": 0}


class AsyncFetcher:
    """One per process, made inside its event loop: one aiohttp session, the guard, the byte budget."""

    def __init__(
        self,
        policy: FetchPolicy,
        tls: ssl.SSLContext | None = None,
        budget: AsyncByteBudget | None = None,
        dns_cache: DnsCache | None = None,
        max_idle: int = MAX_IDLE_CONNECTIONS,
        dns_threads: int = DNS_THREADS,
        robots: AsyncRobotsGate | None = None,
        hops: AsyncHops | None = None,
    ) -> None:
        self._policy = policy
        self._budget = budget
        self._robots = robots
        self._hops = hops
        self._guard = AddressGuard(policy.allowed_networks, policy.resolver or system_resolver)
        self._lookups = LookupPool(policy.resolver or system_resolver, policy.dns_timeout, dns_threads)
        lookup = AsyncCachedResolver(self._lookups, dns_cache or DnsCache(0, 0))
        self._resolver = _GuardedResolver(self._guard, lookup)
        self.connector = _BoundedIdleConnector(
            max_idle,
            resolver=self._resolver,
            use_dns_cache=False,
            ssl=tls or tls_context(policy.tls_ca_file),
            limit=0,
            keepalive_timeout=IDLE_CONNECTION_SECONDS,
            happy_eyeballs_delay=None,
            socket_factory=self._socket,
        )
        self._session = aiohttp.ClientSession(
            connector=self.connector,
            headers=policy.headers(),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=policy.connect_timeout, sock_read=policy.read_timeout
            ),
        )

    async def fetch(self, url: str) -> Fetched:
        """Download one image; every per-URL problem comes back as a status, never as an exception.

        With a byte budget, the image's bytes stay reserved until ``release(fetched)`` is called. With a robots.txt
        gate, each URL (redirect hops included) is checked first; the first one before the download's time starts.
        """
        try:
            turn = await self._enter(url)
        except FetchFailure as exc:
            return failed(exc, url)
        deadline = time.monotonic() + self._policy.download_timeout
        body = Body(self._policy.max_bytes, deadline)
        image = functools.partial(self._image, body=body)
        fetched = await self._attempt(url, self._follow(url, deadline, image, turn), body)
        fetched = pressed(fetched, body, self._policy.download_timeout)
        if fetched.data is None and self._budget is not None:
            self._budget.give(body.reserved)
        return fetched

    async def fetch_robots(self, url: str) -> Fetched:
        """A robots.txt: its first ROBOTS_BYTES bytes as ``data`` (status None) once up to 5 redirects are followed,
        or the status that ended it; with the same guard, timeouts and limits as an image."""
        deadline = time.monotonic() + self._policy.download_timeout
        text = functools.partial(self._robots_text, deadline=deadline)
        return await self._attempt(url, self._follow(url, deadline, text, None, ROBOTS_REDIRECTS), None)

    def release(self, fetched: Fetched) -> None:
        """Give the bytes of a fetched image back to the budget (once the image is stored)."""
        if self._budget is not None and fetched.data is not None:
            self._budget.give(len(fetched.data))

    async def close(self) -> None:
        await self._session.close()
        self._lookups.close()
        if self._robots is not None:
            await self._robots.close()

    async def _attempt(self, url: str, follow: Coroutine[Any, Any, Fetched], body: Body | None) -> Fetched:
        """Await ``follow`` for at most download_timeout; every per-URL problem becomes a status."""
        resolving: list[str] = []
        context = _RESOLVING.set(resolving)
        try:
            async with asyncio.timeout(self._policy.download_timeout):
                return await follow
        except FetchFailure as exc:
            return failed(exc, url)
        except BlockedAddress as exc:
            return Fetched(None, None, "blocked_address", one_line(str(exc), url))
        except TimeoutError:
            return self._timed_out(body, resolving)
        except _EXPECTED_ERRORS as exc:
            return Fetched(None, None, _status_word(exc), _describe(exc, url))
        finally:
            _RESOLVING.reset(context)

    async def _follow(
        self, url: str, deadline: float, final: Final, turn: Turn | None, max_redirects: int | None = None
    ) -> Fetched:
        """Request ``url`` and follow its redirects by hand, each target checked like the first URL (whose robots.txt
        ``turn`` is already taken; robots.txt requests pass ``max_redirects`` and are not checked)."""
        seen = {url}
        gated = max_redirects is None
        while True:
            address = None
            try:
                check_url(url, deadline, self._policy)
                address = await self._reach(url, deadline) if gated else None
                async with self._session.get(url, allow_redirects=False) as response:
                    location = redirect_location(response.status, response.headers)
                    if not location:
                        return await final(response, url)
                    await self._drain(response, deadline)
            finally:
                self._part(address)
                await self._leave(turn)
            url = redirect_target(url, location, seen, self._policy.max_redirects if gated else max_redirects)
            if gated and self._hops is not None:  # the target's host counts too
                await self._hops.enter(url, deadline)
            turn = await self._enter(url) if gated else None

    async def _reach(self, url: str, deadline: float) -> str | None:
        """With max_per_ip: resolve the host of ``url`` once (through the DNS cache), hold a fleet slot of its first
        allowed address and pin the request's connection to it; return that address."""
        if self._hops is None or self._hops.ips is None:
            return None
        target = yarl.URL(url)
        host, port = target.raw_host or "", target.port or 0
        try:
            address = self._guard.allowed([str(ipaddress.ip_address(host))])[0]
        except ValueError:  # a name
            address = str(ipaddress.ip_address((await self._resolver.resolve(host, port))[0]["host"]))
        await self._hops.reach(address, deadline)
        _PINNED.set((bare_host(host), address))
        return address

    def _part(self, address: str | None) -> None:
        """The request to ``address`` ended: unpin, and give its slot back."""
        if address is not None and self._hops is not None:
            _PINNED.set(None)
            self._hops.part(address)

    async def _enter(self, url: str) -> Turn | None:
        return await self._robots.enter(url, self.fetch_robots) if self._robots is not None else None

    async def _leave(self, turn: Turn | None) -> None:
        if self._robots is not None:
            await self._robots.leave(turn)

    async def _image(self, response: aiohttp.ClientResponse, url: str, body: Body) -> Fetched:
        try:
            check_final(response.status, response.reason, response.headers, self._policy)
        except FetchFailure:
            await self._drain(response, body.deadline)
            raise
        await _read_body(response, body, self._budget)
        return body.image(url)

    async def _robots_text(self, response: aiohttp.ClientResponse, url: str, deadline: float) -> Fetched:
        """A final response to a robots.txt request: its status, or the first ROBOTS_BYTES bytes of its body."""
        if response.status >= 300:
            await self._drain(response, deadline)
            return Fetched(None, None, response.status, f"HTTP {response.status}", final_url=url)
        text = RobotsText(deadline)
        decoder = Decoder(response.headers.get("content-encoding", ""))
        while raw := await response.content.read(CHUNK):
            if not all(text.add(chunk) for chunk in decoder.decode(raw)):
                response.close()
                return text.fetched(url)
        decoder.finish()
        return text.fetched(url)

    async def _drain(self, response: aiohttp.ClientResponse, deadline: float) -> None:
        """Read a small unwanted body so that its connection can be reused; anything else closes it."""
        length = drain_length(response.headers)
        if length is None:
            response.close()
            return
        try:
            async with asyncio.timeout(max(0.0, min(deadline - time.monotonic(), DRAIN_SECONDS))):
                await _read_body(response, Body(length, deadline, image=False), None)
        except (FetchFailure, TimeoutError, *_EXPECTED_ERRORS):
            response.close()

    def _timed_out(self, body: Body | None, resolving: list[str]) -> Fetched:
        """The outcome of a download whose deadline passed: local pressure when it was waiting for byte budget or
        for a DNS look-up thread, else a timeout."""
        if body is not None and body.waiting:
            return Fetched(None, None, GAVE_WAY, f"{BUDGET_MESSAGE} (waited until the deadline)")
        if resolving and self._lookups.queued[resolving[0]]:
            return Fetched(None, None, GAVE_WAY, f"waited for a DNS look-up thread for {resolving[0]}")
        return Fetched(None, None, "timeout", f"no complete response within {self._policy.download_timeout:g} s")

    def _socket(self, addr_info: Any) -> socket.socket:
        """The socket for one connection attempt, made only when the guard allows the address."""
        family, kind, proto, _, address = addr_info
        if not self._guard.allows(address[0]):
            raise BlockedAddress(f"refused to connect to {address[0]}")
        return socket.socket(family, kind, proto)


async def _read_body(response: aiohttp.ClientResponse, body: Body, budget: AsyncByteBudget | None) -> None:
    """Read and decode the body into ``body``, reserving each decoded chunk in ``budget`` first."""
    decoder = Decoder(response.headers.get("content-encoding", ""))
    while raw := await response.content.read(CHUNK):
        for chunk in decoder.decode(raw):
            if budget is not None:
                await _reserve(budget, body, len(chunk))
            body.add(chunk)
    decoder.finish()


async def _reserve(budget: AsyncByteBudget, body: Body, size: int) -> None:
    """Reserve ``size`` more bytes of ``body`` in ``budget``; give way (GAVE_WAY) when the budget says so."""
    body.waiting, began = True, time.monotonic()
    granted = await budget.take(size, body.reserved)
    body.waiting, body.waited = False, body.waited + time.monotonic() - began
    if not granted:
        raise FetchFailure(GAVE_WAY, BUDGET_MESSAGE)
    body.reserved += size


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (causes, contexts, aiohttp's os_error), innermost last."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 16:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _status_word(exc: BaseException) -> str:
    """Map an aiohttp/socket exception to its status word."""
    chain = _causes(exc)
    for word, kinds in (
        ("blocked_address", BlockedAddress),
        (TRUNCATED, aiohttp.ClientPayloadError),
        ("dns", (aiohttp.ClientConnectorDNSError, socket.gaierror)),
        ("ssl", _SSL_ERRORS),
        ("timeout", _TIMEOUT_ERRORS),
        ("bad_url", _URL_ERRORS),
    ):
        if any(isinstance(item, kinds) for item in chain):
            return word
    return "connection"


def _describe(exc: BaseException, url: str) -> str:
    """One short line naming the exception, without URL credentials."""
    text = str(exc)
    return one_line(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, url)
