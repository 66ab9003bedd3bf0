"""max_per_ip, measured at the server: several host names of one loopback address, two workers sharing one Redis
(in this process, with a resolver that maps the names to that address): the server never sees more than max_per_ip
requests in progress, all names together, where max_per_host alone would allow one worker's whole concurrency."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import setting
from laion5b.config import load
from laion5b.guard import Resolver
from laion5b.keys import Keys
from laion5b.redisconn import connect
from laion5b.worker import Worker
from tests.helpers import engine_env
from tests.test_downloader import assert_books_balance, queue_urls
from tools.image_server import ImageServer

KEYS = Keys()
ADDRESS = "127.0.0.21"
NAMES = [f"site{n}.test" for n in range(4)]


@pytest.fixture
def server():
    server = ImageServer(host=ADDRESS)
    server.start()
    yield server
    server.stop()


class NamesToOneAddress:
    """Every test name resolves to ADDRESS (a server of many host names); the look-ups are counted."""

    def __init__(self) -> None:
        self.lookups = 0

    def __call__(self, host: str, port: int) -> list[str]:
        assert host in NAMES, host
        self.lookups += 1
        return [ADDRESS]


def run_workers(env: dict[str, str], resolver: Resolver, count: int = 2) -> None:
    """``count`` workers of this process, each with its own engine and identity, until the queue is empty."""
    config = load(setting, env)
    stop = threading.Event()
    workers = [Worker(connect(config), config, str(n), stop, until_empty=True, resolver=resolver) for n in range(count)]
    threads = [threading.Thread(target=worker.run) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)


@pytest.mark.parametrize("engine", ["threads", "async"])
def test_two_workers_together_never_pass_max_per_ip(redis_server, script_env, server, engine):
    client = redis_server.client()
    urls = [f"http://{name}:{server.port}/slow/0.3/{name}-{i}.jpg" for name in NAMES for i in range(4)]
    total = len(queue_urls(client, urls))
    env = {
        **script_env,
        **engine_env(engine),
        "LAION_CONCURRENCY": "8",
        "LAION_THREAD_NUM": "8",
        "LAION_ALLOWED_NETWORKS": "127.0.0.0/8",
        "LAION_MAX_PER_HOST": "3",  # 4 names x 3: max_per_host alone would allow 8 per worker
        "LAION_HOST_START_CONCURRENCY": "3",
        "LAION_MAX_PER_IP": "2",
        "LAION_ROBOTS": "false",  # the server counts requests: a robots.txt request would be one more
        "LAION_DNS_CACHE_TTL": "0",  # every look-up reaches the resolver
    }
    resolver = NamesToOneAddress()
    run_workers(env, resolver)
    assert server.most_at_once() == 2
    assert resolver.lookups <= total  # once per request at most: the connection uses the address its slot is of
    assert_books_balance(client, Path(env["LAION_STORE_DIR"]), total)
    assert int(client.get(KEYS.tongji_succ)) == total
    assert not client.hlen(KEYS.ledger_hosts("ip"))  # every address slot was given back


class Alternating:
    """One name whose DNS answer changes at every look-up, between two addresses."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses
        self.lookups = 0

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups += 1
        return [self.addresses[self.lookups % len(self.addresses)]]


@pytest.mark.parametrize("engine", ["threads", "async"])
def test_each_request_connects_to_the_address_whose_slot_it_holds(redis_server, script_env, engine):
    """The name's answer changes between requests: a kept-alive connection to the last address is not reused."""
    first = ImageServer(host="127.0.0.22")
    first.start()
    second = ImageServer(host="127.0.0.23", port=first.port)
    second.start()
    try:
        client = redis_server.client()
        total = len(queue_urls(client, [f"http://moving.test:{first.port}/img/m{i}.jpg" for i in range(8)]))
        env = {
            **script_env,
            **engine_env(engine),
            "LAION_CONCURRENCY": "1",
            "LAION_THREAD_NUM": "1",
            "LAION_ALLOWED_NETWORKS": "127.0.0.0/8",
            "LAION_MAX_PER_IP": "1",
            "LAION_ROBOTS": "false",
            "LAION_DNS_CACHE_TTL": "0",
        }
        resolver = Alternating("127.0.0.22", "127.0.0.23")
        run_workers(env, resolver, count=1)
        assert int(client.get(KEYS.tongji_succ)) == total
        assert resolver.lookups == total
        assert len(first.started("moving.test")) == len(second.started("moving.test")) == total // 2
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("engine", ["threads", "async"])
def test_a_redirect_to_another_name_of_the_address_waits_for_no_slot_of_its_own(
    redis_server, script_env, server, engine
):
    """Each hop holds the address's slot only while its request is in progress: with max_per_ip 1, downloads whose
    redirect leads to another name of the same address all end, one request at a time."""
    client = redis_server.client()
    target = f"http://{NAMES[1]}:{server.port}/slow/0.1"
    urls = [f"http://{NAMES[0]}:{server.port}/redirect-to?url={target}/r{i}.jpg" for i in range(6)]
    total = len(queue_urls(client, urls))
    env = {
        **script_env,
        **engine_env(engine),
        "LAION_CONCURRENCY": "4",
        "LAION_THREAD_NUM": "4",
        "LAION_ALLOWED_NETWORKS": "127.0.0.0/8",
        "LAION_MAX_PER_IP": "1",
        "LAION_ROBOTS": "false",
    }
    run_workers(env, NamesToOneAddress(), count=1)
    assert int(client.get(KEYS.tongji_succ)) == total
    assert server.most_at_once() == 1
