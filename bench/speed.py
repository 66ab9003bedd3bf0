"""Speed harness: this suite against img2dataset and bare HTTP clients, on one loopback server, in one run.

    python3 bench/speed.py [--n 20000] [--runs 3] [--modes disk,tmpfs] [--failures]

Starts its own redis-server (free loopback port, temporary folder, stopped by PID) and a multi-process loopback
image server (bench/imgserve.py), writes a LAION-shaped parquet of N URLs, then for each mode (disk: a folder under
bench/work; tmpfs: /dev/shm) and each run measures, in an order that rotates between runs:
  suite       add_task.py + W x downloader.py NAME --until-empty (T threads each)
  img2dataset --output_format files --resize_mode no, W processes x T threads (in bench/work/venv)
  requests, urllib3, aiohttp   bare clients (bench/bare.py), W processes x T threads/coroutines, writing files
Each prints images/s, MB/s, CPU ms per image (clients, producer, Redis server and image server apart), peak RSS per
process, Redis commands and client round trips per task; then medians over the runs and the ratios, each ratio
taken within one run before its median. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import redis

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
WORK = BENCH / "work"
VENV = WORK / "venv"
VENV_PACKAGES = ["img2dataset", "aiohttp", "requests", "urllib3"]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
CLIENTS = ("suite", "img2dataset", "requests", "urllib3", "aiohttp")
TASK_KEY = "laion5b_task"
SLOW_SECONDS = 1.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- services -------------------------------------------------------------------------------------------------


class RedisService:
    def __init__(self, folder: Path, replica_of: int | None = None) -> None:
        """A redis-server with AOF in ``folder``; a replica of the one on port ``replica_of`` when it is given."""
        self.port = free_port()
        command = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
            "--logfile", str(folder / "redis.log"), "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.ps = psutil.Process(self.process.pid)

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def commands(self) -> int:
        stats = self.client.info("commandstats")
        return sum(value["calls"] for name, value in stats.items() if name not in ("cmdstat_info", "cmdstat_flushall"))

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)


class ServerProcess:
    """A server subprocess (with its children) whose CPU the harness reports and which it stops by PID."""

    process: subprocess.Popen
    ps: psutil.Process

    def cpu(self) -> float:
        total = 0.0
        for process in [self.ps, *self.ps.children()]:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)


class ImageService(ServerProcess):
    def __init__(self, procs: int, files: Path | None = None) -> None:
        self.port = free_port()
        command = [sys.executable, str(BENCH / "imgserve.py"), "--port", str(self.port), "--procs", str(procs)]
        self.process = subprocess.Popen([*command, "--files", str(files)] if files is not None else command)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        time.sleep(0.3)  # let every process bind its socket
        self.ps = psutil.Process(self.process.pid)


def ensure_venv() -> tuple[Path | None, str]:
    """The bench venv's python with img2dataset and aiohttp; created on first use. Returns (python, note)."""
    python = VENV / "bin" / "python"
    check = [str(python), "-c", "import img2dataset, aiohttp, requests, urllib3"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python, ""
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"creating {VENV} and installing {' '.join(VENV_PACKAGES)} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    result = subprocess.run([str(python), "-m", "pip", "install", "-q", *VENV_PACKAGES], capture_output=True, text=True)
    if result.returncode != 0:
        tail = " ".join(result.stderr.split()[-40:])
        return (python if python.exists() else None), f"pip install failed: {tail}"
    return python, ""


# --- inputs ---------------------------------------------------------------------------------------------------


def url_path(index: int, failures: bool, max_bytes: int) -> str:
    size = 10_000 + (index * 7919) % 20_001  # 10-30 KB
    if failures:
        bucket = (index * 2654435761 >> 7) % 100
        if bucket < 10:
            return "/status/404"
        if bucket < 15:
            return f"/slow/{SLOW_SECONDS:g}/b{index}.jpg?size={size}"
        if bucket < 17:
            return f"/endless/b{index}?bytes={2 * max_bytes}"
        if bucket < 20:
            return f"/notimage/b{index}"
    return f"/img/b{index}.jpg?size={size}"


def write_inputs(folder: Path, n: int, port: int, failures: bool, max_bytes: int) -> tuple[Path, Path, Path]:
    """A LAION-shaped parquet (original columns) under folder/parquet/laion/, and the same URLs as id<TAB>url."""
    urls = [f"http://127.0.0.1:{port}{url_path(i, failures, max_bytes)}" for i in range(n)]
    return write_url_inputs(folder, urls)


def write_url_inputs(folder: Path, urls: list[str]) -> tuple[Path, Path, Path]:
    """``urls`` as a LAION-shaped parquet under folder/parquet/laion/ and as id<TAB>url lines in folder/urls.tsv."""
    n = len(urls)
    parquet_dir = folder / "parquet"
    subset = parquet_dir / "laion"
    subset.mkdir(parents=True)
    table = pa.table(
        {
            "SAMPLE_ID": [float(i) for i in range(n)],
            "URL": urls,
            "TEXT": [f"a benchmark caption number {i}" for i in range(n)],
            "HEIGHT": [8] * n,
            "WIDTH": [8] * n,
            "LICENSE": ["?"] * n,
            "NSFW": ["UNLIKELY"] * n,
            "similarity": [0.3] * n,
        }
    )
    parquet = subset / f"part-00000-{uuid.uuid4()}-c000.snappy.parquet"
    pq.write_table(table, parquet, row_group_size=10_000)
    tsv = folder / "urls.tsv"
    tsv.write_text("".join(f"{i}\t{url}\n" for i, url in enumerate(urls)), encoding="utf-8")
    return parquet_dir, parquet, tsv


# --- measuring child processes --------------------------------------------------------------------------------


@dataclass
class Child:
    role: str
    process: subprocess.Popen
    cpu: float = 0.0
    maxrss_kb: int = 0
    status: int = 0


def _peak_rss(pid: int) -> int:
    """VmHWM (peak resident set since exec) of a live process, in bytes; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as file:
            for line in file:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Peak RSS of every process in the trees of some children: their VmHWM, read every 0.1 s.

    wait4's ru_maxrss is no use here: a child started by vfork/exec inherits its parent's high-water mark.
    """

    def __init__(self) -> None:
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (role, VmHWM bytes)
        self.roots: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def watch(self, role: str, pid: int) -> None:
        self.roots.append((role, pid))

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for role, pid in list(self.roots):
                with contextlib.suppress(psutil.Error):
                    root = psutil.Process(pid)
                    for process in [root, *root.children(recursive=True)]:
                        rss = _peak_rss(process.pid)
                        if rss > self.peaks.get(process.pid, ("", 0))[1]:
                            self.peaks[process.pid] = (role, rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def wait_child(child: Child) -> None:
    """Reap a child with wait4: its CPU time and peak RSS, including the descendants it waited for."""
    _, status, usage = os.wait4(child.process.pid, 0)
    child.process.returncode = os.waitstatus_to_exitcode(status)
    child.status = child.process.returncode
    child.cpu = usage.ru_utime + usage.ru_stime
    child.maxrss_kb = usage.ru_maxrss


def spawn(role: str, command: list[str], env: dict[str, str], log: Path) -> Child:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    return Child(role, process)


def count_files(folder: Path, suffix: str = ".jpg") -> tuple[int, int]:
    count = size = 0
    stack = [str(folder)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name != ".tmp":
                        stack.append(entry.path)
                elif entry.name.endswith(suffix):
                    count += 1
                    size += entry.stat().st_size
    return count, size


@dataclass
class Result:
    client: str
    mode: str
    run: int
    tasks: int
    stored: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds
    rss_mb: dict[str, float] = field(default_factory=dict)  # role -> peak RSS of one process, MB
    redis_commands: int = 0
    round_trips: int = 0
    note: str = ""

    @property
    def images_per_s(self) -> float:
        return self.stored / self.seconds if self.seconds else 0.0

    @property
    def tasks_per_s(self) -> float:
        return (self.stored + self.failed) / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0

    def cpu_ms_per_image(self, role: str) -> float:
        return 1000 * self.cpu.get(role, 0.0) / self.stored if self.stored else 0.0

    def cpu_ms_per_task(self, role: str) -> float:
        return 1000 * self.cpu.get(role, 0.0) / self.tasks if self.tasks else 0.0


# --- the contenders -------------------------------------------------------------------------------------------


@dataclass
class Setup:
    n: int
    workers: int
    threads: int
    max_bytes: int
    failures: bool
    parquet_dir: Path
    parquet: Path
    tsv: Path
    redis: RedisService
    server: ImageService
    venv_python: Path | None
    logs: Path
    profile: bool = False
    client_env: dict[str, dict[str, str]] = field(default_factory=dict)  # client -> extra environment variables
    bare_args: list[str] = field(default_factory=list)  # extra arguments of bench/bare.py
    resize_args: list[str] = field(default_factory=lambda: ["--resize_mode", "no", "--skip_reencode", "True"])
    """img2dataset's processing arguments (default: the bytes as downloaded)."""


def measure(setup: Setup, client: str, mode: str, run: int, store: Path) -> Result:
    result = Result(client, mode, run, setup.n)
    setup.redis.client.flushall()
    redis_cpu0, server_cpu0, commands0 = setup.redis.cpu(), setup.server.cpu(), setup.redis.commands()
    sampler = RssSampler()
    sampler.start()
    log = setup.logs / f"{mode}-{run}-{client}"
    log.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if client == "suite":
        children = run_suite(setup, store, log, sampler)
    elif client == "img2dataset":
        children = run_img2dataset(setup, store, log, sampler)
    else:
        children = run_bare(setup, client, store, log, sampler)
    for child in children:
        wait_child(child)
    result.seconds = time.monotonic() - started
    sampler.stop()
    result.cpu["redis"] = setup.redis.cpu() - redis_cpu0
    result.cpu["image server"] = setup.server.cpu() - server_cpu0
    result.redis_commands = setup.redis.commands() - commands0
    for child in children:
        result.cpu[child.role] = result.cpu.get(child.role, 0.0) + child.cpu
        if child.status != 0:
            result.note += f"{child.role} exit {child.status}; "
    for role, rss in sampler.peaks.values():  # img2dataset's pool processes are grandchildren
        result.rss_mb[role] = max(result.rss_mb.get(role, 0.0), rss / 2**20)
    if client == "suite":
        client_redis = setup.redis.client
        result.stored = int(client_redis.get("laion5b_tongji_succ") or 0)
        result.failed = int(client_redis.get("laion5b_tongji_error") or 0)
        result.bytes = int(client_redis.get(f"{TASK_KEY}:bytes") or 0)
        for path in log.glob("worker-*.log"):
            found = re.findall(r"worker_exit .* round_trips=(\d+)", path.read_text(errors="replace"))
            result.round_trips += sum(int(x) for x in found)
        if result.stored + result.failed != setup.n:
            result.note += f"books: {result.stored}+{result.failed} != {setup.n}; "
    else:
        result.stored, result.bytes = count_files(store)
        result.failed = setup.n - result.stored
    return result


def run_suite(setup: Setup, store: Path, log: Path, sampler: RssSampler) -> list[Child]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LAION_")}
    env.update(
        LAION_REDIS_IP="127.0.0.1",
        LAION_REDIS_PORT=str(setup.redis.port),
        LAION_REDIS_DB="0",
        LAION_PARQUET_DIR=str(setup.parquet_dir),
        LAION_DONE_PATH=str(log / "done_part.txt"),
        LAION_STORE_DIR=str(store),
        LAION_STORE_ERROR_DIR=str(log / "error_task"),
        LAION_LOG_DIR="",
        LAION_MONITOR_DISK=str(store),
        LAION_MIN_FREE_GB="0",
        LAION_HOST_ID="bench",
        LAION_ALLOWED_NETWORKS="127.0.0.0/8",
        LAION_THREAD_NUM=str(setup.threads),
        LAION_MAX_PER_HOST="0",
        LAION_MAX_IMAGE_BYTES=str(setup.max_bytes),
        PYTHONPATH=str(ROOT),
    )
    env.update(setup.client_env.get("suite", {}))
    store.mkdir(parents=True, exist_ok=True)
    producer = spawn("producer", [sys.executable, str(ROOT / "add_task.py")], env, log / "add_task.log")
    sampler.watch("producer", producer.process.pid)
    # workers started with --until-empty exit at once if no producer is registered yet
    deadline = time.monotonic() + 60
    while not setup.redis.client.exists(f"{TASK_KEY}:producer", TASK_KEY) and producer.process.poll() is None:
        if time.monotonic() > deadline:
            raise RuntimeError("add_task.py did not start")
        time.sleep(0.005)
    children = [producer]
    for number in range(setup.workers):
        command = [sys.executable, str(ROOT / "downloader.py"), f"w{number}", "--until-empty"]
        if setup.profile and number == 0:  # py-spy samples worker 0 (threads that are not idle)
            py_spy = shutil.which("py-spy") or str(VENV / "bin" / "py-spy")
            out = WORK / f"profile-{log.name}.txt"
            command = [py_spy, "record", "--format", "raw", "--rate", "250", "-o", str(out), "--", *command]
        child = spawn("workers", command, env, log / f"worker-{number}.log")
        sampler.watch("workers", child.process.pid)
        children.append(child)
    return children


def run_img2dataset(setup: Setup, store: Path, log: Path, sampler: RssSampler) -> list[Child]:
    assert setup.venv_python is not None
    command = [
        str(setup.venv_python.parent / "img2dataset"),
        "--url_list", str(setup.parquet), "--input_format", "parquet", "--url_col", "URL", "--caption_col", "TEXT",
        "--output_format", "files", "--output_folder", str(store), *setup.resize_args,
        "--processes_count", str(setup.workers), "--thread_count", str(setup.threads),
        "--number_sample_per_shard", str(max(1000, -(-setup.n // (4 * setup.workers)))),
        "--timeout", "10", "--retries", "0", "--enable_wandb", "False", "--distributor", "multiprocessing",
    ]  # fmt: skip
    env = {**os.environ, **setup.client_env.get("img2dataset", {})}
    child = spawn("img2dataset", command, env, log / "img2dataset.log")
    sampler.watch("img2dataset", child.process.pid)
    return [child]


def run_bare(setup: Setup, kind: str, store: Path, log: Path, sampler: RssSampler) -> list[Child]:
    assert setup.venv_python is not None
    store.mkdir(parents=True, exist_ok=True)
    children = []
    for number in range(setup.workers):
        start, end = setup.n * number // setup.workers, setup.n * (number + 1) // setup.workers
        command = [
            str(setup.venv_python), str(BENCH / "bare.py"), kind, str(setup.tsv), str(start), str(end), str(store),
            "--threads", str(setup.threads), "--max-bytes", str(setup.max_bytes), *setup.bare_args,
        ]  # fmt: skip
        env = {**os.environ, **setup.client_env.get(kind, {})}
        child = spawn(kind, command, env, log / f"{kind}-{number}.log")
        sampler.watch(kind, child.process.pid)
        children.append(child)
    return children


# --- reporting ------------------------------------------------------------------------------------------------


def client_role(result: Result) -> str:
    return "workers" if result.client == "suite" else result.client


def row(result: Result) -> str:
    role = client_role(result)
    rss = ", ".join(f"{name} {value:.0f}" for name, value in sorted(result.rss_mb.items()))
    cpu_extra = f"producer {result.cpu_ms_per_image('producer'):.2f}, " if result.client == "suite" else ""
    per_task = (
        f"{result.redis_commands / result.tasks:.3f} / {result.round_trips / result.tasks:.3f}"
        if result.client == "suite"
        else "-"
    )
    return (
        f"| {result.client} | {result.run} | {result.images_per_s:.0f} | {result.tasks_per_s:.0f} | "
        f"{result.mb_per_s:.1f} | {result.cpu_ms_per_image(role):.2f} | {cpu_extra}redis "
        f"{result.cpu_ms_per_image('redis'):.3f}, server {result.cpu_ms_per_image('image server'):.2f} | "
        f"{rss} | {per_task} | {result.stored}/{result.failed} | {result.note.strip()} |"
    )


HEADER = (
    "| client | run | images/s | tasks/s | MB/s | client CPU ms/image | other CPU ms/image | peak RSS MB/process "
    "| Redis cmds / round trips per task | stored/failed | note |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def summarise(results: list[Result], mode: str) -> str:
    lines = [f"\n### {mode}: medians of {max(r.run for r in results) + 1} runs\n", HEADER]
    by_client: dict[str, list[Result]] = {}
    for result in results:
        by_client.setdefault(result.client, []).append(result)
    for client, group in by_client.items():
        med = Result(client, mode, -1, group[0].tasks)
        med.seconds = 1.0
        med.stored = round(statistics.median(r.images_per_s for r in group))
        med.failed = round(statistics.median(r.tasks_per_s for r in group)) - med.stored
        med.bytes = round(statistics.median(r.mb_per_s for r in group) * 1e6)
        # CPU per image: scale medians back into CPU seconds for the row printer
        for key in {*group[0].cpu}:
            med.cpu[key] = statistics.median(r.cpu_ms_per_image(key) for r in group) * med.stored / 1000
        for key in {*group[0].rss_mb}:
            med.rss_mb[key] = statistics.median(r.rss_mb.get(key, 0.0) for r in group)
        med.redis_commands = round(statistics.median(r.redis_commands / r.tasks for r in group) * med.tasks)
        med.round_trips = round(statistics.median(r.round_trips / r.tasks for r in group) * med.tasks)
        cells = row(med).replace(f"| {client} | -1 |", f"| {client} | median |").split("|")
        cells[-3] = " - "  # stored/failed: the median row's counts are rates in disguise, not counts
        lines.append("|".join(cells))
    lines.append("")
    runs: dict[int, dict[str, Result]] = {}
    for result in results:
        runs.setdefault(result.run, {})[result.client] = result
    ratios: dict[str, list[float]] = {}
    for by_name in runs.values():
        suite = by_name.get("suite")
        if suite is None:
            continue
        for other in ("img2dataset", "requests", "urllib3", "aiohttp"):
            if other in by_name and by_name[other].images_per_s:
                ratios.setdefault(f"suite images/s ÷ {other}", []).append(
                    suite.images_per_s / by_name[other].images_per_s
                )
                other_cpu = by_name[other].cpu_ms_per_image(other)
                if other_cpu:
                    ratios.setdefault(f"suite worker CPU/image ÷ {other} CPU/image", []).append(
                        suite.cpu_ms_per_image("workers") / other_cpu
                    )
    for name, values in ratios.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"- {name}: median **{statistics.median(values):.2f}** (runs: {shown})")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = psutil.virtual_memory().total / 2**30
    redis_version = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True).stdout.split()[2]
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {memory:.0f} GiB RAM, {platform.platform()}, Python "
        f"{platform.python_version()}, redis-server {redis_version}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="URLs per run (default 20000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode; the median is quoted (default 3)")
    parser.add_argument("--modes", default="disk,tmpfs", help="comma-separated: disk, tmpfs (default both)")
    parser.add_argument("--clients", default=",".join(CLIENTS), help=f"comma-separated subset of {CLIENTS}")
    parser.add_argument("--workers", type=int, default=2, help="processes per client (default 2)")
    parser.add_argument("--threads", type=int, default=32, help="threads per process (default 32)")
    parser.add_argument("--server-procs", type=int, default=2, help="image server processes (default 2)")
    parser.add_argument("--max-bytes", type=int, default=4 * 2**20, help="body cap of every client (4 MiB)")
    parser.add_argument("--failures", action="store_true", help="10%% 404, 5%% slow, 2%% endless, 3%% not images")
    parser.add_argument("--disk-dir", default=str(WORK / "store"), help="folder for the disk mode")
    parser.add_argument("--keep", action="store_true", help="keep stored files and logs of the last run")
    parser.add_argument("--profile", action="store_true", help="run worker 0 under py-spy (bench/work/profile-*.txt)")
    parser.add_argument("--engine", choices=("threads", "async"), default="threads",
                        help="the suite's engine; with async, --threads is its concurrency per process")  # fmt: skip
    args = parser.parse_args()
    clients = [c for c in args.clients.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    venv_python, venv_note = (None, "")
    if any(c != "suite" for c in clients):
        venv_python, venv_note = ensure_venv()
        if venv_note:
            print(f"warning: {venv_note}; img2dataset/bare clients may fail", flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    temp = Path(tempfile.mkdtemp(prefix="speed-", dir=WORK))
    (temp / "redis").mkdir()
    redis_service = RedisService(temp / "redis")
    server = ImageService(args.server_procs)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"# speed run {stamp}\n\ncommand: `python3 bench/speed.py {' '.join(sys.argv[1:])}`\n\nmachine: {machine()}")
    print(f"\nN={args.n}, {args.workers} processes x {args.threads} threads per client, failures={args.failures}")
    all_results: list[Result] = []
    try:
        parquet_dir, parquet, tsv = write_inputs(temp, args.n, server.port, args.failures, args.max_bytes)
        setup = Setup(args.n, args.workers, args.threads, args.max_bytes, args.failures, parquet_dir, parquet, tsv,
                      redis_service, server, venv_python, temp / "logs", args.profile)  # fmt: skip
        setup.client_env["suite"] = {"LAION_ENGINE": args.engine, "LAION_CONCURRENCY": str(args.threads)}
        for mode in modes:
            root = Path(args.disk_dir) if mode == "disk" else Path("/dev/shm") / f"laion5b-bench-{os.getpid()}"
            results: list[Result] = []
            print(f"\n## mode {mode} ({root})\n\n{HEADER}", flush=True)
            for run in range(args.runs):
                order = clients[run % len(clients) :] + clients[: run % len(clients)]
                for client in order:
                    store = root / f"{client}-{run}"
                    shutil.rmtree(store, ignore_errors=True)
                    try:
                        result = measure(setup, client, mode, run, store)
                    finally:
                        if not args.keep:
                            shutil.rmtree(store, ignore_errors=True)
                    results.append(result)
                    print(row(result), flush=True)
            all_results.extend(results)
            print(summarise(results, mode), flush=True)
            if mode == "tmpfs":
                shutil.rmtree(root, ignore_errors=True)
    finally:
        server.stop()
        redis_service.stop()
        out = WORK / f"results-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
        out.write_text(json.dumps([r.__dict__ for r in all_results], indent=1))
        if not args.keep:
            shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
