"""robots.txt (RFC 9309) and Crawl-delay: the rules as parsed, then the gate of each engine against a real Redis and
loopback servers (127.x addresses as distinct sites), then two worker processes sharing one fleet's politeness."""

from __future__ import annotations

import ipaddress
import itertools
import json
import subprocess
import time

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

import setting
from laion5b.aiofetch import AsyncFetcher
from laion5b.config import load
from laion5b.fetch import Fetcher
from laion5b.fetchpolicy import POSTPONED, Fetched, FetchPolicy
from laion5b.keys import Keys
from laion5b.robots import (
    ALLOW_ALL,
    ROBOTS_BYTES,
    AsyncRobotsGate,
    LocalRules,
    RobotsGate,
    RobotsSettings,
    SiteRules,
    async_robots_gate,
    decode,
    encode,
    robots_gate,
    site_rules,
)
from laion5b.tasks import Task, is_transient
from tests.helpers import ENGINE_IDS, engine_env, run_on_loop, run_script, wait_until
from tests.redis_server import free_port
from tools.image_server import ImageServer

KEYS = Keys()
AGENTS = ("laion5b-downloader", "img2dataset")
SETTINGS = RobotsSettings(agents=AGENTS, ttl=3600, max_crawl_delay=5, failure_ttl=1, lock_seconds=10)
POLICY = FetchPolicy(download_timeout=5, allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))


@pytest.mark.parametrize(
    ("robots", "path", "allowed"),
    [
        ("User-agent: *\nDisallow: /a\n", "/a/b", False),
        ("User-agent: *\nDisallow: /a\nAllow: /a/b\n", "/a/b/c", True),  # the longest match wins
        ("User-agent: *\nDisallow: /a/b\nAllow: /a\n", "/a/b/c", False),
        ("User-agent: *\nDisallow: /a\nAllow: /a\n", "/a", True),  # a tie: Allow wins
        ("User-agent: *\nDisallow: /*.gif$\n", "/x.gif", False),
        ("User-agent: *\nDisallow: /*.gif$\n", "/x.gifs", True),
        ("User-agent: *\nDisallow: /p%C3%A4th\n", "/päth", False),  # percent-encoding normalised
        ("User-agent: img2dataset\nDisallow: /\n\nUser-agent: *\nAllow: /\n", "/x", False),  # img2dataset's group
        ("User-agent: IMG2DATASET/1.0\nDisallow: /\n", "/x", False),  # case-insensitive, version ignored
        ("User-agent: img\nDisallow: /\n", "/x", True),  # not a prefix match (Protego's own matching would say no)
        ("User-agent: laion5b\nDisallow: /\n", "/x", True),
        ("User-agent: other\nUser-agent: laion5b-downloader\nDisallow: /x\n", "/x", False),  # one of its agents
        ("User-agent: img2dataset\nDisallow: /a\n\nUser-agent: img2dataset\nDisallow: /b\n", "/b", False),  # merged
        ("User-agent: img2dataset\nAllow: /\n\nUser-agent: *\nDisallow: /\n", "/x", False),  # every token must be
        (
            "User-agent: img2dataset\nUser-agent: laion5b-downloader\nAllow: /\n\nUser-agent: *\nDisallow: /\n",
            "/x",
            True,
        ),
        ("\ufeffUser-agent: *\nDisallow: /\n", "/x", False),  # a byte order mark
        ("Disallow: /\n", "/x", True),  # a rule outside any group
        ("User-agent: otherbot\nDisallow: /\n", "/x", True),  # no group for us, no * group
    ],
)
def test_groups_and_rules_follow_rfc9309(robots, path, allowed):
    rules = site_rules(robots, AGENTS)
    assert decode(encode(rules)).allows(f"http://site{path}") is allowed
    assert rules.allows(f"http://site{path}") is allowed


def test_compact_form_keeps_only_our_groups_and_a_site_without_rules_costs_nothing():
    assert encode(ALLOW_ALL) == b""
    assert encode(site_rules("User-agent: otherbot\nDisallow: /\nSitemap: /s.xml\n", AGENTS)) == b""
    wordpress = site_rules("User-agent: *\nDisallow: /wp-admin/\nAllow: /wp-admin/admin-ajax.php\n", AGENTS)
    assert len(encode(wordpress)) < 20
    big = "User-agent: *\n" + "".join(f"Disallow: /section-{n}/\n" for n in range(200)) + "Crawl-delay: 2.5\n"
    rules = site_rules(big + "User-agent: otherbot\n" + "Disallow: /other/\n" * 500, AGENTS)
    assert decode(encode(rules)) == rules and rules.delay == 2.5 and len(rules.groups) == 1
    assert len(encode(rules)) < len(big) / 5
    failed = SiteRules(failure=("robots_unavailable", "robots.txt answered HTTP 503"))
    assert decode(encode(failed)) == failed


def test_the_cache_in_memory_is_bounded_by_sites_and_by_rules_and_expires():
    cache = LocalRules(entries=3, rules=10)
    four = SiteRules(groups=(((False, "/a"), (False, "/b"), (True, "/c"), (False, "/d")),))
    for site in "abc":
        cache.put(site, four if site == "a" else ALLOW_ALL, 60)
    cache.get("a")  # used last: kept
    cache.put("d", ALLOW_ALL, 60)
    assert cache.get("b") is None and cache.get("a") is four and len(cache) == 3
    cache.put("e", four, 60)
    cache.put("f", four, 60)  # 12 rules > 10: the least recently used rules go
    assert cache.get("a") is None and cache.get("f") is four and cache.held == 8
    cache.put("g", ALLOW_ALL, 0)
    assert cache.get("g") is None


def test_robots_off_makes_no_gate_and_on_one_for_each_engine():
    assert robots_gate(load(setting, {"LAION_ROBOTS": "0"})) is None
    assert async_robots_gate(load(setting, {"LAION_ROBOTS": "0"})) is None
    gate = robots_gate(load(setting, {"LAION_ROBOTS_AGENTS": "MyBot,img2dataset"}))
    assert gate is not None and gate.settings.agents == ("mybot", "img2dataset")


def test_the_new_statuses_are_transient_or_permanent_as_documented():
    assert is_transient("robots_unavailable")
    assert not is_transient("robots_disallowed") and not is_transient("crawl_delay_too_long")


def fetch_all(engine: str, port: int, urls: list[str], settings: RobotsSettings = SETTINGS) -> list[Fetched]:
    """Fetch ``urls`` one after the other through a fresh gate of ``engine`` (a new process, as far as the cache in
    memory goes) on the Redis at ``port``."""
    if engine == "threads":
        fetcher = Fetcher(
            POLICY, robots=RobotsGate(settings, redis.Redis(port=port, retry=Retry(NoBackoff(), 0)), KEYS)
        )
        try:
            return [fetcher.fetch(url) for url in urls]
        finally:
            fetcher.close()

    async def main() -> list[Fetched]:
        gate = AsyncRobotsGate(settings, redis.asyncio.Redis(port=port, retry=AsyncRetry(NoBackoff(), 0)), KEYS)
        fetcher = AsyncFetcher(POLICY, robots=gate)
        try:
            return [await fetcher.fetch(url) for url in urls]
        finally:
            await fetcher.close()

    return run_on_loop(engine, main())


@pytest.fixture
def sites():
    """Three loopback servers as three sites: 127.0.0.2, 127.0.0.3 and 127.0.0.4."""
    servers = [ImageServer(host=f"127.0.0.{number}") for number in (2, 3, 4)]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


def statuses(fetched: list[Fetched]) -> list[object]:
    return [item.status for item in fetched]


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_disallowed_urls_and_redirect_hops_are_never_requested(engine, redis_server, sites):
    site, other, _ = sites
    site.serve_robots(200, "User-agent: img2dataset\nDisallow: /img/private\n\nUser-agent: *\nDisallow: /img/secret\n")
    hop = site.url("/img/secret-2.jpg")
    urls = [site.url("/img/ok.jpg"), site.url("/img/private-1.jpg"), site.url("/img/secret-1.jpg")]
    urls.append(other.url(f"/redirect-to?url={hop}"))  # a redirect to a disallowed path on another site
    fetched = fetch_all(engine, redis_server.port, urls)
    assert statuses(fetched) == [None, "robots_disallowed", "robots_disallowed", "robots_disallowed"]
    assert site.paths == ["/robots.txt", "/img/ok.jpg"]
    assert other.paths == ["/robots.txt", f"/redirect-to?url={hop}"]
    fetch_all(engine, redis_server.port, urls)  # another process: the rules come from Redis
    assert site.paths.count("/robots.txt") == other.paths.count("/robots.txt") == 1


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_a_busy_site_costs_no_redis_call_per_image(engine, redis_server, sites):
    site = sites[0]
    site.serve_robots(200, "User-agent: *\nDisallow: /private\n")
    assert statuses(fetch_all(engine, redis_server.port, [site.url(f"/img/{n}.jpg") for n in range(20)])) == [None] * 20
    stats = redis_server.client().info("commandstats")
    scripts = sum(stats.get(name, {}).get("calls", 0) for name in ("cmdstat_evalsha", "cmdstat_eval"))
    assert scripts <= 4  # look up (and lock), store, each sent twice the first time (NOSCRIPT): then memory answers


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_robots_failures_follow_rfc9309_and_an_unavailable_site_is_asked_again_later(engine, redis_server, sites):
    missing, failing, _ = sites
    failing.serve_robots(500, "down")
    urls = [missing.url("/img/a.jpg"), failing.url("/img/b.jpg"), f"http://127.0.0.5:{free_port()}/img/c.jpg"]
    fetched = fetch_all(engine, redis_server.port, urls)
    assert statuses(fetched) == [None, "robots_unavailable", "connection"]  # no answer: the network's own word
    assert fetched[2].error_msg.endswith(" (robots.txt)")
    assert failing.paths == ["/robots.txt"]  # the image itself is not asked for
    failing.serve_robots(200, "User-agent: *\nAllow: /\n")
    assert statuses(fetch_all(engine, redis_server.port, urls[1:2])) == ["robots_unavailable"]  # remembered a while
    time.sleep(SETTINGS.failure_ttl)
    assert statuses(fetch_all(engine, redis_server.port, urls[1:2])) == [None]
    assert failing.paths == ["/robots.txt", "/robots.txt", "/img/b.jpg"]
    assert missing.paths == ["/robots.txt", "/img/a.jpg"]


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_robots_redirects_up_to_five_and_only_the_first_500_kib(engine, redis_server, sites):
    five, six, big = sites
    five.serve_robots(200, "User-agent: *\nDisallow: /\n", hops=5)
    six.serve_robots(200, "User-agent: *\nDisallow: /\n", hops=6)  # more than five: as if it had none
    padding = "# " + "x" * 1000 + "\n"
    big.serve_robots(
        200, "User-agent: *\nDisallow: /img/early\n" + padding * (ROBOTS_BYTES // len(padding) + 1) + "Disallow: /"
    )
    urls = [five.url("/img/a.jpg"), six.url("/img/a.jpg"), big.url("/img/early.jpg"), big.url("/img/late.jpg")]
    assert statuses(fetch_all(engine, redis_server.port, urls)) == [
        "robots_disallowed",
        None,
        "robots_disallowed",
        None,
    ]
    assert len([path for path in six.paths if "robots" in path]) == 6


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_a_crawl_delay_over_max_crawl_delay_is_refused(engine, redis_server, sites):
    site = sites[0]
    site.serve_robots(200, "User-agent: *\nCrawl-delay: 60\n")
    fetched = fetch_all(engine, redis_server.port, [site.url("/img/a.jpg")])
    assert statuses(fetched) == ["crawl_delay_too_long"] and "60" in fetched[0].error_msg
    assert site.paths == ["/robots.txt"]


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_turns_beyond_the_in_place_wait_are_postponed_each_to_a_turn_of_its_own(engine, redis_server, sites):
    site = sites[0]
    site.serve_robots(200, "User-agent: *\nCrawl-delay: 3\n")
    fetched = fetch_all(engine, redis_server.port, [site.url("/img/a.jpg")] * 2)
    assert statuses(fetched) == [POSTPONED, POSTPONED]  # the robots.txt request counts as the site's last one
    assert 2.5 < fetched[0].retry_after <= 3 and 5.5 < fetched[1].retry_after <= 6
    assert site.paths == ["/robots.txt"]


def queue_urls(client: redis.Redis, urls: list[str]) -> None:
    tasks = [Task(id=f"id{row}", url=url, subset="s", part="p", row=row) for row, url in enumerate(urls)]
    client.lpush(KEYS.task, *[task.encode() for task in tasks])
    client.incrby(KEYS.tongji_all, len(tasks))


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_two_workers_share_robots_txt_and_keep_crawl_delay_as_one_fleet(engine, script_env, redis_server, sites):
    slow, closed, open_ = sites
    slow.serve_robots(200, "User-agent: *\nDisallow: /img/no\nCrawl-delay: 0.3\n")
    closed.serve_robots(200, "User-agent: img2dataset\nDisallow: /\n")
    urls = [slow.url(f"/img/s{n}.jpg") for n in range(4)] + [slow.url(f"/img/no{n}.jpg") for n in range(3)]
    urls += [closed.url(f"/img/c{n}.jpg") for n in range(4)] + [open_.url(f"/img/o{n}.jpg") for n in range(4)]
    client = redis_server.client()
    queue_urls(client, urls)
    env = {**script_env, **engine_env(engine), "LAION_ALLOWED_NETWORKS": "127.0.0.0/8", "LAION_THREAD_NUM": "4"}
    env.update(LAION_CONCURRENCY="4", LAION_HEARTBEAT_TTL="3", LAION_DOWNLOAD_TIMEOUT="4")
    workers = [
        subprocess.Popen([*run_script("downloader.py"), name, "--until-empty"], env=env, stderr=subprocess.PIPE)
        for name in ("a", "b")
    ]
    for worker in workers:
        assert worker.wait(60) == 0, worker.stderr.read()[-2000:]
    for site in sites:
        assert site.paths.count("/robots.txt") == 1
    assert not [path for site in sites for path in site.paths if "/img/no" in path or "/img/c" in path]
    started = slow.started("127.0.0.2")
    assert len(started) == 5  # robots.txt and four images, each at least the Crawl-delay after the one before
    assert min(later - earlier for earlier, later in itertools.pairwise(started)) >= 0.29
    records = [json.loads(raw) for raw in client.lrange(KEYS.error, 0, -1)]
    assert sorted(record["status"] for record in records) == ["robots_disallowed"] * 7
    assert client.hgetall(KEYS.failures) == {"robots_disallowed": "7"}
    assert int(client.get(KEYS.tongji_succ)) == 8


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_an_unavailable_robots_txt_is_retried_like_any_transient_failure(engine, script_env, redis_server, sites):
    site = sites[0]
    site.serve_robots(503, "busy")
    client = redis_server.client()
    queue_urls(client, [site.url("/img/later.jpg")])
    env = {**script_env, **engine_env(engine), "LAION_ALLOWED_NETWORKS": "127.0.0.0/8", "LAION_THREAD_NUM": "2"}
    env.update(LAION_CONCURRENCY="2", LAION_RETRY_BACKOFF="0.5", LAION_MAX_ATTEMPTS="5", LAION_DOWNLOAD_TIMEOUT="4")
    worker = subprocess.Popen([*run_script("downloader.py"), "w", "--until-empty"], env=env, stderr=subprocess.PIPE)
    wait_until(lambda: "/robots.txt" in site.paths)
    site.serve_robots(404, "")  # it recovers (and has no robots.txt)
    assert worker.wait(60) == 0, worker.stderr.read()[-2000:]
    assert client.llen(KEYS.error) == 0 and int(client.get(KEYS.tongji_succ)) == 1
    assert site.paths == ["/robots.txt", "/robots.txt", "/img/later.jpg"]  # asked again once its failure expired


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_a_task_is_postponed_while_redis_does_not_answer(engine, sites):
    fetched = fetch_all(engine, free_port(), [sites[0].url("/img/a.jpg")])
    assert statuses(fetched) == [POSTPONED] and fetched[0].retry_after == 5 and "Redis" in fetched[0].error_msg
    assert sites[0].paths == []
