"""The address guard: connections go only to public addresses or to ``allowed_networks``, checked on the address
actually connected (after DNS, for IP literals, and for every redirect target), before any packet is sent.

It lives in urllib3's connection layer: requests' adapter gets a pool manager whose connections resolve their host
with the guard's resolver and connect only to an address the guard allows; TLS still uses the URL's host name.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3 import PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.response import HTTPResponse

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IDLE_PER_THREAD = 8
"""Idle kept-alive connections one download thread keeps at most (one per host, for its last few hosts)."""
Resolver = Callable[[str, int], list[str]]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_HOSTNAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")  # after requests' IDNA encoding; no %, no spaces


class BlockedAddress(Exception):
    """The host has no address that the policy allows connecting to."""


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for a globally routable unicast address; IPv6 forms that embed an IPv4 address are judged by it."""
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return _is_public(embedded)
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


def system_resolver(host: str, port: int) -> list[str]:
    """The system resolver: every address of ``host`` in the system's preference order, without duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def bare_host(host: str) -> str:
    """A host as resolvers are asked about it, for comparing: no IPv6 brackets, no final dot, lower case."""
    return host.strip("[]").rstrip(".").lower()


PINNED = threading.local()
"""``PINNED.value``: (bare host, address) that the calling thread's request must connect to (max_per_ip: the address
whose fleet slot it holds), or None."""


def _peer_address(sock: socket.socket | None) -> str | None:
    """The normalised address ``sock`` is connected to (None: not connected)."""
    try:
        return str(ipaddress.ip_address(sock.getpeername()[0])) if sock is not None else None
    except (OSError, ValueError):
        return None


def _ip_literal(host: str) -> str | None:
    """The normalised address if ``host`` is an IP literal, else None."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class AddressGuard:
    """Resolves a host and keeps only the addresses that may be connected to."""

    def __init__(self, allowed_networks: tuple[Network, ...], resolver: Resolver) -> None:
        self._allowed_networks = allowed_networks
        self._resolver = resolver

    def addresses(self, host: str, port: int) -> list[str]:
        """Allowed addresses of ``host``; raise BlockedAddress if none, socket.gaierror if it does not resolve."""
        host = host.strip("[]")
        literal = _ip_literal(host)
        if literal is not None:
            return self.allowed([literal])
        pinned = getattr(PINNED, "value", None)
        if pinned is not None and pinned[0] == bare_host(host):
            return [pinned[1]]  # resolved and allowed for this request already
        check_host_name(host)
        return self.allowed(self._resolver(host, port))

    def allowed(self, candidates: list[str]) -> list[str]:
        """The addresses among ``candidates`` that may be connected to; raise BlockedAddress if none."""
        allowed = [address for address in candidates if self.allows(address)]
        if not allowed:
            raise BlockedAddress(f"refused to connect to {', '.join(candidates[:4]) or 'no address'}")
        return allowed

    def allows(self, address: str) -> bool:
        """Whether the address ``address`` may be connected to."""
        return self._allows(ipaddress.ip_address(address))

    def _allows(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        mapped = ip.ipv4_mapped if ip.version == 6 else None
        for network in self._allowed_networks:
            if ip in network or (mapped is not None and mapped in network):
                return True
        return _is_public(ip)


def check_host_name(host: str) -> None:
    """Refuse a host name that no resolver should be asked about (UnicodeError or LocationParseError)."""
    host.encode("idna")  # over-long or empty labels raise UnicodeError, as getaddrinfo would
    if not _HOSTNAME.fullmatch(host):
        raise urllib3.exceptions.LocationParseError(f"host name {host!r}")


def _guarded_connect(conn: HTTPConnection, guard: AddressGuard) -> socket.socket:
    """Open the TCP connection of ``conn`` to an allowed address of its host (replaces urllib3's _new_conn)."""
    try:
        addresses = guard.addresses(conn._dns_host, conn.port)
    except socket.gaierror as exc:
        raise urllib3.exceptions.NameResolutionError(conn.host, conn, exc) from exc
    error: OSError | None = None
    for address in addresses:
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
        try:
            for option in conn.socket_options or ():
                sock.setsockopt(*option)
            if isinstance(conn.timeout, int | float):
                sock.settimeout(conn.timeout)
            sock.connect((address, conn.port))
            return sock
        except TimeoutError as exc:  # no next address: the deadline would not allow another connect timeout
            sock.close()
            message = f"connect to {address} port {conn.port} timed out (connect timeout={conn.timeout})"
            raise urllib3.exceptions.ConnectTimeoutError(message) from exc
        except OSError as exc:
            sock.close()
            error = exc
    raise urllib3.exceptions.NewConnectionError(conn, f"Failed to establish a new connection: {error}") from error


DEADLINE = threading.local()
"""``DEADLINE.value``: the monotonic time by which the calling thread's download must end (None: no deadline)."""


class _DeadlineReader(io.RawIOBase):
    """Reads a socket with each wait capped by the calling thread's DEADLINE, so that neither a trickled status line
    and headers nor a trickled body can outlive the download's total deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # a socket file: the socket stays open while it is
        self._read_timeout = sock.gettimeout()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        deadline = getattr(DEADLINE, "value", None)
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("download deadline passed")
            self._sock.settimeout(remaining if self._read_timeout is None else min(self._read_timeout, remaining))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """What http.client's response needs of a socket: a reader that keeps the deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock))


class _DeadlineResponse(http.client.HTTPResponse):
    """http.client's response, reading through _DeadlineReader."""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(_DeadlineSocket(sock), *args, **kwargs)  # type: ignore[arg-type]


class _Guarded:
    """Mixed into urllib3's connections: connect only to addresses the guard allows, read under the deadline."""

    response_class = _DeadlineResponse

    def __init__(self, *args: Any, guard: AddressGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard

    def _new_conn(self) -> socket.socket:
        return _guarded_connect(self, self._guard)  # type: ignore[arg-type]


class _GuardedHTTPConnection(_Guarded, HTTPConnection):
    """An HTTP connection that only connects to addresses its guard allows."""


class _GuardedHTTPSConnection(_Guarded, HTTPSConnection):
    """An HTTPS connection that only connects to addresses its guard allows; SNI and the cert use the URL host."""


class _PinnedPool:
    """Mixed into urllib3's pools: a kept-alive connection to another address than the one pinned for the request
    (the host's DNS answer changed since) is closed, so that the request connects to the pinned address."""

    def _get_conn(self, timeout: float | None = None) -> HTTPConnection:
        conn: HTTPConnection = super()._get_conn(timeout)  # type: ignore[misc]
        pinned = getattr(PINNED, "value", None)
        if pinned is not None and conn.sock is not None and _peer_address(conn.sock) != pinned[1]:
            conn.close()
        return conn


class _GuardedHTTPPool(_PinnedPool, HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(_PinnedPool, HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedPoolManager(PoolManager):
    """A pool manager whose pools hand their connections the address guard."""

    def __init__(self, guard: AddressGuard, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}
        self._guard = guard

    def _new_pool(
        self, scheme: str, host: str, port: int, request_context: dict[str, Any] | None = None
    ) -> HTTPConnectionPool:
        pool = super()._new_pool(scheme, host, port, request_context)
        pool.conn_kw["guard"] = self._guard
        return pool


class GuardedAdapter(HTTPAdapter):
    """A requests adapter on the guarded pool manager: one idle connection per host, a few hosts, no retries, and
    the process's one TLS context (requests would otherwise load its CA bundle again for every new connection)."""

    def __init__(self, guard: AddressGuard, tls: ssl.SSLContext) -> None:
        self._guard = guard  # read by init_poolmanager, which HTTPAdapter.__init__ calls
        self._tls = tls
        super().__init__(pool_connections=IDLE_PER_THREAD, pool_maxsize=1, max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        self._pool_connections = connections
        self._pool_maxsize = maxsize
        self._pool_block = block
        self.poolmanager = _GuardedPoolManager(
            self._guard, num_pools=connections, maxsize=maxsize, block=block, ssl_context=self._tls, **pool_kwargs
        )

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        """Certificates are checked by the pool's TLS context (CERT_REQUIRED, its CA bundle loaded once)."""

    def build_response(self, req: requests.PreparedRequest, resp: HTTPResponse) -> requests.Response:
        """HTTPAdapter's response without its cookie extraction: the fetcher never sends cookies, so it skips
        parsing Set-Cookie headers into a jar that nothing reads (and the text-encoding guess nothing uses)."""
        response = requests.Response()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url  # type: ignore[assignment]
        response.request = req
        response.connection = self
        return response
