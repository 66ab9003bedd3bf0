"""Per-host limits for the whole fleet, measured at the server: two worker processes on each engine share one
host's slots, its adaptive limit and its pause (laion5b/fleetslots.py, laion5b/hostledger.py). Each web host is a
loopback server of its own address."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from laion5b.hostledger import read_throttled
from laion5b.keys import Keys
from tests.helpers import ENGINE_IDS, engine_env, run_script, wait_until
from tests.test_downloader import assert_books_balance, queue_urls
from tools.image_server import ImageServer

KEYS = Keys()


ENGINES = ["threads", "async"]
"""Both engines (the async one on uvloop): the fleet's slots do not depend on the loop, which the limit's own test
covers on every id of ENGINE_IDS; the other tests keep CI's time."""


@pytest.fixture(params=ENGINE_IDS)
def every_env(script_env: dict[str, str], request: pytest.FixtureRequest) -> dict[str, str]:
    return worker_env(script_env, request.param)


@pytest.fixture(params=ENGINES)
def env(script_env: dict[str, str], request: pytest.FixtureRequest) -> dict[str, str]:
    return worker_env(script_env, request.param)


def worker_env(script_env: dict[str, str], engine: str) -> dict[str, str]:
    return {
        **script_env,
        **engine_env(engine),
        "LAION_CONCURRENCY": "8",
        "LAION_THREAD_NUM": "8",
        "LAION_ALLOWED_NETWORKS": "127.0.0.0/8",
        "LAION_HEARTBEAT_TTL": "3",
        "LAION_DOWNLOAD_TIMEOUT": "5",
        "LAION_MAX_PER_HOST": "3",
        "LAION_HOST_START_CONCURRENCY": "3",
        "LAION_ROBOTS": "false",  # the server counts requests per host: a robots.txt request would be one more
    }


@pytest.fixture
def web_host(request: pytest.FixtureRequest) -> Iterator[ImageServer]:
    """A server of its own loopback address (the test's parameter), standing for one web host."""
    server = ImageServer(host=request.param)
    server.start()
    yield server
    server.stop()


def workers(env: dict[str, str], names: tuple[str, ...] = ("0", "1"), *args: str) -> list[subprocess.Popen]:
    return [
        subprocess.Popen([*run_script("downloader.py"), name, *args], env=env, stderr=subprocess.PIPE, text=True)
        for name in names
    ]


def finish(processes: list[subprocess.Popen], timeout: float = 60) -> None:
    for process in processes:
        _, stderr = process.communicate(timeout=timeout)
        assert process.returncode == 0, stderr[-2000:]


@pytest.mark.parametrize("web_host", ["127.0.0.5"], indirect=True)
def test_two_workers_together_never_pass_max_per_host(redis_server, every_env, web_host):
    client = redis_server.client()
    total = len(queue_urls(client, [web_host.url(f"/slow/0.3/f{i}.jpg") for i in range(15)]))
    env = every_env
    finish(workers(env, ("0", "1"), "--until-empty"))
    assert web_host.most_in_progress("127.0.0.5") == 3  # not 3 per process
    assert_books_balance(client, Path(env["LAION_STORE_DIR"]), total)
    state = client.hget(KEYS.web_hosts, "127.0.0.5")  # good answers while tasks waited may be kept: no slot
    assert state is None or state.startswith("0|0|"), state
    assert not client.exists(KEYS.web_holds("testhost:0"), KEYS.web_holds("testhost:1"))


@pytest.mark.parametrize("web_host", ["127.0.0.6"], indirect=True)
def test_a_retry_after_pauses_the_host_for_both_workers(redis_server, env, web_host):
    client = redis_server.client()
    slow = [web_host.url(f"/slow/0.2/p{i}.jpg") for i in range(20)]
    total = len(queue_urls(client, [*slow[:8], web_host.url("/retry-after/2/p.jpg"), *slow[8:]]))
    finish(workers(env, ("0", "1"), "--until-empty"))
    paused_at = web_host.asked("p")[0]
    started = web_host.started("127.0.0.6")
    during = [t - paused_at for t in started if paused_at + 0.8 < t < paused_at + 1.95]
    assert not during, f"requests {during} s after the 429 asked for 2 s"
    assert max(started) > paused_at + 2  # the tasks of the host were postponed, not lost
    assert_books_balance(client, Path(env["LAION_STORE_DIR"]), total)
    assert int(client.get(KEYS.tongji_succ)) == total


@pytest.mark.parametrize("web_host", ["127.0.0.7"], indirect=True)
def test_an_overloaded_hosts_503s_cut_its_limit_for_both_workers(redis_server, env, web_host):
    client = redis_server.client()
    urls = [web_host.url(f"/busy/2/0.2/b{i}.jpg") for i in range(20)]
    total = len(queue_urls(client, urls))
    more = {"LAION_MAX_PER_HOST": "8", "LAION_HOST_START_CONCURRENCY": "4", "LAION_MAX_ATTEMPTS": "20"}
    finish(workers({**env, **more}, ("0", "1"), "--until-empty"))
    assert int(client.get(KEYS.tongji_succ)) == total
    # without the fleet's cut the two workers' 16 downloads in flight draw hundreds of 503s (and run out of time)
    assert web_host.overloaded("127.0.0.7") <= total, "the limit was not cut for the fleet"
    [throttled] = read_throttled(client, KEYS)
    assert throttled.host == "127.0.0.7" and throttled.limit < 8


@pytest.mark.parametrize("web_host", ["127.0.0.8"], indirect=True)
def test_a_killed_workers_slots_come_back_within_heartbeat_ttl(redis_server, env, web_host):
    client = redis_server.client()
    queue_urls(client, [web_host.url(f"/slow/20/held{i}.jpg") for i in range(2)])
    env = {**env, "LAION_MAX_PER_HOST": "2", "LAION_HOST_START_CONCURRENCY": "2"}
    holder = subprocess.Popen([*run_script("downloader.py"), "0"], env=env, stderr=subprocess.DEVNULL)
    wait_until(lambda: len(web_host.started("127.0.0.8")) == 2, timeout=30)  # it holds both slots, for 20 s
    queue_urls(client, [web_host.url(f"/img/w{i}.jpg") for i in range(12)])
    [waiter] = workers(env, ("1",))
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    killed_at = time.monotonic()
    try:
        wait_until(lambda: len(web_host.started("127.0.0.8")) > 2, timeout=30)
    finally:
        waiter.terminate()
        waiter.communicate(timeout=60)
    first = min(t for t in web_host.started("127.0.0.8") if t > killed_at) - killed_at
    assert first < 3 * 7 / 6 + 1, f"first request {first:.1f} s after the kill"


def test_redirect_targets_count_against_their_own_host(redis_server, env):
    servers = [ImageServer(host=f"127.0.0.{n}") for n in (11, 12, 13, 14)]
    for server in servers:
        server.start()
    try:
        *origins, target = servers
        client = redis_server.client()
        urls = [
            origin.url(f"/redirect-to?url={target.url(f'/slow/0.3/r{n}-{i}.jpg')}")
            for n, origin in enumerate(origins)
            for i in range(6)
        ]
        total = len(queue_urls(client, urls))
        more = {"LAION_MAX_PER_HOST": "2", "LAION_HOST_START_CONCURRENCY": "2", "LAION_DOWNLOAD_TIMEOUT": "10"}
        finish(workers({**env, **more}, ("0", "1"), "--until-empty"))
        assert int(client.get(KEYS.tongji_succ)) == total
        assert target.most_in_progress("127.0.0.14") == 2  # not 2 per host it was redirected from
    finally:
        for server in servers:
            server.stop()
