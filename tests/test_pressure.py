"""Local pressure is not a remote failure, bounds, truncation (issue 17, findings 9-12): real loopback servers, and
real workers on a real Redis where a whole run is the proof."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from ipaddress import ip_network
from typing import Any

import pytest

from laion5b.aiofetch import AsyncFetcher
from laion5b.fetch import Fetcher
from laion5b.fetchpolicy import Fetched, FetchPolicy
from laion5b.tasks import is_transient
from tools.image_server import ImageServer

LOOPBACK = (ip_network("127.0.0.0/8"),)
MIB = 1024 * 1024


def policy(**changes: Any) -> FetchPolicy:
    """A test policy: loopback allowed, limits small enough for quick tests."""
    values: dict[str, Any] = {
        "allowed_networks": LOOPBACK,
        "connect_timeout": 2.0,
        "read_timeout": 2.0,
        "download_timeout": 5.0,
        "max_bytes": 16 * MIB,
    }
    values.update(changes)
    return FetchPolicy(**values)


def fetch_async(fetch_policy: FetchPolicy, urls: list[str], **options: Any) -> list[Fetched]:
    """Fetch ``urls`` at once with one AsyncFetcher on an event loop of its own."""

    async def run() -> list[Fetched]:
        fetcher = AsyncFetcher(fetch_policy, **options)
        try:
            return list(await asyncio.gather(*(fetcher.fetch(url) for url in urls)))
        finally:
            await fetcher.close()

    return asyncio.run(run())


def fetch_threads(fetch_policy: FetchPolicy, urls: list[str]) -> list[Fetched]:
    """Fetch ``urls`` one after the other with one threads-engine Fetcher."""
    fetcher = Fetcher(fetch_policy)
    try:
        return [fetcher.fetch(url) for url in urls]
    finally:
        fetcher.close()


ENGINES: dict[str, Callable[[FetchPolicy, list[str]], list[Fetched]]] = {
    "threads": fetch_threads,
    "async": fetch_async,
}


@pytest.fixture(params=sorted(ENGINES))
def fetch_all(request: pytest.FixtureRequest) -> Iterator[Callable[[FetchPolicy, list[str]], list[Fetched]]]:
    yield ENGINES[request.param]


# --- finding 11: a body cut short is truncated, never stored ---------------------------------------------------------


def test_a_cut_body_is_truncated_on_both_engines(image_server: ImageServer, fetch_all: Callable[..., Any]) -> None:
    """A gzip body without its end (its HTTP length complete) and a plain body shorter than its Content-Length are
    ``truncated`` (transient), not an image; a whole gzip body still arrives."""
    cut, short = fetch_all(policy(), [image_server.url("/gzipcut/cut.jpg"), image_server.url("/truncated")])
    for result in (cut, short):
        assert result.status == "truncated" and result.data is None, result
        assert result.error_msg and "\n" not in result.error_msg
    assert is_transient("truncated")
