"""The politeness stand-in of bench/polite.py (bench/politeweb.py): its manners and what its request log measures."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.helpers import ROOT
from tests.redis_server import free_port


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


webserve = sys.modules.get("webserve") or _load("webserve")
politeweb = _load("politeweb")

SAMPLE = [("cdn.example", 300, 300), *((f"b{i}.example", 12, 0) for i in range(20)),
          *((f"s{i}.example", 2, 0) for i in range(60)), *((f"o{i}.example", 1, 0) for i in range(400))]  # fmt: skip
SERVED = [politeweb.Manners(capacity=2), politeweb.Manners(rule="token"),
          politeweb.Manners(rule="delay", crawl_delay=1.0), politeweb.Manners()]  # fmt: skip


def test_manners_are_drawn_as_stated() -> None:
    web = webserve.build_web(SAMPLE, 1200, seed=3)
    pweb = politeweb.polite_web(web, capacity=4)
    assert politeweb.polite_web(web, capacity=4) == pweb
    capacity = [h for h, m in zip(web.hosts, pweb.manners, strict=True) if m.capacity]
    assert capacity and all(h.urls >= 3 and h.index > 0 and h.kind == "ok" for h in capacity)
    delays = sorted(m.crawl_delay for m in pweb.manners if m.rule == "delay")
    assert len(delays) == politeweb.DELAY_HOSTS + 1 and delays[-1] == politeweb.LONG_DELAY and delays[0] >= 1
    assert sum(m.tdm for m in pweb.manners) == politeweb.TDM_HOSTS
    rules = {m.rule for m in pweb.manners}
    assert {"star", "token", "long", "allow", ""} <= rules
    urls = pweb.urls(80, 443, False)
    for index in pweb.private:
        assert "/private/" in urls[index] and pweb.manners[web.url_hosts[index]].rule == "star"
    assert all(m == politeweb.Manners() for m in politeweb.polite_web(web, 4, plain=True).manners)


@pytest.fixture
def polite_server(tmp_path: Path) -> Iterator[tuple[list[str], Path]]:
    """bench/politeweb.py with three ok hosts (capacity 2, robots.txt shutting out img2dataset, Crawl-delay 1 s) and
    an always-429 one."""
    manners, kinds = SERVED, ["ok", "ok", "ok", "ratelimit"]
    addresses = [webserve._address(6000 + index) for index in range(len(manners))]
    port = free_port()
    spec = {
        "seed": 1,
        "http_port": port,
        "https_port": port,
        "hosts": [[address, False, kind, ""] for address, kind in zip(addresses, kinds, strict=True)],
        "manners": [m.__dict__ for m in manners],
        "events": str(tmp_path / "events"),
        "ratelimit_retry_after": 10,
    }
    (tmp_path / "web.json").write_text(json.dumps(spec))
    command = [sys.executable, str(ROOT / "bench" / "politeweb.py"), "--spec", str(tmp_path / "web.json"),
               "--procs", "2"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().startswith("ready listeners=4")
        yield [f"http://{address}:{port}" for address in addresses], tmp_path / "events"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_log_measures_capacity_robots_and_crawl_delay(polite_server: tuple[list[str], Path]) -> None:
    (limited, token, delay, ratelimit), events = polite_server
    since = time.monotonic_ns()
    with ThreadPoolExecutor(6) as pool:  # six at once on separate connections, over both server processes
        statuses = list(pool.map(lambda i: requests.get(f"{limited}/img/{i}-2000.jpg", timeout=5), range(6)))
    assert [r.status_code for r in statuses].count(429) >= 4 - 2  # at most 2 in progress: the rest are refused
    assert all(r.headers["Retry-After"] == "1" for r in statuses if r.status_code == 429)
    robots = requests.get(f"{token}/robots.txt", timeout=5)
    assert "User-agent: img2dataset\nDisallow: /" in robots.text
    assert requests.get(f"{token}/img/7-2000.jpg", timeout=5).status_code == 200  # served, but counted
    assert "Crawl-delay: 1" in requests.get(f"{delay}/robots.txt", timeout=5).text
    requests.get(f"{delay}/img/8-2000.jpg", timeout=5)
    requests.get(f"{delay}/img/9-2000.jpg", timeout=5)  # about 0.15 s after the first: a violation
    assert requests.get(f"{ratelimit}/img/1-2000.jpg", timeout=5).headers["Retry-After"] == "10"
    time.sleep(0.5)  # the server writes its log every 0.2 s
    web = webserve.Web([webserve.Host(i, f"h{i}", a, False, "ok", 1) for i, a in enumerate(
        url.split("//")[1].split(":")[0] for url in polite_server[0])], [0, 1, 2, 3], [1] * 4, 1)  # fmt: skip
    pweb = politeweb.PoliteWeb(web, SERVED)
    seen = politeweb.traffic(pweb, *politeweb.read_events(events, since, time.monotonic_ns()))
    assert seen["limited_requests"] == 6
    assert seen["limited_429"] == [r.status_code for r in statuses].count(429)
    assert seen["peak_limited"] >= 3  # the refused ones were in progress too, for a moment
    assert seen["disallowed"] == 1 and seen["robots_requests"] == 2 and seen["robots_most"] == 1
    assert seen["crawl_violations"] == 1 and seen["crawl_shortest"] < 1


def test_peak_counts_overlaps_only() -> None:
    assert politeweb.peak([(0, 10), (10, 20), (5, 15)]) == 2
    assert politeweb.peak([(0, 10), (1, 9), (2, 8)]) == 3
    assert politeweb.peak([]) == 0
