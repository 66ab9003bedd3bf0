"""Tests of both engines' fetchers (laion5b.fetch for threads, laion5b.aiofetch for async) against the real
loopback image server: every test runs once per engine, the async one once per event loop (uvloop, asyncio).

While this module runs, an audit hook records every socket connect and makes any connect outside 127.0.0.0/8, and
any DNS look-up of a name, fail before a packet leaves: a broken address guard fails a test, never reaches a network.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import http.client
import ipaddress
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from ipaddress import ip_network
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import setting
from laion5b import config
from laion5b.aiofetch import AsyncFetcher
from laion5b.dnscache import CachedResolver, DnsCache
from laion5b.eventloop import loop_factory
from laion5b.fetch import Fetcher
from laion5b.fetchpolicy import Fetched, FetchPolicy
from laion5b.guard import system_resolver
from laion5b.limits import AsyncByteBudget, ByteBudget
from laion5b.tasks import MAX_URL_CHARS
from laion5b.worker import fetch_policy
from tests.certs import make_certificates
from tests.helpers import ASYNC_LOOPS, ROOT
from tools.image_server import ImageServer, gzip_bomb, image_bytes

LOOPBACK = (ip_network("127.0.0.0/8"),)
AGENT = "laion5b-downloader/" + tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
MIB = 1024 * 1024
STATUS_WORDS = {
    "timeout",
    "connection",
    "dns",
    "ssl",
    "not_image",
    "too_large",
    "disallowed",
    "blocked_address",
    "redirects",
    "bad_url",
}


class NetworkWatch:
    """Audit hook: records socket connects; fails connects beyond 127.0.0.0/8 and look-ups of names."""

    def __init__(self) -> None:
        self.active = False
        self.connects: list[str] = []

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        if event == "socket.connect":
            address = args[1]
            host = str(address[0] if isinstance(address, tuple) else address)
            self.connects.append(host)
            if not _is_loopback_v4(host):
                raise PermissionError(f"test tried to connect to {host}")
        elif event == "socket.getaddrinfo" and not _is_ip(args[0]):
            raise socket.gaierror(socket.EAI_NONAME, f"test tried to resolve {args[0]!r}")


def _is_ip(host: object) -> bool:
    try:
        ipaddress.ip_address(host.decode() if isinstance(host, bytes) else str(host))
    except ValueError:
        return False
    return True


def _is_loopback_v4(host: str) -> bool:
    return _is_ip(host) and ipaddress.ip_address(host) in LOOPBACK[0]


WATCH = NetworkWatch()
sys.addaudithook(WATCH)


@pytest.fixture(scope="module", autouse=True)
def _watch_network() -> Iterator[None]:
    WATCH.active = True
    yield
    WATCH.active = False


@pytest.fixture
def connects() -> list[str]:
    """The hosts connected to during this test."""
    WATCH.connects.clear()
    return WATCH.connects


def policy(**changes: Any) -> FetchPolicy:
    """A test policy: loopback allowed, limits small enough for quick tests."""
    values: dict[str, Any] = {
        "allowed_networks": LOOPBACK,
        "connect_timeout": 2.0,
        "read_timeout": 2.0,
        "download_timeout": 5.0,
        "max_bytes": 4 * MIB,
    }
    values.update(changes)
    return FetchPolicy(**values)


class LoopFetcher:
    """The async engine's fetcher, called from the test's thread: its event loop (``engine_loop``, as the engine's)
    runs on a thread of its own."""

    def __init__(
        self,
        fetch_policy: FetchPolicy,
        budget: AsyncByteBudget | None = None,
        cache: DnsCache | None = None,
        engine_loop: str = "uvloop",
    ) -> None:
        self._loop = loop_factory(engine_loop)[1]()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.budget = budget
        self._fetcher = self._call(self._open(fetch_policy, budget, cache))

    @staticmethod
    async def _open(fetch_policy: FetchPolicy, budget: AsyncByteBudget | None, cache: DnsCache | None) -> AsyncFetcher:
        return AsyncFetcher(fetch_policy, budget=budget, dns_cache=cache)

    def release(self, fetched: Fetched) -> None:
        self._loop.call_soon_threadsafe(self._fetcher.release, fetched)

    def fetch(self, url: str) -> Fetched:
        return self._call(self._fetcher.fetch(url))

    def close(self) -> None:
        self._call(self._fetcher.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(60)


AnyFetcher = Fetcher | LoopFetcher
ENGINES: dict[str, Callable[[FetchPolicy], AnyFetcher]] = {
    "threads": Fetcher,
    **{engine: functools.partial(LoopFetcher, engine_loop=loop) for engine, loop in ASYNC_LOOPS.items()},
}


def fetcher_with_limits(
    engine: str, fetch_policy: FetchPolicy, budget_bytes: int | None = None, cache: DnsCache | None = None
) -> tuple[AnyFetcher, ByteBudget | AsyncByteBudget | None]:
    """A fetcher of ``engine`` with a byte budget and a DNS cache, wired the way each engine wires them."""
    if engine in ASYNC_LOOPS:
        budget = AsyncByteBudget(budget_bytes) if budget_bytes else None
        return LoopFetcher(fetch_policy, budget, cache, ASYNC_LOOPS[engine]), budget
    if cache is not None:
        fetch_policy = replace(fetch_policy, resolver=CachedResolver(fetch_policy.resolver or system_resolver, cache))
    threads_budget = ByteBudget(budget_bytes) if budget_bytes else None
    return Fetcher(fetch_policy, budget=threads_budget), threads_budget


@pytest.fixture(scope="module", params=sorted(ENGINES))
def engine(request: pytest.FixtureRequest) -> str:
    """Which engine's fetcher the test runs on."""
    return request.param


@pytest.fixture(scope="module")
def fetcher(engine: str) -> Iterator[AnyFetcher]:
    fetcher = ENGINES[engine](policy())
    yield fetcher
    fetcher.close()


@pytest.fixture
def fetch_with(engine: str) -> Iterator[Callable[..., Callable[[str], Fetched]]]:
    """Build a fetcher of the engine with a changed policy; closed after the test."""
    made: list[AnyFetcher] = []

    def build(**changes: Any) -> Callable[[str], Fetched]:
        made.append(ENGINES[engine](policy(**changes)))
        return made[-1].fetch

    yield build
    for fetcher in made:
        fetcher.close()


def resolver_to(*addresses: str) -> Callable[[str, int], list[str]]:
    """A resolver that maps every name to ``addresses``."""
    return lambda host, port: list(addresses)


def no_dns(host: str, port: int) -> list[str]:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def assert_failed(result: Fetched, status: int | str) -> None:
    assert result.status == status, result
    assert result.data is None and result.extension is None
    assert result.error_msg and "\n" not in result.error_msg and len(result.error_msg) <= 200


def assert_image(result: Fetched, expected: bytes, extension: str) -> None:
    assert result.status is None, result
    assert result.extension == extension and result.error_msg == ""
    assert result.data == expected


# --- images -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", ["jpg", "png", "gif", "webp", "bmp", "tiff", "avif", "heic"])
def test_every_format_arrives_whole(image_server: ImageServer, fetcher: AnyFetcher, extension: str) -> None:
    result = fetcher.fetch(image_server.url(f"/img/photo-{extension}.{extension}"))
    assert_image(result, image_bytes(f"photo-{extension}", extension), extension)


def test_large_image_in_many_chunks(image_server: ImageServer, fetcher: AnyFetcher) -> None:
    result = fetcher.fetch(image_server.url("/img/large.png?size=3000000"))
    assert_image(result, image_bytes("large", "png", 3_000_000), "png")


def test_server_reports_sha256(image_server: ImageServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", image_server.port, timeout=5)
    connection.request("GET", "/img/sum.webp?size=5000")
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert body == image_bytes("sum", "webp", 5000)
    assert response.getheader("X-Content-SHA256") == hashlib.sha256(body).hexdigest()


def test_magic_number_wins_over_content_type(image_server: ImageServer, fetcher: AnyFetcher) -> None:
    assert_image(fetcher.fetch(image_server.url("/wrongtype/typed.jpg")), image_bytes("typed"), "jpg")


@pytest.mark.parametrize("path", ["/html", "/notimage", "/status/204"])
def test_bodies_that_are_no_image(image_server: ImageServer, fetcher: AnyFetcher, path: str) -> None:
    assert_failed(fetcher.fetch(image_server.url(path)), "not_image")


def test_space_and_non_ascii_path(image_server: ImageServer, fetcher: AnyFetcher) -> None:
    name = "a b ü 猫"
    assert_image(fetcher.fetch(image_server.url(f"/img/{name}.jpg")), image_bytes(name), "jpg")


def test_connections_are_reused(image_server: ImageServer, engine: str) -> None:
    fetcher = ENGINES[engine](policy())
    before = image_server.connections
    try:
        for index in range(5):
            assert fetcher.fetch(image_server.url(f"/img/reuse{index}.jpg")).status is None
        assert fetcher.fetch(image_server.url("/status/404")).status == 404
        assert fetcher.fetch(image_server.url("/redirect/2/reuse.jpg")).status is None
        assert fetcher.fetch(image_server.url("/img/last.gif")).status is None
    finally:
        fetcher.close()
    assert image_server.connections - before == 1


# --- HTTP codes, timeouts, sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [404, 500, 429, 403, 410, 503, 304])
def test_http_error_codes(image_server: ImageServer, fetcher: AnyFetcher, code: int) -> None:
    result = fetcher.fetch(image_server.url(f"/status/{code}"))
    assert_failed(result, code)
    assert result.error_msg.startswith(f"HTTP {code}")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/status/429", 1.0),
        ("/status/429?retry_after=120", 120.0),
        ("/status/503?retry_after=7", 7.0),
        ("/status/503?retry_after=Thu,%2001%20Jan%201970%2000:00:00%20GMT", 0.0),
        ("/status/503", None),
        ("/status/429?retry_after=soon", None),
        ("/status/500?retry_after=7", None),
        ("/status/404?retry_after=7", None),
        ("/redirect-to?url=/status/429%3Fretry_after%3D9", 9.0),
    ],
)
def test_retry_after_of_429_and_503(image_server: ImageServer, fetcher: Fetcher, path: str, expected) -> None:
    assert fetcher.fetch(image_server.url(path)).retry_after == expected


def test_connect_timeout(fetch_with: Callable[..., Callable[[str], Fetched]]) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue: further SYNs are dropped, so connecting hangs
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        fetch = fetch_with(connect_timeout=0.5)
        started = time.monotonic()
        result = fetch(f"http://127.0.0.1:{port}/img/x.jpg")
        assert time.monotonic() - started < 2
        assert_failed(result, "timeout")
    finally:
        for sock in [*fillers, listener]:
            sock.close()


def test_read_timeout(image_server: ImageServer, fetch_with: Callable[..., Callable[[str], Fetched]]) -> None:
    started = time.monotonic()
    assert_failed(fetch_with(read_timeout=0.5)(image_server.url("/slow/5/late.jpg")), "timeout")
    assert time.monotonic() - started < 1.5


def test_deadline_also_bounds_waiting_for_headers(
    image_server: ImageServer, fetch_with: Callable[..., Callable[[str], Fetched]]
) -> None:
    started = time.monotonic()
    assert_failed(fetch_with(download_timeout=0.5)(image_server.url("/slow/5/late.jpg")), "timeout")
    assert time.monotonic() - started < 1.5


def test_deadline_bounds_trickled_headers(
    image_server: ImageServer, fetch_with: Callable[..., Callable[[str], Fetched]]
) -> None:
    started = time.monotonic()
    assert_failed(fetch_with(download_timeout=1.0, read_timeout=2.0)(image_server.url("/trickle_headers")), "timeout")
    assert time.monotonic() - started < 2.0


def test_slow_but_in_time(image_server: ImageServer, fetcher: AnyFetcher) -> None:
    assert_image(fetcher.fetch(image_server.url("/slow/0.2/patient.jpg")), image_bytes("patient"), "jpg")


def test_trickle_ends_at_the_deadline(
    image_server: ImageServer, fetch_with: Callable[..., Callable[[str], Fetched]]
) -> None:
    started = time.monotonic()
    result = fetch_with(download_timeout=2.0, read_timeout=10.0)(image_server.url("/trickle"))
    elapsed = time.monotonic() - started
    assert_failed(result, "timeout")
    assert 1.9 <= elapsed < 3


@pytest.mark.parametrize("path", ["/endless", "/huge/100", "/huge/100?chunked=1", "/gzipbomb"])
def test_bodies_over_the_cap(
    image_server: ImageServer, fetch_with: Callable[..., Callable[[str], Fetched]], path: str
) -> None:
    fetch = fetch_with(max_bytes=MIB)
    gzip_bomb()  # computed once by the server; not part of what is measured
    tracemalloc.start()
    started = time.monotonic()
    try:
        result = fetch(image_server.url(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_failed(result, "too_large")
    assert time.monotonic() - started < 3
    assert peak < 8 * MIB


def test_announced_length_is_refused_unread(image_server: ImageServer, fetcher: AnyFetcher) -> None:
    result = fetcher.fetch(image_server.url("/huge/100"))
    assert_failed(result, "too_large")
    assert "Content-Length" in result.error_msg


def test_body_just_under_the_cap(
    image_server: ImageServer, fetch_with: Callable[..., Callable[[str], Fetched]]
) -> None:
    result = fetch_with(max_bytes=2 * MIB)(image_server.url("/huge/2?chunked=1"))
    assert result.status is None and result.extension == "jpg" and len(result.data or b"") == 2 * MIB


# --- redirects -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hops", [1, 3, 5])
def test_redirect_chain(image_server: ImageServer, fetcher: AnyFetcher, hops: int) -> None:
    result = fetcher.fetch(image_server.url(f"/redirect/{hops}/moved {hops}.jpg"))
    assert_image(result, image_bytes(f"moved {hops}"), "jpg")


def test_too_many_redirects(image_server: ImageServer, fetcher: AnyFetcher) -> None:
    assert_failed(fetcher.fetch(image_server.url("/redirect/6/far.jpg")), "redirects")


def test_no_redirects_allowed(image_server: ImageServer, fetch_with: Callable[..., Callable[[str], Fetched]]) -> None:
    assert_failed(fetch_with(max_redirects=0)(image_server.url("/redirect/1/near.jpg")), "redirects")


def test_redirect_loop(image_server: ImageServer, fetcher: AnyFetcher) -> None:
    before = image_server.requests
    assert_failed(fetcher.fetch(image_server.url("/loop")), "redirects")
    assert image_server.requests - before == 1


@pytest.mark.parametrize("status", [301, 303, 307, 308])
def test_redirect_codes(image_server: ImageServer, fetcher: AnyFetcher, status: int) -> None:
    target = quote(image_server.url("/img/target.jpg"), safe="")
    result = fetcher.fetch(image_server.url(f"/redirect-to?status={status}&url={target}"))
    assert_image(result, image_bytes("target"), "jpg")


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://example.test/a.jpg", "javascript:alert(1)"])
def test_redirect_to_another_scheme(image_server: ImageServer, fetcher: AnyFetcher, target: str) -> None:
    assert_failed(fetcher.fetch(image_server.url(f"/redirect-to?url={quote(target, safe='')}")), "bad_url")


# --- opt-out ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "directive",
    ["noai", "noimageai", "noindex", "noimageindex", "NoAI", "otherbot: noai", "noindex, nofollow", "all,noimageai"],
)
def test_robots_opt_out(image_server: ImageServer, fetcher: AnyFetcher, directive: str) -> None:
    result = fetcher.fetch(image_server.url(f"/optout/{quote(directive)}/private.jpg"))
    assert_failed(result, "disallowed")


@pytest.mark.parametrize("directive", ["all", "nofollow", "noarchive, nosnippet", "max-image-preview:large"])
def test_other_robots_directives(image_server: ImageServer, fetcher: AnyFetcher, directive: str) -> None:
    result = fetcher.fetch(image_server.url(f"/optout/{quote(directive)}/public.jpg"))
    assert_image(result, image_bytes("public"), "jpg")


def test_custom_directives(image_server: ImageServer, fetch_with: Callable[..., Callable[[str], Fetched]]) -> None:
    fetch = fetch_with(disallowed_directives=frozenset({"NoTrain"}))
    assert_failed(fetch(image_server.url("/optout/notrain/a.jpg")), "disallowed")
    assert fetch(image_server.url("/optout/noai/a.jpg")).status is None


@pytest.mark.parametrize("value", ["1", " 1 ", "1, 1"])
def test_tdm_reservation(image_server: ImageServer, fetcher: AnyFetcher, value: str) -> None:
    result = fetcher.fetch(image_server.url(f"/tdm/{quote(value)}/reserved.jpg"))
    assert_failed(result, "disallowed")
    assert "tdm-reservation" in result.error_msg


@pytest.mark.parametrize("value", ["0", " 0 ", "", "yes"])
def test_no_tdm_reservation(image_server: ImageServer, fetcher: AnyFetcher, value: str) -> None:
    result = fetcher.fetch(image_server.url(f"/tdm/{quote(value)}/open.jpg"))
    assert_image(result, image_bytes("open"), "jpg")


def test_tdm_reservation_of_a_redirect_target(image_server: ImageServer, fetcher: AnyFetcher) -> None:
    target = quote(image_server.url("/tdm/1/reserved.jpg"), safe="")
    assert_failed(fetcher.fetch(image_server.url(f"/redirect-to?url={target}")), "disallowed")


def test_tdm_reservation_not_honoured(
    image_server: ImageServer, fetch_with: Callable[..., Callable[[str], Fetched]]
) -> None:
    fetch = fetch_with(honour_tdm_reservation=False)
    assert_image(fetch(image_server.url("/tdm/1/research.jpg")), image_bytes("research"), "jpg")


# --- the settings' policy: User-Agent and TDM reservation ----------------------------------------------------------


def settings_fetcher(engine: str, **variables: str) -> AnyFetcher:
    """A fetcher of ``engine`` with the policy that setting.py and ``LAION_*`` ``variables`` make, loopback allowed."""
    loaded = config.load(setting, {"LAION_ALLOWED_NETWORKS": "127.0.0.0/8", **variables})
    return ENGINES[engine](fetch_policy(loaded))


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, AGENT),
        ({"LAION_USER_AGENT_CONTACT": "https://example.org/crawler"}, f"{AGENT} (+https://example.org/crawler)"),
        ({"LAION_USER_AGENT_CONTACT": "mailto:ops@example.org"}, f"{AGENT} (+mailto:ops@example.org)"),
        ({"LAION_USER_AGENT": "my-crawler/2.0"}, "my-crawler/2.0"),
    ],
)
def test_user_agent_names_the_tool_its_version_and_contact(
    image_server: ImageServer, engine: str, variables: dict[str, str], expected: str
) -> None:
    fetcher = settings_fetcher(engine, **variables)
    name = f"{engine}-{len(expected)}"
    try:
        assert_image(fetcher.fetch(image_server.url(f"/agent/{name}.jpg")), image_bytes(name), "jpg")
    finally:
        fetcher.close()
    assert image_server.user_agent(name) == expected


def test_tdm_reservation_setting(image_server: ImageServer, engine: str) -> None:
    honouring, ignoring = settings_fetcher(engine), settings_fetcher(engine, LAION_HONOUR_TDM_RESERVATION="0")
    try:
        assert_failed(honouring.fetch(image_server.url("/tdm/1/set.jpg")), "disallowed")
        assert_image(ignoring.fetch(image_server.url("/tdm/1/set.jpg")), image_bytes("set"), "jpg")
    finally:
        honouring.close()
        ignoring.close()


# --- connection errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/reset", "/badgzip"])
def test_broken_responses(image_server: ImageServer, fetcher: AnyFetcher, path: str) -> None:
    assert_failed(fetcher.fetch(image_server.url(path)), "connection")


def test_redirect_without_location_is_its_code(image_server: ImageServer, fetcher: AnyFetcher) -> None:
    assert_failed(fetcher.fetch(image_server.url("/status/302")), 302)


def test_proxy_settings_of_the_environment_are_ignored(
    image_server: ImageServer, monkeypatch: pytest.MonkeyPatch, connects: list[str], engine: str
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://10.9.9.9:3128")
    monkeypatch.setenv("NO_PROXY", "")
    fetcher = ENGINES[engine](policy())
    try:
        assert_image(fetcher.fetch(image_server.url("/img/direct.jpg")), image_bytes("direct"), "jpg")
    finally:
        fetcher.close()
    assert connects == ["127.0.0.1"]


def test_refused(fetcher: AnyFetcher) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert_failed(fetcher.fetch(f"http://127.0.0.1:{port}/img/x.jpg"), "connection")


def test_tls_to_a_plain_http_server(image_server: ImageServer, fetcher: AnyFetcher) -> None:
    assert_failed(fetcher.fetch(f"https://127.0.0.1:{image_server.port}/img/x.jpg"), "ssl")


def test_dns_failure(fetch_with: Callable[..., Callable[[str], Fetched]], connects: list[str]) -> None:
    assert_failed(fetch_with(resolver=no_dns)("http://missing.test/a.jpg"), "dns")
    assert connects == []


def test_resolved_name_is_connected_by_address(
    image_server: ImageServer, fetch_with: Callable[..., Callable[[str], Fetched]], connects: list[str]
) -> None:
    asked: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["127.0.0.1"]

    result = fetch_with(resolver=resolver)(f"http://images.test:{image_server.port}/img/named.jpg")
    assert_image(result, image_bytes("named"), "jpg")
    assert asked == [("images.test", image_server.port)]
    assert connects == ["127.0.0.1"]


# --- address guard ---------------------------------------------------------------------------------------------


def test_default_policy_refuses_loopback_without_connecting(
    image_server: ImageServer, connects: list[str], engine: str
) -> None:
    fetcher = ENGINES[engine](FetchPolicy())
    requests_before, connections_before = image_server.requests, image_server.connections
    try:
        result = fetcher.fetch(image_server.url("/img/guarded.jpg"))
    finally:
        fetcher.close()
    assert_failed(result, "blocked_address")
    assert connects == []
    assert (image_server.requests, image_server.connections) == (requests_before, connections_before)


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "169.254.169.254",
        "192.168.1.1",
        "172.16.5.4",
        "100.64.0.1",
        "::1",
        "fc00::1",
        "fe80::1",
        "224.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "240.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "2002:a00:1::1",
        "64:ff9b::a9fe:a9fe",
        "::",
    ],
)
def test_private_addresses_are_refused_before_connecting(
    fetch_with: Callable[..., Callable[[str], Fetched]], connects: list[str], address: str
) -> None:
    result = fetch_with(resolver=resolver_to(address))("http://internal.test/a.jpg")
    assert_failed(result, "blocked_address")
    assert connects == []


@pytest.mark.parametrize("address", ["127.0.0.1", "::ffff:127.0.0.1", "127.1.2.3"])
def test_loopback_is_refused_by_default(address: str, connects: list[str], engine: str) -> None:
    fetcher = ENGINES[engine](FetchPolicy(resolver=resolver_to(address)))
    try:
        assert_failed(fetcher.fetch("http://localhost.test/a.jpg"), "blocked_address")
    finally:
        fetcher.close()
    assert connects == []


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "https://192.168.1.1/a.jpg",
        "http://[::1]:8080/a.jpg",
        "http://[fe80::1]/a.jpg",
        "http://[::ffff:a9fe:a9fe]/a.jpg",
        "http://100.64.0.1/a.jpg",
    ],
)
def test_ip_literal_hosts_are_refused(fetcher: AnyFetcher, connects: list[str], url: str) -> None:
    assert_failed(fetcher.fetch(url), "blocked_address")
    assert connects == []


def test_only_allowed_addresses_of_a_name_are_tried(
    image_server: ImageServer, fetch_with: Callable[..., Callable[[str], Fetched]], connects: list[str]
) -> None:
    fetch = fetch_with(resolver=resolver_to("10.0.0.1", "169.254.169.254", "127.0.0.1"))
    assert_image(fetch(f"http://mixed.test:{image_server.port}/img/mixed.jpg"), image_bytes("mixed"), "jpg")
    assert connects == ["127.0.0.1"]


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1:8080/admin",
        "http://[::1]/",
        "http://internal.test/",
    ],
)
def test_redirect_to_a_private_address_is_refused(
    image_server: ImageServer,
    fetch_with: Callable[..., Callable[[str], Fetched]],
    connects: list[str],
    target: str,
) -> None:
    fetch = fetch_with(resolver=resolver_to("10.1.2.3"))
    assert_failed(fetch(image_server.url(f"/redirect-to?url={quote(target, safe='')}")), "blocked_address")
    assert connects == ["127.0.0.1"]


# --- URLs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.test/a.jpg",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "mailto:someone@example.test",
        "//example.test/a.jpg",
        "example.test/a.jpg",
        "",
        "http://",
        "https://:80/",
        "http://[::1",
        "http://exa mple.test/",
        "http://a..b/",
        "http://example.test:99999/",
        "http://" + "a" * 64 + ".test/",
        "http://example.test/" + "a" * MAX_URL_CHARS,
    ],
)
def test_bad_urls(fetch_with: Callable[..., Callable[[str], Fetched]], connects: list[str], url: str) -> None:
    assert_failed(fetch_with(resolver=no_dns)(url), "bad_url")
    assert connects == []


def test_credentials_are_sent_and_never_reported(image_server: ImageServer, fetcher: AnyFetcher) -> None:
    base = f"http://user:s3cr%40t@127.0.0.1:{image_server.port}"
    assert_image(fetcher.fetch(base + "/img/private.jpg"), image_bytes("private"), "jpg")
    failures = [
        fetcher.fetch(base + "/status/404"),
        fetcher.fetch("http://user:s3cr%40t@127.0.0.1:1/img/x.jpg"),
        fetcher.fetch("http://user:s3cr%40t@10.0.0.1/img/x.jpg"),
        fetcher.fetch("http://user:s3cr%40t@/img/x.jpg"),
        fetcher.fetch(image_server.url("/redirect-to?url=" + quote("http://user:s3cr%40t@[zz]/x.jpg", safe=""))),
    ]
    assert [failure.status for failure in failures] == [404, "connection", "blocked_address", "bad_url", "bad_url"]
    for failure in failures:
        assert "s3cr" not in failure.error_msg, failure


@pytest.fixture(scope="module")
def garbage_fetcher(engine: str) -> Iterator[AnyFetcher]:
    """Default policy (nothing private allowed), no DNS, short limits."""
    fetcher = ENGINES[engine](FetchPolicy(resolver=no_dns, connect_timeout=0.5, read_timeout=0.5, download_timeout=1))
    yield fetcher
    fetcher.close()


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.text(max_size=60),
        st.text(max_size=60).map(lambda text: "http://" + text),
        st.text(alphabet="htps:/[]@%?#.:-0123456789abcdef \t\x00é", max_size=40),
    )
)
def test_garbage_never_raises(garbage_fetcher: AnyFetcher, url: str) -> None:
    result = garbage_fetcher.fetch(url)
    assert isinstance(result, Fetched)
    assert result.status in STATUS_WORDS or isinstance(result.status, int), result
    assert len(result.error_msg) <= 200 and "\n" not in result.error_msg


# --- TLS -------------------------------------------------------------------------------------------------------


@pytest.fixture
def tls_listener(tmp_path: Path) -> Iterator[tuple[int, list[str | None]]]:
    """A TLS server on 127.0.0.1 with a self-signed certificate for images.test; records the SNI it is sent."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=images.test"),
            *("-addext", "subjectAltName=DNS:images.test"),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve() -> None:
        with contextlib.suppress(OSError):  # the client rejects the self-signed certificate: the handshake fails
            connection, _ = listener.accept()
            with connection, context.wrap_socket(connection, server_side=True) as tls:
                tls.recv(1024)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], names
    listener.close()
    thread.join(5)


def test_tls_uses_the_url_host_for_sni_and_certificate(
    tls_listener: tuple[int, list[str | None]], fetch_with: Callable[..., Callable[[str], Fetched]]
) -> None:
    port, names = tls_listener
    result = fetch_with(resolver=resolver_to("127.0.0.1"))(f"https://images.test:{port}/a.jpg")
    assert_failed(result, "ssl")
    assert "certificate" in result.error_msg.lower()
    assert names == ["images.test"]


def test_idna_host_is_resolved_in_its_ascii_form(image_server: ImageServer, fetch_with) -> None:
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    fetch = fetch_with(resolver=resolver)
    result = fetch(f"http://bücher.test:{image_server.port}/img/idna.jpg")
    assert_image(result, image_bytes("idna", "jpg"), "jpg")
    assert asked == ["xn--bcher-kva.test"]


def test_tls_ca_file_is_trusted(tmp_path: Path, engine: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    ca, cert, key = make_certificates(tmp_path, "DNS:images.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ImageServer(tls=context)
    server.start()
    url = f"https://images.test:{server.port}/img/secure.jpg"
    trusting = ENGINES[engine](policy(resolver=resolver_to("127.0.0.1"), tls_ca_file=str(ca)))
    default = ENGINES[engine](policy(resolver=resolver_to("127.0.0.1")))
    try:
        assert_image(trusting.fetch(url), image_bytes("secure"), "jpg")
        assert_failed(default.fetch(url), "ssl")
        assert_failed(trusting.fetch(f"https://other.test:{server.port}/img/secure.jpg"), "ssl")  # wrong name
    finally:
        trusting.close()
        default.close()
        server.stop()


# --- politeness and limits ------------------------------------------------------------------------------------


@pytest.fixture
def sentinel() -> Iterator[tuple[int, list[object]]]:
    """A listener on 127.0.0.2 that counts the connections it accepts."""
    listener = socket.create_server(("127.0.0.2", 0))
    listener.settimeout(0.2)
    accepted: list[object] = []
    running = threading.Event()
    running.set()

    def accept() -> None:
        while running.is_set():
            with contextlib.suppress(OSError):
                connection, address = listener.accept()
                accepted.append(address)
                connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1], accepted
    running.clear()
    thread.join(2)
    listener.close()


def test_a_refused_address_sees_no_connection(
    image_server: ImageServer, sentinel: tuple[int, list[object]], engine: str, connects: list[str]
) -> None:
    port, accepted = sentinel
    guarded = ENGINES[engine](policy(allowed_networks=(ip_network("127.0.0.1/32"),), resolver=resolver_to("127.0.0.2")))
    target = quote(f"http://127.0.0.2:{port}/a.jpg", safe="")
    try:
        for url in (
            f"http://127.0.0.2:{port}/a.jpg",
            f"http://sentinel.test:{port}/a.jpg",
            image_server.url(f"/redirect-to?url={target}"),
        ):
            assert_failed(guarded.fetch(url), "blocked_address")
    finally:
        guarded.close()
    time.sleep(0.3)
    assert accepted == []
    assert "127.0.0.2" not in connects


def test_dns_answers_and_failures_are_cached(image_server: ImageServer, engine: str) -> None:
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        if host == "dead.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return ["127.0.0.1"]

    cache = DnsCache(300, negative_ttl=0.5)
    fetcher, _ = fetcher_with_limits(engine, policy(resolver=resolver), cache=cache)
    try:
        for index in range(5):
            assert fetcher.fetch(f"http://cached.test:{image_server.port}/img/c{index}.jpg").status is None
            assert_failed(fetcher.fetch(f"http://dead.test:{image_server.port}/img/d{index}.jpg"), "dns")
        assert asked == ["cached.test", "dead.test"]
        time.sleep(0.6)  # a failed look-up is asked again once its short time is up; the answer is still kept
        assert_failed(fetcher.fetch(f"http://dead.test:{image_server.port}/img/again.jpg"), "dns")
        assert fetcher.fetch(f"http://cached.test:{image_server.port}/img/again.jpg").status is None
        assert asked == ["cached.test", "dead.test", "dead.test"]
    finally:
        fetcher.close()


def test_body_budget_holds_with_endless_bodies(image_server: ImageServer, engine: str) -> None:
    limit = 3 * MIB
    fetcher, budget = fetcher_with_limits(engine, policy(max_bytes=2 * MIB, download_timeout=3.0), budget_bytes=limit)
    assert budget is not None
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(fetcher.fetch, [image_server.url("/endless")] * 4))
        assert {result.status for result in results} <= {"too_large", "gave_way"}  # budget waits: local pressure
        assert any(result.status == "too_large" for result in results)
        kept = fetcher.fetch(image_server.url("/img/kept.png?size=100000"))
        assert kept.status is None and budget.used == 100_000  # held until the image is stored
        fetcher.release(kept)
        time.sleep(0.1)
    finally:
        fetcher.close()
    assert 2 * MIB < budget.peak <= limit
    assert budget.used == 0
