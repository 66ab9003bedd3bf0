"""Per-process limits (host slots as this worker sees them, byte budgets, open files) and the DNS cache, as units."""

from __future__ import annotations

import asyncio
import resource
import socket
import subprocess
import sys
import threading
import time

import pytest

from laion5b.dnscache import AsyncCachedResolver, CachedResolver, DnsCache
from laion5b.fleetslots import FleetSlots
from laion5b.hostledger import HostGrant
from laion5b.limits import AsyncByteBudget, ByteBudget
from tests.helpers import ROOT, run_script


def test_fleet_slots_park_until_granted_then_pass_locally_in_order() -> None:
    postponed: list[tuple[str, float, str]] = []
    started: list[tuple[str, str]] = []
    slots: FleetSlots[str] = FleetSlots(4, lambda item, delay, reason: postponed.append((item, delay, reason)))
    slots.start = started.extend
    assert not slots.acquire("a.test", "a1") and not slots.acquire("a.test", "a2") and not slots.acquire("a.test", "a3")
    now = time.monotonic()
    [report] = slots.reports(now)
    assert (report.host, report.held, report.want) == ("a.test", 0, 3)
    slots.apply([report], [HostGrant(granted=2, keep=-1, limit=4, pause=0.0)], now)
    assert started == [("a.test", "a1"), ("a.test", "a2")] and slots.waiting() == 1
    slots.report("a.test", 404, None)  # an answer (not the URL's image) while a task waits: the host copes
    assert slots.release("a.test") == "a3"  # the slot passes to the parked item, no Redis call
    assert slots.release("a.test") is None
    [report] = slots.reports(time.monotonic())
    assert (report.held, report.want, report.good) == (1, 0, 1)  # one slot went back


def test_fleet_slots_postpone_a_paused_hosts_tasks_and_zero_means_no_limit() -> None:
    postponed: list[tuple[str, float, str]] = []
    slots: FleetSlots[str] = FleetSlots(4, lambda item, delay, reason: postponed.append((item, delay, reason)))
    assert not slots.acquire("p.test", "p1")
    now = time.monotonic()
    reports = slots.reports(now)
    slots.apply(reports, [HostGrant(granted=0, keep=-1, limit=2, pause=3.0)], now)
    assert not slots.acquire("p.test", "p2")
    assert [item for item, _, _ in postponed] == ["p1", "p2"]
    assert all(3.0 <= delay <= 4.0 for _, delay, _ in postponed)
    capped: FleetSlots[str] = FleetSlots(4, lambda item, delay, reason: None, max_pause=60.0)
    capped.acquire("c.test", "c1")
    now = time.monotonic()
    capped.apply(capped.reports(now), [HostGrant(granted=1, keep=-1, limit=4, pause=0.0)], now)
    capped.report("c.test", 429, 86400.0)  # a day asked: the fleet pauses max_retry_after at most
    assert capped.reports(now)[0].retry_after == 60.0
    unlimited: FleetSlots[int] = FleetSlots(0, lambda item, delay, reason: None)
    assert all(unlimited.acquire("a.test", number) for number in range(1000))
    assert unlimited.release("a.test") is None and not unlimited.due(now + 10)


def test_byte_budget_waits_for_bytes_given_back() -> None:
    budget = ByteBudget(100)
    assert budget.take(80, 0, time.monotonic() + 1)
    threading.Timer(0.2, budget.give, [80]).start()
    started = time.monotonic()
    assert budget.take(50, 0, time.monotonic() + 5)
    assert 0.15 < time.monotonic() - started < 2
    assert budget.used == 50 and budget.peak == 80
    assert not budget.take(60, 0, time.monotonic() + 0.1)  # the deadline passes first


def test_byte_budget_holders_give_way_instead_of_waiting_for_each_other() -> None:
    budget = ByteBudget(100)
    assert budget.take(50, 0, time.monotonic() + 1) and budget.take(50, 0, time.monotonic() + 1)
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(budget.take(10, 50, time.monotonic() + 5)))
    waiter.start()
    time.sleep(0.1)
    started = time.monotonic()
    assert not budget.take(10, 50, time.monotonic() + 5)  # both holders would wait: the second gives way at once
    assert time.monotonic() - started < 0.5
    budget.give(50)
    waiter.join(5)
    assert results == [True] and budget.used == 60 and budget.holders == 1


def test_async_byte_budget_first_come_first_served_and_cancellation() -> None:
    async def scenario() -> None:
        budget = AsyncByteBudget(100)
        assert await budget.take(90, 0)
        first = asyncio.ensure_future(budget.take(50, 0))
        second = asyncio.ensure_future(budget.take(5, 0))  # fits, but waits behind the first
        cancelled = asyncio.ensure_future(budget.take(10, 0))
        await asyncio.sleep(0.01)
        assert not first.done() and not second.done()
        cancelled.cancel()
        budget.give(90)
        assert await first and await second
        assert budget.used == 55 and budget.peak == 90 and budget.holders == 2
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        budget.give(5)
        assert not await budget.take(60, 50)  # the one holder would wait for itself: it gives way

    asyncio.run(scenario())


def test_open_files_soft_limit_is_raised_to_the_hard_limit() -> None:
    code = (
        "import resource; from laion5b.limits import raise_open_files_limit as r;"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (300, 4096)); print(r(512, 0));"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.split() == ["4096", "4096"]


def test_worker_refuses_to_start_when_the_hard_limit_is_too_low(script_env: dict[str, str]) -> None:
    result = subprocess.run(
        [*run_script("downloader.py"), "0"],
        env={**script_env, "LAION_ENGINE": "async", "LAION_CONCURRENCY": "1024"},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "open_files_too_low" in line]
    assert len(lines) == 1 and "1024 downloads in flight" in lines[0]


def test_cached_resolver_asks_once_per_name_and_caches_failures_briefly() -> None:
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        time.sleep(0.2)
        if host.startswith("dead"):
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return ["192.0.2.1"]

    cached = CachedResolver(resolver, DnsCache(300, negative_ttl=0.3))
    answers: list[object] = []

    def ask(host: str) -> None:
        try:
            answers.append(cached(host, 80))
        except socket.gaierror as error:
            answers.append(error.errno)

    threads = [threading.Thread(target=ask, args=(host,)) for host in ["live.test", "dead.test"] * 20]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert sorted(asked) == ["dead.test", "live.test"]
    assert answers.count(["192.0.2.1"]) == 20 and answers.count(socket.EAI_NONAME) == 20
    time.sleep(0.35)
    ask("dead.test")
    ask("live.test")
    assert sorted(asked) == ["dead.test", "dead.test", "live.test"]


def test_async_cached_resolver_shares_one_look_up() -> None:
    asked: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        await asyncio.sleep(0.1)
        if host == "dead.test":
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return ["192.0.2.1"]

    async def scenario() -> list[object]:
        cached = AsyncCachedResolver(resolver, DnsCache(300))
        calls = [cached(host, 443) for host in ["live.test", "dead.test"] * 250]
        return await asyncio.gather(*calls, return_exceptions=True)

    answers = asyncio.run(scenario())
    assert sorted(asked) == ["dead.test", "live.test"]
    assert answers.count(["192.0.2.1"]) == 250
    assert sum(isinstance(answer, socket.gaierror) for answer in answers) == 250


def test_no_cache_still_answers() -> None:
    cached = CachedResolver(lambda host, port: ["192.0.2.7"], DnsCache(0, 0))
    assert cached("a.test", 80) == ["192.0.2.7"] and cached("a.test", 80) == ["192.0.2.7"]
