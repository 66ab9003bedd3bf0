"""Local pressure is not a remote failure, bounds, truncation (issue 17, findings 9-12): real loopback servers, and
real workers on a real Redis where a whole run is the proof."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import resource
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from laion5b.aiofetch import AsyncFetcher
from laion5b.dnscache import BlockingLookups
from laion5b.fetch import Fetcher
from laion5b.fetchpolicy import Fetched, FetchPolicy
from laion5b.keys import Keys
from laion5b.tasks import Task, is_transient
from tests.helpers import ASYNC_LOOPS, ENGINE_IDS, ROOT, engine_env, run_on_loop, run_script, wait_until
from tests.redis_server import RedisServer
from tests.test_downloader import run_worker
from tests.test_fetch import MIB, fetcher_with_limits, policy
from tools.image_server import ImageServer, image_bytes

KEYS = Keys()


def fetch_async(fetch_policy: FetchPolicy, urls: list[str], engine: str = "async", **options: Any) -> list[Fetched]:
    """Fetch ``urls`` at once with one AsyncFetcher on an event loop of its own (``engine``'s loop)."""

    async def run() -> list[Fetched]:
        fetcher = AsyncFetcher(fetch_policy, **options)
        try:
            return list(await asyncio.gather(*(fetcher.fetch(url) for url in urls)))
        finally:
            await fetcher.close()

    return run_on_loop(engine, run())


def fetch_threads(fetch_policy: FetchPolicy, urls: list[str]) -> list[Fetched]:
    """Fetch ``urls`` one after the other with one threads-engine Fetcher."""
    fetcher = Fetcher(fetch_policy)
    try:
        return [fetcher.fetch(url) for url in urls]
    finally:
        fetcher.close()


ENGINES: dict[str, Callable[[FetchPolicy, list[str]], list[Fetched]]] = {
    "threads": fetch_threads,
    **{engine: functools.partial(fetch_async, engine=engine) for engine in ASYNC_LOOPS},
}


@pytest.fixture(params=sorted(ENGINES))
def fetch_all(request: pytest.FixtureRequest) -> Iterator[Callable[[FetchPolicy, list[str]], list[Fetched]]]:
    yield ENGINES[request.param]


# --- finding 11: a body cut short is truncated, never stored ---------------------------------------------------------


def test_a_cut_body_is_truncated_on_both_engines(image_server: ImageServer, fetch_all: Callable[..., Any]) -> None:
    """A gzip body without its end (its HTTP length complete) and a plain body shorter than its Content-Length are
    ``truncated`` (transient), not an image; a whole gzip body still arrives."""
    urls = [image_server.url(path) for path in ("/gzip/cut.jpg?cut=1", "/truncated", "/gzip/whole.jpg")]
    cut, short, whole = fetch_all(policy(), urls)
    for result in (cut, short):
        assert result.status == "truncated" and result.data is None, result
        assert result.error_msg and "\n" not in result.error_msg
    assert is_transient("truncated")
    assert whole.status is None and whole.data == image_bytes("whole"), whole


# --- finding 9: waiting for byte budget is local pressure ------------------------------------------------------------


def queue_tasks(client, urls: list[str]) -> list[Task]:
    """Queue one task per URL, counted as added."""
    tasks = [Task(id=f"id{row}", url=url, subset="s", part="p", row=row) for row, url in enumerate(urls)]
    client.lpush(KEYS.task, *[task.encode() for task in tasks])
    client.incrby(KEYS.tongji_all, len(tasks))
    return tasks


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_downloads_that_wait_for_budget_are_stored_without_using_attempts(
    redis_server: RedisServer, script_env: dict[str, str], image_server: ImageServer, engine: str
) -> None:
    """Eight downloads of 1.5 MB images share a budget of 2 MiB: most must wait or give way. With one attempt per
    task, a wait counted as a failure would lose the image; every one is stored, no ``timeout`` is recorded."""
    env = {
        **script_env,
        **engine_env(engine),
        "LAION_CONCURRENCY": "8",
        "LAION_THREAD_NUM": "8",
        "LAION_ALLOWED_NETWORKS": "127.0.0.0/8",
        "LAION_MAX_ATTEMPTS": "1",
        "LAION_DOWNLOAD_TIMEOUT": "2",
        "LAION_MAX_IMAGE_BYTES": str(2 * MIB),
        "LAION_MAX_INFLIGHT_BYTES": str(2 * MIB),
        "LAION_SAVE_METADATA": "1",
    }
    client = redis_server.client()
    urls = [image_server.url(f"/img/big{row}.jpg?size=1500000") for row in range(16)]
    tasks = queue_tasks(client, urls)
    result = run_worker(env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert client.lrange(KEYS.error, 0, -1) == [], "a wait for budget was recorded as a failure"
    assert int(client.get(KEYS.tongji_succ) or 0) == len(tasks)
    metadata = [json.loads(path.read_text()) for path in Path(env["LAION_STORE_DIR"]).rglob("*.json")]
    assert [item["attempts"] for item in metadata] == [1] * len(tasks)  # each stored at its first counted attempt
    retried = re.search(r"worker_exit .* retried=(\d+)", result.stderr)
    assert retried is not None and int(retried.group(1)) > 0, "no download had to wait: the test proves nothing"


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_a_download_that_lost_most_of_its_time_to_the_budget_gave_way(image_server: ImageServer, engine: str) -> None:
    """Another download holds the whole budget for 1.2 s of a 2 s deadline; once granted, the trickling body cannot
    finish in the time left. That is local pressure (gave_way, no attempt used), not a timeout of the URL."""
    fetcher, budget = fetcher_with_limits(engine, policy(download_timeout=2.0), budget_bytes=MIB)
    assert budget is not None
    hold = budget.take(MIB, 0, time.monotonic() + 5) if engine == "threads" else fetcher._call(budget.take(MIB, 0))
    assert hold
    give = budget.give if engine == "threads" else lambda size: fetcher._loop.call_soon_threadsafe(budget.give, size)
    releaser = threading.Timer(1.2, give, args=(MIB,))
    releaser.start()
    try:
        pressed = fetcher.fetch(image_server.url("/trickle"))
        plain = fetcher.fetch(image_server.url("/trickle"))
    finally:
        releaser.join()
        fetcher.close()
    assert (pressed.status, plain.status) == ("gave_way", "timeout"), (pressed.error_msg, plain.error_msg)
    assert "waited" in pressed.error_msg


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_waiting_for_a_host_slot_does_not_use_the_download_deadline(
    redis_server: RedisServer, script_env: dict[str, str], image_server: ImageServer, engine: str
) -> None:
    """One download at a time to the host, four of 1.2 s each, a deadline of 2 s and one attempt: the last waits
    3.6 s for its slot, longer than its deadline, and is still stored (the deadline starts with the download)."""
    env = {
        **script_env,
        **engine_env(engine),
        "LAION_CONCURRENCY": "4",
        "LAION_THREAD_NUM": "4",
        "LAION_ALLOWED_NETWORKS": "127.0.0.0/8",
        "LAION_MAX_ATTEMPTS": "1",
        "LAION_MAX_PER_HOST": "1",
        "LAION_DOWNLOAD_TIMEOUT": "2",
    }
    client = redis_server.client()
    urls = [image_server.url(f"/slow/1.2/parked{row}.jpg") for row in range(4)]
    tasks = queue_tasks(client, urls)
    result = run_worker(env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert client.lrange(KEYS.error, 0, -1) == []
    assert int(client.get(KEYS.tongji_succ) or 0) == len(tasks)


class HangingResolver:
    """A resolver at the ``Resolver`` seam: names starting with ``dead`` hang in it (as getaddrinfo can) until
    ``revive`` or ``release``; every other name answers 127.0.0.1 at once. ``asked`` counts look-ups by name."""

    def __init__(self) -> None:
        self.asked: dict[str, int] = {}
        self.revived: set[str] = set()
        self.released = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, host: str, port: int) -> list[str]:
        with self._lock:
            self.asked[host] = self.asked.get(host, 0) + 1
        if host.startswith("dead") and host not in self.revived and not self.released.wait(30):
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return ["127.0.0.1"]

    def revive(self, host: str) -> None:
        self.revived.add(host)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("engine", sorted(ASYNC_LOOPS))
def test_dead_names_do_not_hold_up_live_ones(image_server: ImageServer, engine: str) -> None:
    """80 names whose look-ups hang (more than the old pool's 64 threads) and 20 live names, all at once: the live
    images arrive at once, the dead names end as ``dns`` after dns_timeout, not as a download ``timeout``; the next
    look-up of a dead name is made again, and once it answers its image arrives."""
    resolver = HangingResolver()
    fetch_policy = policy(resolver=resolver, dns_timeout=0.5, download_timeout=4.0)
    dead = [f"http://dead{number}.test:{image_server.port}/img/d{number}.jpg" for number in range(80)]
    live = [f"http://live{number}.test:{image_server.port}/img/l{number}.jpg" for number in range(20)]

    async def timed(fetcher: AsyncFetcher, url: str) -> tuple[Fetched, float]:
        started = time.monotonic()
        result = await fetcher.fetch(url)
        return result, time.monotonic() - started

    async def run() -> tuple[list[tuple[Fetched, float]], Fetched]:
        fetcher = AsyncFetcher(fetch_policy)
        try:
            results = await asyncio.gather(*(timed(fetcher, url) for url in dead + live))
            resolver.revive("dead0.test")
            return list(results), await fetcher.fetch(dead[0])
        finally:
            resolver.released.set()
            await fetcher.close()

    results, again = run_on_loop(engine, run())
    dead_results, live_results = results[: len(dead)], results[len(dead) :]
    assert [result.status for result, _ in live_results] == [None] * len(live)
    assert max(seconds for _, seconds in live_results) < 2.0  # held up behind the dead names, they took 4 s
    assert {result.status for result, _ in dead_results} == {"dns"}
    assert all("within 0.5 s" in result.error_msg for result, _ in dead_results)
    assert max(seconds for _, seconds in dead_results) < 3.0
    assert again.status is None and resolver.asked["dead0.test"] == 2


def test_a_hung_look_up_is_dns_on_the_threads_engine(image_server: ImageServer) -> None:
    """The threads engine's look-ups (as the worker wires them) are given up after dns_timeout too, and the next
    look-up of the name is made again."""
    resolver = HangingResolver()
    fetcher = Fetcher(policy(resolver=BlockingLookups(resolver, 0.5, 4)))
    try:
        started = time.monotonic()
        hung = fetcher.fetch(f"http://dead.test:{image_server.port}/img/hung.jpg")
        assert hung.status == "dns" and time.monotonic() - started < 2.0, hung
        resolver.revive("dead.test")
        assert fetcher.fetch(f"http://dead.test:{image_server.port}/img/hung.jpg").status is None
        assert resolver.asked["dead.test"] == 2
    finally:
        resolver.released.set()
        fetcher.close()


@pytest.mark.parametrize("engine", sorted(ASYNC_LOOPS))
def test_a_download_waiting_for_a_dns_thread_gives_way(image_server: ImageServer, engine: str) -> None:
    """With every look-up thread taken by a hanging name, a live name waits for a turn: when its download deadline
    passes meanwhile, it gave way to local pressure (no attempt used), it did not time out."""
    resolver = HangingResolver()

    async def run() -> list[Fetched]:
        fetcher = AsyncFetcher(policy(resolver=resolver, dns_timeout=5.0, download_timeout=0.5), dns_threads=1)
        try:
            urls = [f"http://{name}.test:{image_server.port}/img/wait.jpg" for name in ("dead", "live")]
            return list(await asyncio.gather(*(fetcher.fetch(url) for url in urls)))
        finally:
            resolver.released.set()
            await fetcher.close()

    dead, live = run_on_loop(engine, run())
    assert dead.status == "timeout"  # its own look-up ran out the download's time
    assert live.status == "gave_way" and "DNS look-up thread" in live.error_msg, live


# --- finding 10: bounds -----------------------------------------------------------------------------------------------


def _client_sockets(port: int) -> int:
    """This process's open client connections to ``port`` (the server, in the same process, is not counted)."""
    connections = psutil.Process().net_connections("tcp")
    return sum(1 for c in connections if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


@pytest.mark.parametrize("engine", sorted(ASYNC_LOOPS))
def test_idle_connections_are_bounded(image_server: ImageServer, engine: str) -> None:
    """Twelve hosts fetched at once leave at most ``max_idle`` connections open once they are idle."""
    fetch_policy = policy(resolver=lambda host, port: ["127.0.0.1"])
    urls = [f"http://host{number}.test:{image_server.port}/img/idle{number}.jpg" for number in range(12)]

    async def run() -> tuple[list[Fetched], int, int]:
        fetcher = AsyncFetcher(fetch_policy, max_idle=4)
        try:
            results = await asyncio.gather(*(fetcher.fetch(url) for url in urls))
            await asyncio.sleep(0.2)  # closed transports let go of their sockets on the next turns of the loop
            return list(results), fetcher.connector.idle(), _client_sockets(image_server.port)
        finally:
            await fetcher.close()

    results, idle, sockets = run_on_loop(engine, run())
    assert [result.status for result in results] == [None] * len(urls)
    assert idle == 4 and sockets <= 4


@pytest.fixture
def server_process() -> Iterator[str]:
    """The image server in a process of its own (its memory is not this process's); its base URL. Per test: every
    process a test leaves behind is killed (conftest)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(ROOT / "tools" / "image_server.py"), "--port", str(port)])
    try:
        wait_until(lambda: _accepts(port), timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _traced(fetch: Callable[[str], Fetched], url: str) -> tuple[Fetched, int]:
    """Fetch ``url`` and return the result and the peak of memory allocated meanwhile."""
    tracemalloc.start()
    try:
        result = fetch(url)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def peak_of_fetch(engine: str, url: str) -> tuple[Fetched, int]:
    """The result of fetching ``url`` with a warmed-up fetcher of ``engine``, and the peak memory of that fetch."""
    if engine == "threads":
        fetcher = Fetcher(policy(max_bytes=16 * MIB))
        try:
            fetcher.fetch(url.replace("copy.", "warm.").partition("?")[0])
            return _traced(fetcher.fetch, url)
        finally:
            fetcher.close()

    async def run() -> tuple[Fetched, int]:
        fetcher = AsyncFetcher(policy(max_bytes=16 * MIB))
        try:
            await fetcher.fetch(url.replace("copy.", "warm.").partition("?")[0])
            tracemalloc.start()
            try:
                result = await fetcher.fetch(url)
                return result, tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        finally:
            await fetcher.close()

    return run_on_loop(engine, run())


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_a_body_is_not_copied_once_more(server_process: str, engine: str) -> None:
    """An 8 MB body costs about 8 MB at its peak, not twice that: the fetched image is the body's buffer itself."""
    size = 8 * MIB
    result, peak = peak_of_fetch(engine, f"{server_process}/img/copy.png?size={size}")
    assert result.status is None and result.data is not None and len(result.data) == size
    assert peak < 1.5 * size, f"peak {peak / MIB:.1f} MiB for a body of {size / MIB:.0f} MiB"


def test_open_files_needed_count_idle_connections(script_env: dict[str, str]) -> None:
    """100 downloads in flight need 456 files, and 256 idle kept-alive connections more: a hard limit of 600 is too
    low, and the worker says so instead of running out of files later."""
    result = subprocess.run(
        [*run_script("downloader.py"), "0", "--until-empty"],
        env={**script_env, "LAION_ENGINE": "async", "LAION_CONCURRENCY": "100"},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (600, 600)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "open_files_too_low" in line]
    assert len(lines) == 1 and "256 idle connections" in lines[0]
