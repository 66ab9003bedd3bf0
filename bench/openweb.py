"""A benchmark that looks like the web: every client against a loopback stand-in of thousands of hosts.

    python3 bench/openweb.py [--n 20000] [--best-runs 3] [--dns] [--quick] [--replicas N --min-replicas M]

Builds a web from the host structure of a LAION sample (bench/webserve.py: one 127.x.y.z address per host, https
with a throwaway test CA, log-normal waits, slow / never-answering / resetting / refusing / 404 / HTML / 429 hosts),
starts its own redis-server, then sweeps each client once over its in-flight counts per process (2 processes each):
  suite-threads  add_task.py + 2 x downloader.py --until-empty, LAION_ENGINE=threads, LAION_THREAD_NUM=k
  suite-async    the same with LAION_ENGINE=async, LAION_CONCURRENCY=k, on uvloop (LAION_ENGINE_LOOP=uvloop)
  suite-async-asyncio  suite-async on asyncio's own event loop (LAION_ENGINE_LOOP=asyncio)
  img2dataset    --processes_count 2 --thread_count k (bench/work/venv), trusting the CA through SSL_CERT_FILE
  bare           bench/bare.py aiohttp, k coroutines per process
and runs each client 3 more times at its best point (the most steady images/s), the order rotating. Every client
gets one try per URL, connect 5 s / read 10 s. With --dns the hosts are names under .test answered by dnsmasq
inside a network namespace the benchmark makes (and always removes). Nothing leaves this machine's loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import resource
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from webserve import DNS_DOMAIN, Web, build_web, ensure_tls, sample_hosts

import speed
from speed import BENCH, ROOT, WORK, RedisService, Result, Setup

DEFAULT_THREAD_NUM = runpy.run_path(str(ROOT / "setting.py"))["thread_num"]  # what suite-async runs leave alone
SAMPLE = ROOT.parent / "shared" / "data" / "laion_sample_10000.parquet"
TLS_DIR = WORK / "openweb-tls"
CONNECT_TIMEOUT, READ_TIMEOUT = 5, 10
SWEEP = {
    "img2dataset": [64, 128, 256, 512],
    "suite-threads": [32, 64, 128, 256],
    "suite-async": [256, 512, 1024],
    "suite-async-asyncio": [512],
    "bare": [512],
}
QUICK_SWEEP = {
    "suite-threads": [64],
    "suite-async": [256],
    "suite-async-asyncio": [256],
    "img2dataset": [128],
    "bare": [256],
}
SUITES = ("suite-threads", "suite-async", "suite-async-asyncio")
SPEED_CLIENT = {**dict.fromkeys(SUITES, "suite"), "img2dataset": "img2dataset", "bare": "aiohttp"}
ROLE = {**dict.fromkeys(SUITES, "workers"), "img2dataset": "img2dataset", "bare": "aiohttp"}
DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
IP = shutil.which("ip") or "/usr/sbin/ip"
NS_RESOLVER = "127.0.0.53"


# --- the web server -------------------------------------------------------------------------------------------


class WebService(speed.ServerProcess):
    """bench/webserve.py on one free port for every host address (IP variant) or on 80 / 443 (DNS variant)."""

    def __init__(self, web: Web, by_name: bool, folder: Path, procs: int) -> None:
        addresses = [host.address for host in web.hosts if host.https]
        self.ca_file, certs, wildcard = ensure_tls(TLS_DIR, [] if by_name else addresses)
        spec = {
            "seed": web.seed,
            "hosts": [
                [host.address, host.https, host.kind, str(wildcard if by_name else certs.get(host.address, ""))]
                for host in web.hosts
            ],
        }
        self.process, self.http_port, self.https_port = launch_web(
            "webserve.py", spec, folder, procs, (80, 443) if by_name else None
        )
        self.ps = psutil.Process(self.process.pid)
        self.urls = web.urls(self.http_port, self.https_port, by_name)


def launch_web(
    script: str, spec: dict, folder: Path, procs: int, ports: tuple[int, int] | None = None
) -> tuple[subprocess.Popen, int, int]:
    """Start ``script`` (bench/webserve.py, or a web built on it) serving ``spec`` on ``ports`` (http, https), else on
    one free port, tried again while another process takes it first; return it once ready, with its ports."""
    line = ""
    for _ in range(1 if ports else 20):
        http_port, https_port = ports or (speed.free_port(),) * 2
        spec_file = folder / "web.json"
        spec_file.write_text(json.dumps({**spec, "http_port": http_port, "https_port": https_port}))
        command = [sys.executable, str(BENCH / script), "--spec", str(spec_file), "--procs", str(procs)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = process.stdout.readline() if process.stdout else ""
        if line.startswith("ready"):
            return process, http_port, https_port
        process.wait()
    raise RuntimeError(f"web server did not start: {line.strip()}")


# --- one measured point ---------------------------------------------------------------------------------------


@dataclass
class Point:
    client: str
    inflight: int
    phase: str  # "sweep" or "best"
    run: int
    tasks: int
    stored: int = 0
    failed: int = 0
    seconds: float = 0.0
    steady: float = 0.0  # images/s between the 5 % and 95 % points of the stored images
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds
    rss_mb: dict[str, float] = field(default_factory=dict)  # role -> peak RSS of one process
    heartbeat_gap_max: float | None = None
    leases_lost: int = 0
    books: str = "-"
    statuses: dict[str, int] = field(default_factory=dict)
    note: str = ""

    @property
    def role(self) -> str:
        return ROLE[self.client]

    @property
    def whole(self) -> float:
        return self.stored / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_task(self) -> float:
        return 1000 * self.cpu.get(self.role, 0.0) / self.tasks

    @property
    def images_per_cpu_s(self) -> float:
        cpu = self.cpu.get(self.role, 0.0)
        return self.stored / cpu if cpu else 0.0


def image_times(folder: Path) -> list[float]:
    """Modification times of every stored .jpg under ``folder`` (the moment each image was written), sorted."""
    times = []
    stack = [str(folder)]
    while stack:
        with contextlib.suppress(FileNotFoundError), os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name != ".tmp":
                        stack.append(entry.path)
                elif entry.name.endswith(".jpg"):
                    times.append(entry.stat().st_mtime)
    return sorted(times)


def steady_rate(times: list[float]) -> float:
    """Images per second between the 5 % and the 95 % points of the images stored."""
    if len(times) < 20:
        return 0.0
    first, last = int(0.05 * len(times)), int(0.95 * len(times)) - 1
    span = times[last] - times[first]
    return (last - first) / span if span > 0 else 0.0


def worker_log_figures(log: Path) -> tuple[float | None, int]:
    """Longest heartbeat gap reported by any worker, and tasks lost to missed heartbeats (lease_lost and
    leases_recovered lines)."""
    gap: float | None = None
    lost = 0
    for path in log.glob("worker-*.log"):
        text = path.read_text(errors="replace")
        for value in re.findall(r"worker_exit .*heartbeat_gap_max=([0-9.]+)", text):
            gap = max(gap or 0.0, float(value))
        for outcomes, applied in re.findall(r"lease_lost .*outcomes=(\d+) applied=(\d+)", text):
            lost += int(outcomes) - int(applied)
        lost += sum(int(x) for x in re.findall(r"leases_recovered .*tasks=(\d+)", text))
    return gap, lost


def check_books(setup: Setup, stored_files: int) -> tuple[str, dict[str, int]]:
    """'ok' when added = succeeded + failed + queued + delayed + held and every success is a file; and the
    failure statuses of the error records."""
    client = setup.redis.client
    task = speed.TASK_KEY
    added = int(client.get("laion5b_tongji_all") or 0)
    succeeded = int(client.get("laion5b_tongji_succ") or 0)
    failed = int(client.get("laion5b_tongji_error") or 0)
    queued = client.llen(task)
    delayed = client.zcard(f"{task}:delayed") if client.type(f"{task}:delayed") == "zset" else 0
    held = sum(client.llen(key) for key in client.scan_iter(f"{task}:lease:*"))
    statuses = Counter(json.loads(raw).get("status", "?") for raw in client.lrange("laion5b_task_error", 0, -1))
    problems = []
    if added != setup.n:
        problems.append(f"added {added} != {setup.n}")
    if added != succeeded + failed + queued + delayed + held:
        problems.append(f"{added} != {succeeded}+{failed}+{queued}+{delayed}+{held}")
    if queued or delayed or held:
        problems.append(f"left: {queued} queued, {delayed} delayed, {held} held")
    if stored_files != succeeded:
        problems.append(f"{stored_files} files != {succeeded} succeeded")
    return ("ok" if not problems else "; ".join(problems)), dict(statuses.most_common())


def measure(setup: Setup, base_env: dict[str, dict[str, str]], client: str, inflight: int, phase: str, run: int,
            root: Path) -> Point:  # fmt: skip
    """One run of one client at one in-flight count."""
    setup.threads = DEFAULT_THREAD_NUM if client.startswith("suite-async") else inflight  # the suite's THREAD_NUM
    setup.client_env = {name: dict(env) for name, env in base_env.items()}
    if client.startswith("suite"):
        engine, _, loop = client.removeprefix("suite-").partition("-")
        setup.client_env["suite"]["LAION_ENGINE"] = engine
        if engine == "async":
            setup.client_env["suite"]["LAION_CONCURRENCY"] = str(inflight)
            setup.client_env["suite"]["LAION_ENGINE_LOOP"] = loop or "uvloop"
    store = root / f"{client}-{inflight}-{phase}{run}"
    shutil.rmtree(store, ignore_errors=True)
    label = f"{phase}-{client}-{inflight}"
    try:
        result: Result = speed.measure(setup, SPEED_CLIENT[client], label, run, store)
        times = image_times(store)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    point = Point(client, inflight, phase, run, setup.n, result.stored, result.failed, result.seconds)
    point.steady = steady_rate(times)
    point.cpu, point.rss_mb, point.note = result.cpu, result.rss_mb, result.note.strip()
    if client.startswith("suite"):
        point.heartbeat_gap_max, point.leases_lost = worker_log_figures(setup.logs / f"{label}-{run}-suite")
        point.books, point.statuses = check_books(setup, len(times))
    return point


# --- reporting ------------------------------------------------------------------------------------------------

HEADER = (
    "| client | in flight/process | phase | images/s whole | images/s steady | stored/failed | client CPU ms/task "
    "| images per client CPU s | server CPU ms/task | peak RSS MB/process | heartbeat gap max s | leases lost | books "
    "| note |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(point: Point) -> str:
    rss = ", ".join(f"{name} {value:.0f}" for name, value in sorted(point.rss_mb.items()))
    server = 1000 * point.cpu.get("image server", 0.0) / point.tasks
    gap = "-" if point.heartbeat_gap_max is None else f"{point.heartbeat_gap_max:.2f}"
    suite = point.client.startswith("suite")
    statuses = ", ".join(f"{name} {count}" for name, count in list(point.statuses.items())[:5])
    note = "; ".join(part for part in (point.note, statuses) if part)
    return (
        f"| {point.client} | {point.inflight} | {point.phase} {point.run} | {point.whole:.0f} | {point.steady:.0f} "
        f"| {point.stored}/{point.failed} | {point.cpu_ms_per_task:.2f} | {point.images_per_cpu_s:.0f} | {server:.2f} "
        f"| {rss} | {gap} | {point.leases_lost if suite else '-'} | {point.books} | {note} |"
    )


def judge(points: list[Point], phase: str) -> list[str]:
    """The issue's targets for suite-async, each ratio taken within one run (of ``phase``) before its median."""
    runs: dict[int, dict[str, Point]] = {}
    for point in points:
        if point.phase == phase:
            runs.setdefault(point.run, {})[point.client] = point
    ratios: dict[str, list[float]] = {}
    for by_client in runs.values():
        mine, i2d, bare = (by_client.get(name) for name in ("suite-async", "img2dataset", "bare"))
        if mine is None:
            continue
        if i2d and i2d.images_per_cpu_s:
            ratios.setdefault("images per own CPU s ÷ img2dataset's (≥ 2)", []).append(
                mine.images_per_cpu_s / i2d.images_per_cpu_s
            )
        if bare and bare.steady:
            ratios.setdefault("steady images/s ÷ bare aiohttp's (≥ 0.8)", []).append(mine.steady / bare.steady)
        if bare and bare.cpu_ms_per_task:
            ratios.setdefault("CPU per task ÷ bare aiohttp's (≤ 1.3)", []).append(
                mine.cpu_ms_per_task / bare.cpu_ms_per_task
            )
    lines = []
    for name, values in ratios.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"- suite-async {name}: median **{statistics.median(values):.2f}** (runs: {shown})")
    at_1024 = [p.rss_mb.get("workers", 0.0) for p in points if p.client == "suite-async" and p.inflight == 1024]
    if at_1024:
        lines.append(f"- suite-async worker peak RSS at concurrency 1024 (≤ 300 MB): **{max(at_1024):.0f} MB**")
    suite = [p for p in points if p.client.startswith("suite")]
    lost = sum(p.leases_lost for p in suite)
    gaps = [p.heartbeat_gap_max for p in suite if p.heartbeat_gap_max is not None]
    gap = f"{max(gaps):.2f} s" if gaps else "not logged"
    lines.append(f"- leases lost to a missed heartbeat, all suite runs (0): **{lost}**; longest heartbeat gap: {gap}")
    bad = [f"{p.client} {p.inflight} {p.phase} {p.run}" for p in suite if p.books != "ok"]
    lines.append(f"- books of every suite run: {'**ok**' if not bad else 'NOT ok in ' + ', '.join(bad)}")
    return lines


def describe_web(web: Web, service: WebService, by_name: bool) -> str:
    stats = web.stats()
    kinds = ", ".join(
        f"{kind} {100 * stats[f'hosts_{kind}']:.1f} % of hosts / {100 * stats[f'urls_{kind}']:.1f} % of URLs"
        for kind in ("ok", "slow", "never", "reset", "refused", "notfound", "html", "ratelimit")
    )
    where = f"names under .{DNS_DOMAIN} (dnsmasq in a network namespace)" if by_name else "IP literals"
    return (
        f"web: {stats['urls']:.0f} URLs on {stats['hosts']:.0f} hosts ({where}, ports {service.http_port}/"
        f"{service.https_port}); top host {100 * stats['top1']:.1f} %, top 10 {100 * stats['top10']:.1f} %, top 100 "
        f"{100 * stats['top100']:.1f} %, on once-seen hosts {100 * stats['once']:.1f} %, https "
        f"{100 * stats['https']:.1f} % of URLs\nkinds: {kinds}"
    )


# --- the benchmark --------------------------------------------------------------------------------------------


def parse_sweep(text: str, quick: bool) -> dict[str, list[int]]:
    """``client=k,k;client=k`` overrides of the default sweep (QUICK_SWEEP with --quick)."""
    sweep = dict(QUICK_SWEEP if quick else SWEEP)
    for part in filter(None, text.split(";")):
        name, _, counts = part.partition("=")
        if name not in SWEEP:
            raise SystemExit(f"unknown client {name!r} in --sweep (one of {', '.join(SWEEP)})")
        sweep[name] = [int(count) for count in counts.split(",") if count]
    return sweep


def run_benchmark(args: argparse.Namespace, by_name: bool) -> int:
    clients = [c for c in args.clients.split(",") if c]
    sweep = {client: counts for client, counts in parse_sweep(args.sweep, args.quick).items() if client in clients}
    venv_python, venv_note = speed.ensure_venv()
    if venv_note:
        print(f"warning: {venv_note}; img2dataset/bare clients may fail", flush=True)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    web = build_web(sample_hosts(Path(args.sample)), args.n, args.seed)
    temp = Path(tempfile.mkdtemp(prefix="openweb-", dir=WORK))
    (temp / "redis").mkdir()
    redis_service = RedisService(temp / "redis")
    replicas = []
    for number in range(args.replicas):
        (temp / f"replica{number}").mkdir()
        replicas.append(RedisService(temp / f"replica{number}", replica_of=redis_service.port))
    server = WebService(web, by_name, temp, args.server_procs)
    root = Path("/dev/shm") / f"laion5b-openweb-{os.getpid()}"
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = f"python3 bench/openweb.py {' '.join(args.argv)}"
    print(f"# openweb run {stamp}{' (quick check)' if args.quick else ''}\n\ncommand: `{command}`\n")
    print(f"machine: {speed.machine()}\n\n{describe_web(web, server, by_name)}\n")
    print(f"2 processes per client, connect {CONNECT_TIMEOUT} s / read {READ_TIMEOUT} s, one try per URL, store on "
          f"tmpfs; suite max_per_host {args.max_per_host}; Redis replicas {args.replicas}, suite redis_min_replicas "
          f"{args.min_replicas}\n")  # fmt: skip
    points: list[Point] = []
    try:
        parquet_dir, parquet, tsv = speed.write_url_inputs(temp, server.urls)
        setup = Setup(args.n, 2, 0, args.max_bytes, False, parquet_dir, parquet, tsv, redis_service, server,
                      venv_python, temp / "logs", args.profile)  # fmt: skip
        ca = str(server.ca_file)
        base_env = {
            "suite": {
                "LAION_MAX_ATTEMPTS": "1",
                "LAION_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
                "LAION_READ_TIMEOUT": str(READ_TIMEOUT),
                "LAION_RETRY_BACKOFF": "0.5",
                "LAION_TLS_CA_FILE": ca,
                "LAION_MAX_PER_HOST": str(args.max_per_host),
                "LAION_REDIS_MIN_REPLICAS": str(args.min_replicas),
            },
            "img2dataset": {"SSL_CERT_FILE": ca, "NO_ALBUMENTATIONS_UPDATE": "1"},
        }
        setup.bare_args = ["--ca-file", ca]
        print(f"## sweep (one run per point)\n\n{HEADER}", flush=True)
        for client, counts in sweep.items():
            for inflight in counts:
                points.append(measure(setup, base_env, client, inflight, "sweep", 0, root))
                print(row(points[-1]), flush=True)
        best = {
            client: max((p for p in points if p.client == client), key=lambda p: p.steady).inflight for client in sweep
        }
        phase = "sweep"
        if args.best_runs:
            phase = "best"
            print(f"\n## {args.best_runs} runs at each client's best point: {best}\n\n{HEADER}", flush=True)
            order = list(best)
            for run in range(args.best_runs):
                for client in order[run % len(order) :] + order[: run % len(order)]:
                    points.append(measure(setup, base_env, client, best[client], "best", run, root))
                    print(row(points[-1]), flush=True)
        print(f"\n## targets (from the {phase} runs)\n")
        print("\n".join(judge(points, phase)), flush=True)
    finally:
        server.stop()
        for replica in replicas:
            replica.stop()
        redis_service.stop()
        shutil.rmtree(root, ignore_errors=True)
        out = WORK / f"openweb-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
        out.write_text(json.dumps([asdict(p) for p in points], indent=1))
        if not args.keep:
            shutil.rmtree(temp, ignore_errors=True)
    return 0


# --- the DNS variant: a network namespace with dnsmasq --------------------------------------------------------


def namespace_problem() -> str | None:
    """Why the DNS variant cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if not shutil.which("ip"):
        return "iproute2's ip command is not installed"
    if not Path(DNSMASQ).exists():
        if not shutil.which("apt-get"):
            return "dnsmasq is not installed and there is no apt-get to install dnsmasq-base"
        print("installing dnsmasq-base (once)", flush=True)
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "dnsmasq-base"]):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                return f"{' '.join(command)} failed: {' '.join(result.stderr.split()[-20:])}"
    return None


def run_in_namespace(args: argparse.Namespace) -> int:
    """Make a namespace with lo up, its own resolv.conf and a dnsmasq answering for .test names; run the
    benchmark inside it; always remove namespace, /etc/netns/NAME and every process in it."""
    problem = namespace_problem()
    if problem:
        print(f"DNS variant skipped: {problem}", flush=True)
        return 0
    speed.ensure_venv()  # pip needs the real network: install before entering the namespace
    name = f"l5bweb{os.getpid()}"
    etc = Path("/etc/netns") / name
    folder = Path(tempfile.mkdtemp(prefix="openweb-dns-", dir=WORK))
    processes: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        made = subprocess.run([IP, "netns", "add", name], capture_output=True, text=True)
        if made.returncode != 0:
            print(f"DNS variant skipped: ip netns add failed: {made.stderr.strip()}", flush=True)
            return 0
        subprocess.run([IP, "netns", "exec", name, IP, "link", "set", "lo", "up"], check=True)
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {NS_RESOLVER}\noptions timeout:2 attempts:2\n")
        web = build_web(sample_hosts(Path(args.sample)), args.n, args.seed)
        hosts_file = folder / "hosts"
        hosts_file.write_text("".join(f"{host.address} {host.name}\n" for host in web.hosts))
        dnsmasq = [
            DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            f"--addn-hosts={hosts_file}", f"--listen-address={NS_RESOLVER}", "--bind-interfaces", "--local=/test/",
            "--cache-size=10000", "--user=root", "--pid-file", f"--log-facility={folder / 'dnsmasq.log'}",
        ]  # fmt: skip
        processes.append(subprocess.Popen([IP, "netns", "exec", name, *dnsmasq], start_new_session=True))
        probe = web.hosts[0].name
        deadline = time.monotonic() + 10
        while True:
            lookup = [IP, "netns", "exec", name, "getent", "hosts", probe]
            found = subprocess.run(lookup, capture_output=True, text=True)
            if found.stdout.split()[:1] == [web.hosts[0].address]:
                break
            if time.monotonic() > deadline:
                print(f"DNS variant skipped: dnsmasq in {name} does not answer for {probe}", flush=True)
                return 0
            time.sleep(0.1)
        print(f"namespace {name}: dnsmasq at {NS_RESOLVER} answers {probe} -> {web.hosts[0].address}", flush=True)
        inner = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--inside-namespace"]
        process = subprocess.Popen([IP, "netns", "exec", name, *inner], start_new_session=True)
        processes.append(process)
        return process.wait()
    finally:
        for process in reversed(processes):
            _stop_session(process)
        pids = subprocess.run([IP, "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run([IP, "netns", "del", name], capture_output=True)
        shutil.rmtree(etc, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        print(f"namespace {name} removed", flush=True)


def _stop_session(process: subprocess.Popen) -> None:
    """SIGTERM the session ``process`` leads, SIGKILL it after 20 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="URLs per run (default 20000)")
    parser.add_argument("--quick", action="store_true", help="one point per client, no best-point runs")
    parser.add_argument("--best-runs", type=int, default=3, help="runs at each client's best point (default 3)")
    parser.add_argument("--clients", default=",".join(SWEEP), help=f"comma-separated subset of {', '.join(SWEEP)}")
    parser.add_argument("--sweep", default="", help="override in-flight counts, e.g. 'bare=256,512;suite-async=512'")
    parser.add_argument("--dns", action="store_true", help="hosts as .test names, dnsmasq in a network namespace")
    parser.add_argument("--seed", type=int, default=1, help="seed of the web (hosts' kinds, sizes, order, waits)")
    parser.add_argument("--sample", default=str(SAMPLE), help="LAION parquet whose host structure is replayed")
    parser.add_argument("--max-per-host", type=int, default=16, help="the suite's max_per_host (default 16)")
    parser.add_argument("--max-bytes", type=int, default=4 * 2**20, help="body cap of every client (4 MiB)")
    parser.add_argument("--server-procs", type=int, default=2, help="web server processes (default 2)")
    parser.add_argument("--replicas", type=int, default=0, help="replicas of the bench's Redis (default 0)")
    parser.add_argument("--min-replicas", type=int, default=0, help="the suite's redis_min_replicas (default 0)")
    parser.add_argument("--keep", action="store_true", help="keep logs (bench/work/openweb-*)")
    parser.add_argument("--profile", action="store_true", help="run suite worker 0 under py-spy (bench/work/profile-*)")
    parser.add_argument("--inside-namespace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.argv = [a for a in sys.argv[1:] if a != "--inside-namespace"]
    if args.quick:
        args.best_runs = 0
    WORK.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background (SIG_IGN)
    if args.dns and not args.inside_namespace:
        return run_in_namespace(args)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return run_benchmark(args, by_name=args.dns)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything the benchmark started is stopped", flush=True)
        sys.exit(130)
