"""The politeness benchmark: what the owners of a web-like stand-in's hosts see of the suite and of img2dataset.

    python3 bench/polite.py [--n 10000] [--rounds 3] [--quick] [--parts polite,plain,scale]

Three parts, each on bench/politeweb.py's server (openweb.py's stand-in with a log of every request it answered):
  polite  the stand-in with hosts of limited capacity (429, Retry-After: 1 above 4 requests in progress), robots.txt
          rules, Crawl-delay and the TDMRep header: the suite (2 async processes, 1,024 in flight each, every other
          setting at its default, run until the queue is empty) against img2dataset (2 processes x 128 threads,
          its best point on the stand-in) on the same server
  plain   openweb.py's stand-in as it is, robots off: the suite with fleet-wide accounting (max_per_host 16) and
          without (max_per_host 0), and with robots on; openweb.py's one try per URL; --rounds rounds, the order
          rotating, each ratio taken within a round
  scale   what robots.txt costs at LAION scale, from the sample's host frequencies (Heaps' law, see ``scale``)
Figures per run: images stored, 429s provoked, the most requests in progress at any host and IP, disallowed-path
requests, Crawl-delay violations, robots.txt requests per host, Redis commands and CPU per task. Nothing leaves
this machine's loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import random
import re
import resource
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pyarrow.parquet as pq
from openweb import CONNECT_TIMEOUT, READ_TIMEOUT, SAMPLE, TLS_DIR, check_books, image_times, launch_web, steady_rate
from politeweb import PoliteWeb, polite_web, read_events, traffic
from webserve import build_web, ensure_tls, sample_hosts

import speed
from speed import ROOT, WORK, RedisService, Setup

SETTINGS = runpy.run_path(str(ROOT / "setting.py"))
FEATURES = ("robots", "host_start_concurrency", "max_per_ip", "max_crawl_delay")
MAX_PER_HOST = 16
_URL_INDEX = re.compile(r"/(?:img|private)/(\d+)-\d+\.jpg$")


# --- the server -----------------------------------------------------------------------------------------------


class PoliteService(speed.ServerProcess):
    """bench/politeweb.py on one free port for every host address, logging to ``folder``/events."""

    def __init__(self, pweb: PoliteWeb, folder: Path, procs: int, retry_after: int) -> None:
        web = pweb.web
        self.ca_file, certs, _ = ensure_tls(TLS_DIR, [host.address for host in web.hosts if host.https])
        self.events = folder / "events"
        spec = {
            "seed": web.seed,
            "hosts": [[h.address, h.https, h.kind, str(certs.get(h.address, ""))] for h in web.hosts],
            "manners": [m.__dict__ for m in pweb.manners],
            "events": str(self.events),
            "ratelimit_retry_after": retry_after,
        }
        self.process, port, _ = launch_web("politeweb.py", spec, folder, procs)
        self.ps = psutil.Process(self.process.pid)
        self.urls = pweb.urls(port, port, False)


# --- one run --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    part: str
    label: str
    client: str
    round: int
    tasks: int
    stored: int = 0
    failed: int = 0
    seconds: float = 0.0
    steady: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    redis_commands: int = 0
    books: str = "-"
    statuses: dict[str, int] = field(default_factory=dict)
    traffic: dict = field(default_factory=dict)
    limited_held: int = 0
    limited_stored: int = 0
    tdm_stored: int = 0
    disallowed_stored: int = 0
    robots_keys: int = 0
    redis_top: dict[str, float] = field(default_factory=dict)  # the most called commands, calls per task
    redis_connections: int = 0  # connections Redis accepted during the run
    robots_bytes: int = 0
    note: str = ""

    @property
    def whole(self) -> float:
        return self.stored / self.seconds if self.seconds else 0.0

    def per_task(self, role: str) -> float:
        return 1000 * self.cpu.get(role, 0.0) / self.tasks


def stored_urls(store: Path, client: str) -> set[int]:
    """URL indexes of the images a client stored: the suite's files are named by SAMPLE_ID (= the index),
    img2dataset's shard parquets list url and status."""
    if client == "img2dataset":
        found = set()
        for path in store.glob("*.parquet"):
            table = pq.read_table(path, columns=["url", "status"]).to_pylist()
            found.update(_index(row["url"]) for row in table if row["status"] == "success")
        return found
    found = set()
    for folder, _, names in os.walk(store):
        if not folder.endswith(".tmp"):
            found.update(int(float(name.rsplit(".", 1)[0])) for name in names if name.endswith(".jpg"))
    return found


def _index(url: str) -> int:
    match = _URL_INDEX.search(url)
    return int(match.group(1)) if match else -1


def stop_children(children: list[speed.Child], note: list[str]) -> None:
    """SIGTERM every child still running (the run's time is up, or the benchmark is stopped)."""
    note.append("timed out, stopped")
    for child in children:
        if child.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.process.pid, signal.SIGTERM)


def measure(setup: Setup, server: PoliteService, pweb: PoliteWeb, run: Run, env: dict[str, dict[str, str]],
            threads: int, store: Path, timeout: float) -> Run:  # fmt: skip
    """One client's run, then what its books, its store and the hosts' logs say."""
    setup.client_env, setup.threads = env, threads
    setup.redis.client.flushall()
    redis_cpu0, server_cpu0, commands0 = setup.redis.cpu(), server.cpu(), setup.redis.commands()
    by_command0 = command_calls(setup.redis)
    connections0 = setup.redis.client.info("stats")["total_connections_received"]
    log = setup.logs / f"{run.part}-{run.label}-{run.round}"
    log.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(store, ignore_errors=True)
    since, started = time.monotonic_ns(), time.monotonic()
    sampler = speed.RssSampler()  # not started: run_suite wants one
    if run.client == "suite":
        children = speed.run_suite(setup, store, log, sampler)
    else:
        children = speed.run_img2dataset(setup, store, log, sampler)
    note: list[str] = [f"load {os.getloadavg()[0]:.1f}"]
    timer = threading.Timer(timeout, stop_children, [children, note])
    timer.daemon = True
    timer.start()
    try:
        for child in children:
            speed.wait_child(child)
    finally:
        timer.cancel()
        stop_children([child for child in children if child.process.returncode is None], [])
    run.seconds = time.monotonic() - started
    until = time.monotonic_ns()
    run.cpu = {"redis": setup.redis.cpu() - redis_cpu0, "server": server.cpu() - server_cpu0}
    run.redis_commands = setup.redis.commands() - commands0
    by_command = Counter(command_calls(setup.redis))
    by_command.subtract(by_command0)
    run.redis_top = {name: round(calls / run.tasks, 3) for name, calls in by_command.most_common(4) if calls > 0}
    run.redis_connections = setup.redis.client.info("stats")["total_connections_received"] - connections0
    for child in children:
        run.cpu[child.role] = run.cpu.get(child.role, 0.0) + child.cpu
        if child.status != 0:
            note.append(f"{child.role} exit {child.status}")
    run.robots_keys, run.robots_bytes = robots_cache(setup.redis)
    time.sleep(0.5)  # the server flushes its log every 0.2 s
    run.traffic = traffic(pweb, *read_events(server.events, since, until))
    try:
        urls = stored_urls(store, run.client)
        run.steady = steady_rate(image_times(store))
        if run.client == "suite":
            run.books, run.statuses = check_books(setup, len(urls))
    finally:
        shutil.rmtree(store, ignore_errors=True)
    run.stored, run.failed = len(urls), setup.n - len(urls)
    url_hosts, manners = pweb.web.url_hosts, pweb.manners
    held = {i for i, host in enumerate(url_hosts) if manners[host].capacity}
    run.limited_held, run.limited_stored = len(held), len(held & urls)
    run.tdm_stored = sum(manners[url_hosts[i]].tdm for i in urls)
    run.disallowed_stored = sum(pweb.disallowed(i) for i in urls)
    note.append(f"server {run.per_task('server'):.2f} ms/task")
    run.note = "; ".join(note)
    return run


def command_calls(redis_service: RedisService) -> dict[str, int]:
    """Calls of each Redis command so far (INFO commandstats)."""
    stats = redis_service.client.info("commandstats")
    return {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}


def robots_cache(redis_service: RedisService) -> tuple[int, int]:
    """Keys of the fleet's robots.txt cache and their bytes (``MEMORY USAGE``, exact) in Redis."""
    client = redis_service.client
    keys = list(client.scan_iter(f"{speed.TASK_KEY}:robots:*", count=1000))
    return len(keys), sum(client.memory_usage(key, samples=0) or 0 for key in keys)


def suite_env(server: PoliteService, extra: dict[str, str]) -> dict[str, dict[str, str]]:
    """The suite's settings: async engine, 1,024 in flight per process (speed.run_suite sets the rest)."""
    return {"suite": {"LAION_ENGINE": "async", "LAION_TLS_CA_FILE": str(server.ca_file), **extra}}


# --- the parts ------------------------------------------------------------------------------------------------


def part_polite(args: argparse.Namespace, ctx: dict) -> list[Run]:
    """The suite at its defaults and img2dataset on the polite stand-in."""
    setup, server, pweb = ctx["setup"], ctx["server"], ctx["pweb"]
    extra = {"LAION_CONCURRENCY": str(args.inflight), "LAION_MAX_PER_HOST": str(MAX_PER_HOST)}
    if args.quick:  # retries sooner, so that a check ends in minutes
        extra.update(LAION_RETRY_BACKOFF="1", LAION_MAX_RETRY_AFTER="5")
    img2dataset_env = {"img2dataset": {"SSL_CERT_FILE": str(server.ca_file), "NO_ALBUMENTATIONS_UPDATE": "1"}}
    runs = []
    for label, client, env, threads in (
        ("suite", "suite", suite_env(server, extra), int(SETTINGS["thread_num"])),
        ("img2dataset", "img2dataset", img2dataset_env, args.img2dataset_threads),
    ):
        store = ctx["root"] / f"polite-{label}"
        run = measure(setup, server, pweb, Run("polite", label, client, 0, setup.n), env, threads, store, args.timeout)
        runs.append(run)
        print(polite_row(run), flush=True)
    return runs


PLAIN = {  # label -> the suite's settings of that run
    "on": {"LAION_MAX_PER_HOST": str(MAX_PER_HOST), "LAION_ROBOTS": "0"},
    "off": {"LAION_MAX_PER_HOST": "0", "LAION_ROBOTS": "0"},
    "unbound": {"LAION_MAX_PER_HOST": "4096", "LAION_HOST_START_CONCURRENCY": "4096", "LAION_ROBOTS": "0"},
    "robots": {"LAION_MAX_PER_HOST": str(MAX_PER_HOST), "LAION_ROBOTS": "1"},
}
"""``unbound``: the accounting runs but no host reaches its limit (the cost of the bookkeeping alone)."""


def part_plain(args: argparse.Namespace, ctx: dict) -> list[Run]:
    """Fleet accounting on / off / unbound and robots on, robots off otherwise, on the plain stand-in; the order
    rotates between rounds."""
    setup, server, pweb = ctx["setup"], ctx["server"], ctx["pweb"]
    labels = [label for label in args.plain_runs.split(",") if label != "robots" or ctx["features"]["robots"]]
    runs = []
    for number in range(args.rounds):
        for label in labels[number % len(labels) :] + labels[: number % len(labels)]:
            extra = {
                "LAION_CONCURRENCY": str(args.inflight),
                **PLAIN[label],
                "LAION_MAX_ATTEMPTS": "1",
                "LAION_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
                "LAION_READ_TIMEOUT": str(READ_TIMEOUT),
                "LAION_RETRY_BACKOFF": "0.5",
            }
            store = ctx["root"] / f"plain-{label}-{number}"
            run = Run("plain", label, "suite", number, setup.n)
            run = measure(setup, server, pweb, run, suite_env(server, extra), int(SETTINGS["thread_num"]), store,
                          args.timeout)  # fmt: skip
            runs.append(run)
            print(plain_row(run), flush=True)
    return runs


# --- reporting ------------------------------------------------------------------------------------------------

POLITE_HEADER = (
    "| client | stored/failed | s | images/s | requests | 429s on capacity hosts | most in progress: any host / "
    "capacity host / IP | most open connections | disallowed-path requests | Crawl-delay violations (shortest gap "
    "÷ delay) | robots.txt: requests / hosts / most per host (hosts asked again) | capacity hosts' images stored / "
    "held | TDM images stored | Redis cmds / CPU ms per task | client CPU ms/task | books, note |\n" + "|---" * 16 + "|"
)
PLAIN_HEADER = (
    "| round | run | max_per_host | robots | images/s whole | images/s steady | stored/failed | requests per image "
    "| robots.txt requests | most in progress at a host | Redis cmds per task | Redis CPU ms/task | client CPU "
    "ms/task | books, note |\n" + "|---" * 14 + "|"
)


def _client_cpu(run: Run) -> float:
    return run.per_task("workers" if run.client == "suite" else "img2dataset")


def _fleet_cpu(run: Run) -> float:
    """CPU ms per task of the workers and Redis together."""
    return run.per_task("workers") + run.per_task("redis")


def _top(run: Run) -> str:
    """The Redis commands called most, per task."""
    if run.client != "suite":
        return ""
    top = ", ".join(f"{name} {calls:.2f}" for name, calls in run.redis_top.items())
    return f"Redis per task {top}; Redis connections {run.redis_connections}"


def _redis(run: Run) -> str:
    if run.client != "suite":
        return "-"
    return f"{run.redis_commands / run.tasks:.2f} / {run.per_task('redis'):.3f}"


def polite_row(run: Run) -> str:
    t = run.traffic
    share = 100 * t["limited_429"] / t["limited_requests"] if t["limited_requests"] else 0.0
    shortest = "-" if t["crawl_shortest"] is None else f"{t['crawl_shortest']:.2f}"
    statuses = ", ".join(f"{name} {count}" for name, count in list(run.statuses.items())[:8])
    note = "; ".join(part for part in (run.books if run.client == "suite" else "", run.note, _top(run), statuses)
                     if part)  # fmt: skip
    return (
        f"| {run.label} | {run.stored}/{run.failed} | {run.seconds:.0f} | {run.whole:.0f} | {t['requests']} "
        f"| {t['limited_429']} of {t['limited_requests']} ({share:.1f} %) | {t['peak_host']} / {t['peak_limited']} "
        f"/ {t['peak_ip']} | {t['peak_open']} | {t['disallowed']} | {t['crawl_violations']} ({shortest}) "
        f"| {t['robots_requests']} / {t['robots_hosts']} / {t['robots_most']} ({t['robots_repeated']}) "
        f"| {run.limited_stored} / "
        f"{run.limited_held} | {run.tdm_stored} | {_redis(run)} | {_client_cpu(run):.2f} | {note} |"
    )


def plain_row(run: Run) -> str:
    t = run.traffic
    max_per_host, robots = PLAIN[run.label]["LAION_MAX_PER_HOST"], PLAIN[run.label]["LAION_ROBOTS"] == "1"
    per_image = t["requests"] / run.stored if run.stored else 0.0
    statuses = ", ".join(f"{name} {count}" for name, count in list(run.statuses.items())[:6])
    note = "; ".join(part for part in (run.books, run.note, _top(run), statuses) if part)
    return (
        f"| {run.round} | {run.label} | {max_per_host} | {'on' if robots else 'off'} | {run.whole:.0f} "
        f"| {run.steady:.0f} | {run.stored}/{run.failed} | {per_image:.3f} | {t['robots_requests']} "
        f"| {t['peak_host']} | {run.redis_commands / run.tasks:.2f} | {run.per_task('redis'):.3f} "
        f"| {_client_cpu(run):.2f} | {note} |"
    )


def _verdict(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


def judge_polite(runs: list[Run]) -> list[str]:
    suite = next((r for r in runs if r.label == "suite"), None)
    i2d = next((r for r in runs if r.label == "img2dataset"), None)
    if suite is None:
        return []
    t = suite.traffic
    share = t["limited_429"] / t["limited_requests"] if t["limited_requests"] else 0.0
    lines = [
        f"- most requests in progress at any host ≤ max_per_host {MAX_PER_HOST}: {t['peak_host']} (per IP "
        f"{t['peak_ip']}) {_verdict(t['peak_host'] <= MAX_PER_HOST and t['peak_ip'] <= MAX_PER_HOST)}",
        f"- Crawl-delay violations 0: {t['crawl_violations']} {_verdict(t['crawl_violations'] == 0)}",
        f"- requests to robots-disallowed paths 0: {t['disallowed']} {_verdict(t['disallowed'] == 0)}",
        f"- robots.txt at most once per host (hosts that answered it): most {t['robots_most']} "
        f"{_verdict(0 < t['robots_most'] <= 1)}" + "".join(f"\n  - {seen}" for seen in t["robots_repeated_seen"]),
        f"- 429s ≤ 5 % of the capacity hosts' requests: {t['limited_429']} of {t['limited_requests']}, "
        f"{100 * share:.1f} % {_verdict(share <= 0.05) if t['limited_requests'] else '(no capacity host)'}",
        f"- every image of the capacity hosts stored: {suite.limited_stored} of {suite.limited_held} "
        f"{_verdict(suite.limited_stored == suite.limited_held) if suite.limited_held else '(no capacity host)'}",
        f"- queue empty at the end (books): {suite.books}",
    ]
    if suite.robots_keys:
        per_host = suite.robots_bytes / suite.robots_keys
        lines.append(f"- Redis memory of the robots.txt cache (≤ 300 bytes per cached host): {suite.robots_keys} "
                     f"hosts, {per_host:.0f} bytes each (MEMORY USAGE) {_verdict(per_host <= 300)}")  # fmt: skip
    if i2d is not None:
        ti = i2d.traffic
        share_i = ti["limited_429"] / ti["limited_requests"] if ti["limited_requests"] else 0.0
        lines.append(
            f"- img2dataset on the same stand-in: 429s {100 * share_i:.1f} % of its capacity-host requests, "
            f"{i2d.limited_stored} of {i2d.limited_held} capacity-host images stored, {ti['disallowed']} "
            f"disallowed-path requests, {ti['crawl_violations']} Crawl-delay violations, {i2d.tdm_stored} "
            f"TDM-reserved images stored, most in progress at a host {ti['peak_host']}"
        )
    return lines


def judge_plain(runs: list[Run]) -> list[str]:
    rounds: dict[int, dict[str, Run]] = defaultdict(dict)
    for run in runs:
        rounds[run.round][run.label] = run
    ratios: dict[str, list[float]] = defaultdict(list)
    for by_label in rounds.values():
        on, off, unbound, robots = (by_label.get(name) for name in ("on", "off", "unbound", "robots"))
        if on and off and off.steady and off.whole:
            ratios["steady"].append(on.steady / off.steady)
            ratios["whole"].append(on.whole / off.whole)
        if on and off:
            ratios["cpu"].append(_fleet_cpu(on) / _fleet_cpu(off))
        if unbound and off and off.steady and off.whole:
            ratios["unbound steady"].append(unbound.steady / off.steady)
            ratios["unbound whole"].append(unbound.whole / off.whole)
            ratios["unbound commands"].append(unbound.redis_commands / unbound.tasks)
        if on:
            ratios["commands"].append(on.redis_commands / on.tasks)
        if on and robots and on.steady and on.stored and robots.stored:
            ratios["robots steady"].append(robots.steady / on.steady)
            ratios["robots whole"].append(robots.whole / on.whole)
            ratios["robots per image"].append(robots.traffic["robots_requests"] / robots.stored)
            if robots.robots_keys:
                ratios["robots bytes"].append(robots.robots_bytes / robots.robots_keys)
            ratios["extra per image"].append(
                robots.traffic["requests"] / robots.stored - on.traffic["requests"] / on.stored
            )

    def show(name: str) -> str:
        values = ratios[name]
        return f"median **{statistics.median(values):.3f}** (rounds: {', '.join(f'{v:.3f}' for v in values)})"

    lines = []
    if ratios["steady"]:
        ok = statistics.median(ratios["steady"]) >= 0.9
        lines.append(f"- images/s, accounting on ÷ off (≥ 0.9), steady: {show('steady')} {_verdict(ok)}; "
                     f"whole run: {show('whole')}")  # fmt: skip
    if ratios["cpu"]:
        lines.append(f"- CPU per task of workers and Redis together, accounting on ÷ off (steadier than rates on a "
                     f"shared machine): {show('cpu')}")  # fmt: skip
    if ratios["unbound steady"]:
        lines.append(f"- images/s, accounting unbound (max_per_host and host_start_concurrency 4,096: the bookkeeping "
                     f"alone) ÷ off, steady: {show('unbound steady')}; whole: {show('unbound whole')}; its Redis "
                     f"commands per task: {show('unbound commands')}")  # fmt: skip
    if ratios["commands"]:
        ok = max(ratios["commands"]) <= 1.6
        lines.append(f"- Redis commands per task, accounting on (≤ 1.6): {show('commands')} {_verdict(ok)}")
    if ratios["robots steady"]:
        lines.append(f"- images/s, robots on ÷ off, steady: {show('robots steady')}; whole: {show('robots whole')}")
        lines.append(f"- robots.txt requests per image stored: {show('robots per image')}; all extra requests "
                     f"per image (requests per image, robots on − off): {show('extra per image')}")  # fmt: skip
    if ratios["robots bytes"]:
        lines.append(f"- Redis bytes per cached robots.txt (≤ 300): {show('robots bytes')}")
    return lines


# --- robots.txt at LAION scale ------------------------------------------------------------------------------


def scale(sample: Path, seed: int) -> list[str]:
    """Distinct hosts per URL at LAION sizes, from the sample by Heaps' law: H(n) = K n^b fitted on random
    sub-samples (b constant: an upper bound, since b falls as n grows), and with b falling on as it falls between
    n = 1,000 and 10,000 (the local slopes' trend per decade carried on)."""
    table = pq.read_table(sample, columns=["URL"])
    hosts = [urlsplit(url).hostname or "" for url in table.column("URL").to_pylist() if url]
    rng = random.Random(seed)
    sizes = [500, 1000, 2000, 5000, len(hosts)]
    found = {n: statistics.mean(len(set(rng.sample(hosts, n))) for _ in range(20)) for n in sizes}
    logs = [(math.log(n), math.log(h)) for n, h in found.items()]
    fit = statistics.linear_regression([x for x, _ in logs], [y for _, y in logs])
    low_slope = (logs[1][1] - logs[0][1]) / (logs[1][0] - logs[0][0])
    high_slope = (logs[-1][1] - logs[-2][1]) / (logs[-1][0] - logs[-2][0])
    decades = (logs[-1][0] - logs[0][0]) / math.log(10)
    fall = (low_slope - high_slope) / decades  # per decade of n
    n0, h0 = len(hosts), found[len(hosts)]
    lines = [
        f"- the sample: {n0:,} URLs on {h0:,.0f} hosts = **{h0 / n0:.3f} hosts per URL**; distinct hosts in random "
        f"sub-samples: " + ", ".join(f"{n:,} URLs {h:,.0f}" for n, h in found.items()),
        f"- Heaps' law fit H = {math.exp(fit.intercept):.2f} n^{fit.slope:.3f}; local slope {low_slope:.3f} at "
        f"500-1,000 URLs, {high_slope:.3f} at 5,000-10,000 (falling {fall:.3f} per decade)",
    ]
    for name, n in (("LAION-400M", 4.0e8), ("LAION-2B-en", 2.32e9), ("LAION-5B", 5.85e9)):
        upper = math.exp(fit.intercept) * n**fit.slope
        extra = math.log10(n / n0)
        mean_slope = max(high_slope - fall * extra / 2, 0.0)
        falling = h0 * (n / n0) ** mean_slope
        lines.append(
            f"- {name} ({n:.3g} URLs): {falling:.3g}–{upper:.3g} hosts, i.e. **{falling / n:.4f}–{upper / n:.4f} "
            f"robots.txt fetches per URL** (slope falling on – constant)"
        )
    return lines


# --- the benchmark --------------------------------------------------------------------------------------------


def features() -> dict[str, bool]:
    """Which of the politeness settings the code under test has."""
    return {name: name in SETTINGS for name in FEATURES}


def run_part(args: argparse.Namespace, part: str, temp: Path, venv_python: Path | None) -> list[Run]:
    """Start Redis and the stand-in of ``part`` (polite or plain), run the part's clients, stop both."""
    web = build_web(sample_hosts(Path(args.sample)), args.n, args.seed)
    pweb = polite_web(web, args.capacity, plain=part == "plain")
    folder = temp / part
    (folder / "redis").mkdir(parents=True)
    redis_service = RedisService(folder / "redis")
    server = PoliteService(pweb, folder, args.server_procs, args.ratelimit_retry_after)
    root = Path("/dev/shm") / f"laion5b-polite-{os.getpid()}"
    try:
        parquet_dir, parquet, tsv = speed.write_url_inputs(folder, server.urls)
        setup = Setup(args.n, 2, 0, 4 * 2**20, False, parquet_dir, parquet, tsv, redis_service, server,
                      venv_python, folder / "logs")  # fmt: skip
        ctx = {"setup": setup, "server": server, "pweb": pweb, "root": root, "features": features()}
        stats = web.stats()
        print(f"\n## {part} stand-in\n\nweb: {stats['urls']:.0f} URLs on {stats['hosts']:.0f} hosts, top host "
              f"{100 * stats['top1']:.1f} %, on once-seen hosts {100 * stats['once']:.1f} %, https "
              f"{100 * stats['https']:.1f} %", flush=True)  # fmt: skip
        if part == "polite":
            counts = ", ".join(f"{name} {value}" for name, value in sorted(pweb.counts().items()))
            print(f"manners: {counts}; capacity {args.capacity} requests in progress\n\n{POLITE_HEADER}", flush=True)
            return part_polite(args, ctx)
        print(f"\n{PLAIN_HEADER}", flush=True)
        return part_plain(args, ctx)
    finally:
        server.stop()
        redis_service.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="URLs per run (default 10000; --quick: 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the plain part (default 3; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="N 2000, one round, retries after 1-5 s: a few minutes")
    parser.add_argument("--parts", default="polite,plain,scale", help="comma-separated subset of polite,plain,scale")
    parser.add_argument("--plain-runs", default=",".join(PLAIN), help=f"runs of the plain part ({','.join(PLAIN)})")
    parser.add_argument("--inflight", type=int, default=1024, help="the suite's concurrency per process (1024)")
    parser.add_argument("--img2dataset-threads", type=int, default=128, help="img2dataset threads per process")
    parser.add_argument("--capacity", type=int, default=4, help="requests in progress a capacity host takes (4)")
    parser.add_argument("--ratelimit-retry-after", type=int, default=10,
                        help="Retry-After of the always-429 hosts, seconds (10; openweb.py's: 120)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1800, help="seconds after which a run is stopped")
    parser.add_argument("--seed", type=int, default=1, help="seed of the web")
    parser.add_argument("--sample", default=str(SAMPLE), help="LAION parquet whose host structure is replayed")
    parser.add_argument("--server-procs", type=int, default=2, help="web server processes (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep logs and the server's request log")
    args = parser.parse_args()
    if args.quick:
        args.n = 2000 if "--n" not in sys.argv else args.n
        args.rounds = 1 if "--rounds" not in sys.argv else args.rounds
    parts = [p for p in args.parts.split(",") if p]
    WORK.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    venv_python, venv_note = speed.ensure_venv() if "polite" in parts else (None, "")
    if venv_note:
        print(f"warning: {venv_note}; img2dataset may fail", flush=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    found = ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in features().items())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    command = " ".join(["python3 bench/polite.py", *sys.argv[1:]])
    print(f"# polite run {stamp}{' (quick check)' if args.quick else ''}\n\ncommand: `{command}`\n\ncode: "
          f"{commit.stdout.strip()} (settings present: {found})\n\nmachine: "
          f"{speed.machine()}; load average at the start {os.getloadavg()[0]:.1f}\n", flush=True)  # fmt: skip
    temp = Path(tempfile.mkdtemp(prefix="polite-", dir=WORK))
    runs: list[Run] = []
    try:
        for part in ("polite", "plain"):
            if part in parts:
                runs += run_part(args, part, temp, venv_python)
        lines = judge_polite([r for r in runs if r.part == "polite"])
        lines += judge_plain([r for r in runs if r.part == "plain"])
        if lines:
            print("\n## targets\n\n" + "\n".join(lines), flush=True)
        if "scale" in parts:
            print("\n## robots.txt at LAION scale\n\n" + "\n".join(scale(Path(args.sample), args.seed)), flush=True)
    finally:
        out = WORK / f"polite-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
        out.write_text(json.dumps([run.__dict__ for run in runs], indent=1))
        if not args.keep:
            shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything the benchmark started is stopped", flush=True)
        sys.exit(130)
