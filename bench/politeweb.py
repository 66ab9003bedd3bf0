"""bench/webserve.py's web made to test politeness: hosts of limited capacity, robots.txt rules, Crawl-delay and the
TDMRep header, and a log of every request the server saw, from which ``traffic`` tells what the hosts' owners saw.

The model (``polite_web``) adds ``Manners`` to each host of a ``webserve.Web`` (deterministic from the seed):
  capacity   busy ok hosts (at least max(3, N/1000) URLs), every other one from the second largest on (the
             largest, a CDN, is not limited): above ``capacity`` requests in progress (counted over every server
             process) they answer 429 with Retry-After: 1 at once
  robots     small ok hosts: ``star`` disallows /private/ for ``*`` (half their URLs live there), ``token``
             disallows everything for the ``img2dataset`` token (an ai.robots.txt-style group), ``delay`` asks a
             Crawl-delay of 1-4 s (one host: 60 s), ``long`` and ``allow`` carry rules that miss the images; the
             rest answer 404 (allow all); other kinds answer /robots.txt as they answer anything
  tdm        a few small ok hosts send ``tdm-reservation: 1`` with their images
``plain=True`` keeps the web of openweb.py as it is (no capacity, no rules) but still logs the traffic. In both, the
``ratelimit`` hosts (always 429) say ``Retry-After: <ratelimit_retry_after>`` of the spec (webserve's 120 s when
absent): a fleet that honours it sends such a host one request per pause, so 120 s would hold a run for many minutes.

The server (``python3 bench/politeweb.py --spec SPEC.json --procs 2``) is webserve.py's with these manners. Each
process appends one line per request (``r host start_ns end_ns status class url``; class i = image, d = image path
the host's robots.txt disallows for ``*`` or ``img2dataset``, r = /robots.txt, o = other) and per connection
(``c host start_ns end_ns``) to ``<events>/<pid>.log`` (CLOCK_MONOTONIC, the same clock in every process), flushed
every 0.2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import webserve
from webserve import ALWAYS_OK_TOP, Web, _response

from tools.image_server import image_bytes

PRIVATE = "private"  # the folder a ``star`` host's robots.txt disallows
CAPACITY_RETRY_AFTER = 1
LONG_DELAY = 60.0  # one host asks for more than max_crawl_delay (30 s)
DELAY_HOSTS = 12  # hosts with a Crawl-delay of 1-4 s ...
DELAY_URLS = (2, 8)  # ... chosen among the ok hosts with this many URLs
TDM_HOSTS = 6
RULE_SHARES = {"star": 0.04, "token": 0.04, "long": 0.05, "allow": 0.32}  # of the small ok hosts; the rest 404
TOKEN = "img2dataset"
ROBOTS = {
    "allow": "User-agent: *\nDisallow: /wp-admin/\nAllow: /wp-admin/admin-ajax.php\n",
    "star": f"User-agent: *\nDisallow: /{PRIVATE}/\nDisallow: /cart\n",
    "token": (
        "# AI crawlers and dataset downloaders\nUser-agent: GPTBot\nUser-agent: CCBot\nUser-agent: "
        f"{TOKEN}\nDisallow: /\n\nUser-agent: *\nDisallow: /search\n"
    ),
    "long": "".join(
        f"User-agent: {agent}\n" + "".join(f"Disallow: /{agent.lower()}-{k}/\n" for k in range(15)) + "\n"
        for agent in ("Googlebot", "bingbot", "*")
    ),
}
CRAWL_TOLERANCE = 0.1  # seconds: the server reads a request after the client's connect and TLS handshake
_PATH = re.compile(rb"^/(img|private)/(\d+)-(\d+)\.jpg$")


@dataclass(frozen=True)
class Manners:
    capacity: int = 0  # requests in progress above which the host answers 429 (0: no limit)
    rule: str = ""  # "", allow, star, token, long, delay
    crawl_delay: float = 0.0
    tdm: bool = False

    @property
    def robots(self) -> str | None:
        """The host's robots.txt (None: 404)."""
        if self.rule == "delay":
            return f"User-agent: *\nCrawl-delay: {self.crawl_delay:g}\nDisallow: /admin/\n"
        return ROBOTS.get(self.rule)


@dataclass(frozen=True)
class PoliteWeb:
    web: Web
    manners: list[Manners]
    private: frozenset[int] = field(default_factory=frozenset)  # URL indexes under /private/

    def urls(self, http_port: int, https_port: int, by_name: bool) -> list[str]:
        urls = self.web.urls(http_port, https_port, by_name)
        for index in self.private:
            urls[index] = urls[index].replace("/img/", f"/{PRIVATE}/", 1)
        return urls

    def disallowed(self, index: int) -> bool:
        """Whether URL ``index`` is disallowed by its host's robots.txt for ``*`` or the ``img2dataset`` token."""
        rule = self.manners[self.web.url_hosts[index]].rule
        return rule == "token" or (rule == "star" and index in self.private)

    def counts(self) -> dict[str, int]:
        """Hosts and URLs of each manner."""
        out: dict[str, int] = defaultdict(int)
        for host, manners in zip(self.web.hosts, self.manners, strict=True):
            for name, on in (
                ("capacity", manners.capacity > 0),
                (f"robots {manners.rule}", bool(manners.rule)),
                ("crawl-delay > 30 s", manners.crawl_delay > 30),
                ("tdm", manners.tdm),
            ):
                if on:
                    out[f"{name} hosts"] += 1
                    out[f"{name} URLs"] += host.urls
        out["disallowed URLs"] = sum(self.disallowed(i) for i in range(len(self.web.url_hosts)))
        return dict(out)


def polite_web(web: Web, capacity: int, plain: bool = False) -> PoliteWeb:
    """Manners for each host of ``web`` (see the module docstring); ``plain``: none."""
    if plain:
        return PoliteWeb(web, [Manners() for _ in web.hosts])
    rng = random.Random(web.seed * 7919 + 18)
    least = max(3, len(web.url_hosts) // 1000)
    busy = [host for host in web.hosts[1:] if host.kind == "ok" and host.urls >= least]
    manners = {host.index: Manners(capacity=capacity if rank % 2 == 0 else 0, rule="" if rank % 2 == 0 else "allow")
               for rank, host in enumerate(busy)}  # fmt: skip
    manners[0] = Manners(rule="allow")
    small = []
    for host in web.hosts:
        if host.index not in manners and (host.index < ALWAYS_OK_TOP or host.kind != "ok"):
            manners[host.index] = Manners(rule="allow" if host.index < ALWAYS_OK_TOP else "")
        elif host.index not in manners:
            small.append(host)
    rng.shuffle(small)
    delay = [h for h in small if DELAY_URLS[0] <= h.urls <= DELAY_URLS[1]][: DELAY_HOSTS + 1]
    for number, host in enumerate(delay):
        seconds = LONG_DELAY if number == 0 else float(rng.randint(1, 4))
        manners[host.index] = Manners(rule="delay", crawl_delay=seconds)
    rest = [h for h in small if h.index not in manners]
    for host in rest[:TDM_HOSTS]:
        manners[host.index] = Manners(tdm=True)
    for host in rest[TDM_HOSTS:]:
        manners[host.index] = Manners(rule=_draw_rule(rng))
    private = frozenset(
        index
        for index, host in enumerate(web.url_hosts)
        if manners[host].rule == "star" and random.Random(f"{web.seed}-{index}").random() < 0.5
    )
    return PoliteWeb(web, [manners[host.index] for host in web.hosts], private)


def _draw_rule(rng: random.Random) -> str:
    draw = rng.random()
    for rule, share in RULE_SHARES.items():
        if draw < share:
            return rule
        draw -= share
    return ""


# --- what the hosts saw: the request log -------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    host: int
    start: int  # ns, CLOCK_MONOTONIC
    end: int
    status: int  # 0: no answer (reset, or the client left)
    kind: str  # i image, d disallowed image path, r robots.txt, o other
    url: int


def read_events(folder: Path, since: int, until: int) -> tuple[list[Request], list[tuple[int, int, int]]]:
    """Requests and connections (host, start, end) that began in [since, until] ns."""
    requests, connections = [], []
    for path in folder.glob("*.log"):
        for line in path.read_text().splitlines():
            parts = line.split()
            start = int(parts[2])
            if not since <= start <= until:
                continue
            if parts[0] == "r":
                requests.append(Request(int(parts[1]), start, int(parts[3]), int(parts[4]), parts[5], int(parts[6])))
            else:
                connections.append((int(parts[1]), start, int(parts[3])))
    return requests, connections


def peak(intervals: list[tuple[int, int]]) -> int:
    """Most intervals open at once (an interval ending when another starts does not overlap it)."""
    marks = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = now = 0
    for _, step in marks:
        now += step
        most = max(most, now)
    return most


def peaks_by(keys: list, intervals: list[tuple[int, int]]) -> dict:
    grouped: dict = defaultdict(list)
    for key, interval in zip(keys, intervals, strict=True):
        grouped[key].append(interval)
    return {key: peak(group) for key, group in grouped.items()}


def traffic(pweb: PoliteWeb, requests: list[Request], connections: list[tuple[int, int, int]]) -> dict:
    """What the hosts' owners saw: requests, 429s, peaks, disallowed paths, Crawl-delay gaps, robots.txt fetches."""
    hosts, manners = pweb.web.hosts, pweb.manners
    limited = [r for r in requests if manners[r.host].capacity]
    by_host = peaks_by([r.host for r in requests], [(r.start, r.end) for r in requests])
    by_ip = peaks_by([hosts[r.host].address for r in requests], [(r.start, r.end) for r in requests])
    open_peaks = peaks_by([c[0] for c in connections], [(c[1], c[2]) for c in connections])
    busiest = max(by_host, key=by_host.get, default=-1)
    robots = Counter(r.host for r in requests if r.kind == "r")
    answered = Counter(r.host for r in requests if r.kind == "r" and 200 <= r.status < 500 and r.status != 429)
    violations, shortest = crawl_delay_gaps(pweb, requests)
    repeated = [host for host, count in answered.items() if count > 1]
    return {
        "requests": len(requests),
        "limited_requests": len(limited),
        "limited_429": sum(r.status == 429 for r in limited),
        "all_429": sum(r.status == 429 for r in requests),
        "peak_host": by_host.get(busiest, 0),
        "peak_host_urls": hosts[busiest].urls if busiest >= 0 else 0,
        "peak_limited": max((n for h, n in by_host.items() if manners[h].capacity), default=0),
        "peak_ip": max(by_ip.values(), default=0),
        "peak_open": max(open_peaks.values(), default=0),
        "disallowed": sum(r.kind == "d" for r in requests),
        "crawl_violations": violations,
        "crawl_shortest": shortest,
        "robots_requests": sum(robots.values()),
        "robots_hosts": len(robots),
        "robots_most": max(answered.values(), default=0),
        "robots_repeated": len(repeated),
        "robots_repeated_seen": [robots_history(pweb, requests, host) for host in repeated[:10]],
        "image_requests": sum(r.kind in "id" for r in requests),
    }


def robots_history(pweb: PoliteWeb, requests: list[Request], host: int) -> str:
    """A host's kind, its robots rule and each robots.txt request (seconds after the first, status, seconds taken)."""
    asked = sorted((r.start, r.end, r.status) for r in requests if r.host == host and r.kind == "r")
    first = asked[0][0]
    seen = ", ".join(f"{(start - first) / 1e9:.1f} s: {status} in {(end - start) / 1e9:.2f} s"
                     for start, end, status in asked)  # fmt: skip
    return f"host {host} ({pweb.web.hosts[host].kind}, robots {pweb.manners[host].rule or 404}): {seen}"


def crawl_delay_gaps(pweb: PoliteWeb, requests: list[Request]) -> tuple[int, float | None]:
    """Pairs of request starts (robots.txt aside) at a Crawl-delay host closer than its delay by more than
    CRAWL_TOLERANCE, and the shortest gap ÷ delay seen (None: no host got two requests)."""
    starts: dict[int, list[int]] = defaultdict(list)
    for r in requests:
        if pweb.manners[r.host].crawl_delay and r.kind != "r":
            starts[r.host].append(r.start)
    violations, shortest = 0, None
    for host, times in starts.items():
        delay = pweb.manners[host].crawl_delay
        times.sort()
        for before, after in itertools.pairwise(times):
            gap = (after - before) / 1e9
            violations += gap < delay - CRAWL_TOLERANCE
            shortest = min(shortest if shortest is not None else math.inf, gap / delay)
    return violations, shortest


# --- the server -----------------------------------------------------------------------------------------------


class EventLog:
    """This process's request and connection lines, appended to ``<folder>/<pid>.log`` every 0.2 s."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / f"{os.getpid()}.log"
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def flush(self) -> None:
        if self.lines:
            with open(self.path, "a") as file:
                file.write("".join(self.lines))
            self.lines.clear()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self.flush()


class _Polite(webserve._Http):
    """webserve's connection with the host's manners, logging each request and the connection."""

    def __init__(self, host: int, kind: str, spec: dict, manners: Manners, inflight, log: EventLog) -> None:
        super().__init__(kind, spec["seed"])
        self.host, self.manners, self.inflight, self.log = host, manners, inflight, log
        self.retry_after = spec.get("ratelimit_retry_after", webserve.RETRY_AFTER)
        self.opened = time.monotonic_ns()
        self.current: tuple[int, str, int, bool] | None = None  # start ns, class, URL index, counted

    def connection_lost(self, exc: Exception | None) -> None:
        if self.current is not None:
            self._done(0)
        self.log.add(f"c {self.host} {self.opened} {time.monotonic_ns()}\n")
        super().connection_lost(exc)

    def _serve(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self.transport.close()
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            first = head.split(b"\r\n", 1)[0].split(b" ")
            path = (first[1] if len(first) > 1 else b"/").split(b"?", 1)[0]
            close = b"\nconnection: close" in head.lower()
            self.busy = True
            self.current = (time.monotonic_ns(), *self._classify(path), self._admit())
            if not self.current[3] and self.manners.capacity:
                body = b"busy\n"
                extra = b"Retry-After: %d\r\n" % CAPACITY_RETRY_AFTER
                asyncio.get_running_loop().call_soon(self._reply, 429, _response(
                    b"429 Too Many Requests", b"text/plain", body, close, extra), close)  # fmt: skip
                continue
            delay = webserve.wait_seconds(self.seed, self.kind, path)
            asyncio.get_running_loop().call_later(delay, self._answer, path, close)

    def _classify(self, path: bytes) -> tuple[str, int]:
        if path == b"/robots.txt":
            return "r", -1
        match = _PATH.match(path)
        if match is None:
            return "o", -1
        rule, folder = self.manners.rule, match.group(1).decode()
        disallowed = rule == "token" or (rule == "star" and folder == PRIVATE)
        return ("d" if disallowed else "i"), int(match.group(2))

    def _admit(self) -> bool:
        """Count the request against the host's capacity; False when it is over (answered 429)."""
        if not self.manners.capacity:
            return False
        with self.inflight.get_lock():
            if self.inflight[self.host] >= self.manners.capacity:
                return False
            self.inflight[self.host] += 1
        return True

    def _done(self, status: int) -> None:
        start, kind, url, counted = self.current
        self.current = None
        if counted:
            with self.inflight.get_lock():
                self.inflight[self.host] -= 1
        self.log.add(f"r {self.host} {start} {time.monotonic_ns()} {status} {kind} {url}\n")

    def _reply(self, status: int, data: bytes, close: bool) -> None:
        self.busy = False
        if self.transport is None:
            return
        self._done(status)
        self.transport.write(data)
        if close:
            self.transport.close()
            return
        self._serve()

    def _answer(self, path: bytes, close: bool) -> None:
        if self.transport is not None and self.kind == "reset":
            self._done(0)
        if self.kind == "reset" or self.transport is None:
            super()._answer(path, close)
            return
        status, data = self._polite_body(path, close)
        self._reply(status, data, close)

    def _polite_body(self, path: bytes, close: bool) -> tuple[int, bytes]:
        if self.kind in ("ok", "slow"):
            if path == b"/robots.txt":
                robots = self.manners.robots
                if robots is None:
                    return 404, _response(b"404 Not Found", b"text/html", webserve._NOT_FOUND, close)
                return 200, _response(b"200 OK", b"text/plain", robots.encode(), close)
            match = _PATH.match(path)
            if match is None:
                return 404, _response(b"404 Not Found", b"text/html", webserve._NOT_FOUND, close)
            data = image_bytes(match.group(2).decode(), "jpg", int(match.group(3)))
            extra = b"tdm-reservation: 1\r\n" if self.manners.tdm else b""
            return 200, _response(b"200 OK", b"image/jpeg", data, close, extra)
        if self.kind == "ratelimit":
            extra = b"Retry-After: %d\r\n" % self.retry_after
            return 429, _response(b"429 Too Many Requests", b"text/plain", b"rate limited\n", close, extra)
        data = self._body(path, close)
        return int(data[9:12]), data


def serve(listeners: list[tuple[int, webserve.Listener]], spec: dict, inflight, folder: Path) -> None:
    """Accept on every listener in one asyncio loop until SIGTERM, logging to ``folder``."""
    manners = [Manners(**m) for m in spec["manners"]]

    async def main() -> None:
        import signal

        loop = asyncio.get_running_loop()
        log = EventLog(folder)
        flusher = loop.create_task(log.run())
        servers = []
        for host, listener in listeners:
            kind = listener.kind

            def factory(host: int = host, kind: str = kind) -> _Polite:
                return _Polite(host, kind, spec, manners[host], inflight, log)

            servers.append(await loop.create_server(factory, sock=listener.sock, ssl=listener.tls, backlog=4096))
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        flusher.cancel()
        for server in servers:
            server.close()
        log.flush()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="webserve's spec plus manners [{...}] and events (a folder)")
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    try:
        listeners = webserve.bind_listeners(spec)
    except OSError as error:
        print(f"bind failed: {error}", flush=True)
        sys.exit(3)
    hosts = [index for index, (_, _, kind, _) in enumerate(spec["hosts"]) if kind != "refused"]
    indexed = list(zip(hosts, listeners, strict=True))
    inflight = multiprocessing.get_context("fork").Array("i", len(spec["hosts"]))
    folder = Path(spec["events"])
    folder.mkdir(parents=True, exist_ok=True)
    webserve.serve_forked(listeners, args.procs, lambda: serve(indexed, spec, inflight, folder))


if __name__ == "__main__":
    main()
