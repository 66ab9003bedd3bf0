"""Chaos run: the whole suite on one machine under faults, then an exact audit of its books.

    python3 bench/chaos.py [--rows 20000] [--seconds 60] [--seed 1] [--workers 3] [--threads 16] [--keep]
                           [--output files|webdataset] [--shard-size 25]

Everything stays on 127.0.0.1 and in one temporary folder (removed at the end unless --keep or a check failed):
- a loopback image server (tools/image_server.py, in this process) serving a mix of URL kinds (see KINDS): real
  images in every format, and 404/403/410/500/503/429, resets, truncated and broken-gzip bodies, trickles, slow
  headers, endless, huge and chunked bodies, gzip bombs, redirect loops and chains, HTML and other non-images,
  X-Robots-Tag opt-outs, wrong Content-Types, redirects to 10.0.0.1, 169.254.169.254 and 0.0.0.0:<sentinel>
  (a listener that counts every connection it gets: it must get none), and rows with unusable URLs;
- LAION-shaped parquet files (original URL/TEXT/SAMPLE_ID columns and the wide url/hash table, Spark part names,
  _SUCCESS and .crc files beside them);
- a private redis-server (AOF on, appendfsync everysec unless --appendfsync always, noeviction) on a free port;
- add_task.py (small batches and queue threshold, so it lives through the run), W downloader.py workers,
  save_error_task.py (small batches) and monitor_disk.py, every one a real process with its own log.

While it runs, faults come at random moments (seeded): workers SIGKILLed and restarted under the same name at once
or under a new name (their leases then wait for heartbeat expiry and reaping), a worker SIGSTOPped for longer than
heartbeat_ttl while a replacement of the same name starts, then SIGCONTed (its incarnation is fenced out: it must
exit 1 having recorded and finished nothing more), every worker SIGKILLed at once,
workers stopped with SIGTERM, Redis restarted cleanly (sometimes with a worker killed and restarted while Redis is
down), add_task.py SIGKILLed mid-file, save_error_task.py SIGKILLed, and the disk guard tripped (monitor stopped,
a huge used-GB value published until every worker has paused; the queue must not shrink while they are paused)
and released, and the store filled: store_dir is a tmpfs of its own, which the disk guard does not watch (it watches
the run's folder), shrunk to what it holds so that writes fail with ENOSPC until every worker has paused
(store_pause; no download is made again while they are paused), then grown back (each paused worker must resume once
its probe write succeeds: store_resume). The first round holds every kind of fault once. Mounting the tmpfs needs root
(CAP_SYS_ADMIN): without it the run says so in one line and goes without that fault (--no-store-fill: likewise).

Then the faults stop, the chaos workers get SIGTERM, a final pass of `downloader.py --until-empty` workers runs,
the saver is stopped and `save_error_task.py --until-empty` runs, add_task.py runs once more (it must queue
nothing), and the audit checks: parquet rows == succeeded + failed == laion5b_tongji_all; every success is
exactly one file whose bytes are the bytes the server sends for its URL; every failure is exactly one error record
(saved files plus whatever is left in Redis) with the status of its URL kind (the transient kinds after max_attempts
tries; their last try may meet another transient failure, timeout or connection, on a busy machine: that is accepted
and shown apart, for at most 10 % of a kind); nothing left in the queue, the delayed set, any lease or processing
list, or store_dir/.tmp; no connection reached the sentinel; worker RSS stayed under threads x max_image_bytes +
overhead; no error record is store_error and no worker logged store_failed (a full store returns its tasks
without using an attempt). It prints the figures (and writes them to bench/CHAOS.md unless --no-report) and exits 1
on any mismatch.

With --output webdataset the workers write tar shards (small ones, --shard-size, so that kills land mid-shard;
webdataset_keep_format on, so that every image is stored as served) and the audit reads every finished shard back
with tarfile instead of the files: each success is exactly one sample in one finished shard, its image member the
bytes the server sends, its .txt the row's caption, its .json's sha256 the image member's and its key, id, url and
caption the row's; each shard is whole tar blocks with the end marker, and its .parquet index lists exactly its keys
and member names. No sample may be left open (<host>:open), no shard left
being finished, no list of kept tasks left in Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from laion5b import errorfiles, inputs  # noqa: E402
from laion5b.disk import publish_used  # noqa: E402
from laion5b.imageformat import image_extension  # noqa: E402
from laion5b.keys import Keys  # noqa: E402
from laion5b.storehealth import PROBE_MAX  # noqa: E402
from laion5b.tasks import safe_id  # noqa: E402
from tools.image_server import ImageServer, gzip_bomb, image_bytes  # noqa: E402

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REPORT = ROOT / "bench" / "CHAOS.md"
KEYS = Keys()
HOST_ID = "chaos"
MIB = 1024 * 1024
MAX_IMAGE_BYTES = MIB
MAX_ATTEMPTS = 3
HEARTBEAT_TTL = 3
RETRY_BACKOFF = 0.2  # seconds before a transient failure's first retry (429s wait their Retry-After: 1 s)
DOWNLOAD_TIMEOUT = 2.0
RSS_EVERY = 0.5
RSS_OVERHEAD_MIB = 128  # interpreter, requests, sockets, buffers: what a worker holds besides its image bodies
DISK_TRIP_MAX = 15.0  # a running worker checks its disk every 10 s (worker.DISK_CHECK_EVERY)
PAUSED_WATCH = 1.5  # seconds the queue is watched once every worker has paused
STARTUP_MAX = 30.0  # seconds a process may take to log its first line (imports on a busy machine)
SAVER_CATCH = 6.0  # seconds spent trying to catch save_error_task.py while it holds a batch
RESUME_MAX = 15.0  # a worker that has just paused looks at its disk again after up to 10 s
STORE_FILL_MIN = 2.0  # seconds the store is held full at least ...
STORE_FILL_MAX = 10.0  # ... and at most, waiting for every worker to pause
STORE_FILL_MARGIN = 64 * 1024  # bytes left free when the tmpfs is shrunk: the next few writes fill them
STORE_RESUME_MAX = PROBE_MAX + 5.0  # a failing store is probed 2, 4, 8, 16, then 30 s apart
TMPFS_ROW_BYTES = 128 * 1024  # room on the store's tmpfs per row (images average 20 KiB), besides TMPFS_BASE_BYTES
TMPFS_BASE_BYTES = 64 * MIB
SHARD_ROWS = 10_000
TRANSIENT_ENDINGS = ("timeout", "connection")  # what else a transient kind's last try may meet on a busy machine
OWN_STATUS_SHARE = 0.9  # ... but most rows of a transient kind must end with the kind's own status
TAR_BLOCK = 512
INDEX_COLUMNS = ("key", "id", "url", "caption", "part", "row", "members", "bytes", "sha256", "width", "height")
EXTENSIONS = ("jpg", "png", "gif", "webp", "bmp", "tiff", "avif", "heic")
BAD_URLS = ("ftp://127.0.0.1/x.jpg", "", None, "not a url", "javascript:alert(1)", "http:/127.0.0.1/one-slash.jpg")


# --- the URL mix ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """What ``/img/<name>.<ext>?size=<size>`` serves: ``image_bytes(name, ext, size)``."""

    name: str
    ext: str
    size: int

    def data(self) -> bytes:
        return image_bytes(self.name, self.ext, self.size)


@dataclass(frozen=True)
class Context:
    base: str  # http://127.0.0.1:<port> of the image server
    sentinel: int  # port of the listener that must never see a connection


Build = Callable[[random.Random, str, Context], tuple[str | None, Image | None]]


@dataclass(frozen=True)
class Kind:
    """One kind of URL: its share of the rows, how it is built, and how it must end."""

    name: str
    weight: float  # percent of the rows
    expect: int | str | None  # None: one stored image; else the status of its one error record
    retried: bool  # transient: the record must show MAX_ATTEMPTS tries, the last of which may also have met
    # another transient failure (TRANSIENT_ENDINGS) when the machine is busy
    build: Build

    def accepts(self, status: object) -> bool:
        return status == self.expect or (self.retried and status in TRANSIENT_ENDINGS)


def _served(route: str, sizes: tuple[int, int] = (2_000, 40_000), exts: tuple[str, ...] = EXTENSIONS) -> Build:
    def build(rng: random.Random, name: str, ctx: Context) -> tuple[str | None, Image | None]:
        image = Image(name, rng.choice(exts), rng.randint(*sizes))
        return f"{ctx.base}{route}/{quote(image.name)}.{image.ext}?size={image.size}", image

    return build


def _redirected(rng: random.Random, name: str, ctx: Context) -> tuple[str | None, Image | None]:
    image = Image(name, rng.choice(EXTENSIONS), 20_000)  # /redirect/ drops the query: the default size
    return f"{ctx.base}/redirect/{rng.randint(1, 4)}/{quote(name)}.{image.ext}", image


def _path(path: str) -> Build:
    return lambda rng, name, ctx: (f"{ctx.base}{path}", None)


def _redirect_to(target: Callable[[Context, str], str]) -> Build:
    return lambda rng, name, ctx: (f"{ctx.base}/redirect-to?url={quote(target(ctx, name), safe='')}&n={name}", None)


KINDS: tuple[Kind, ...] = (
    Kind("ok", 55.0, None, False, _served("/img")),
    Kind("big", 0.5, None, False, _served("/img", (600_000, MAX_IMAGE_BYTES - 1), ("jpg", "png"))),
    Kind("wrongtype", 3.0, None, False, _served("/wrongtype")),
    Kind("redirected", 3.0, None, False, _redirected),
    Kind("slow_ok", 3.0, None, False, _served("/slow/0.2")),
    Kind("robots_ok", 2.0, None, False, _served("/optout/nofollow")),
    Kind("404", 4.0, 404, False, _path("/status/404")),
    Kind("403", 2.0, 403, False, _path("/status/403")),
    Kind("410", 1.0, 410, False, _path("/status/410")),
    Kind("500", 1.5, 500, True, _path("/status/500")),
    Kind("503", 1.0, 503, True, _path("/status/503")),
    Kind("429", 1.5, 429, True, _path("/status/429")),
    Kind("reset", 1.0, "connection", True, _path("/reset")),
    Kind("truncated", 0.5, "truncated", True, _path("/truncated")),
    Kind("badgzip", 0.5, "connection", True, _path("/badgzip")),
    Kind("trickle", 0.6, "timeout", True, _path("/trickle")),
    Kind("slow_headers", 0.6, "timeout", True, lambda rng, name, ctx: (f"{ctx.base}/slow/5/{name}.jpg", None)),
    Kind("endless", 0.5, "too_large", False, _path("/endless")),
    Kind("huge", 0.5, "too_large", False, _path("/huge/8")),
    Kind("huge_chunked", 0.5, "too_large", False, _path("/huge/8?chunked=1")),
    Kind("gzipbomb", 0.5, "too_large", False, _path("/gzipbomb")),
    Kind("loop", 1.0, "redirects", False, _path("/loop")),
    Kind("too_many_redirects", 1.0, "redirects", False, lambda r, n, c: (f"{c.base}/redirect/7/{n}.jpg", None)),
    Kind("html", 2.0, "not_image", False, _path("/html")),
    Kind("notimage", 1.0, "not_image", False, lambda rng, name, ctx: (f"{ctx.base}/notimage/{name}", None)),
    Kind("optout_noai", 1.0, "disallowed", False, _served("/optout/noai")),
    Kind("optout_noimageai", 0.5, "disallowed", False, _served("/optout/noimageai")),
    Kind("optout_noindex", 0.5, "disallowed", False, _served("/optout/noindex,%20nofollow")),
    Kind("to_private", 0.5, "blocked_address", False, _redirect_to(lambda ctx, name: "http://10.0.0.1/x.jpg")),
    Kind(
        "to_metadata",
        0.5,
        "blocked_address",
        False,
        _redirect_to(lambda ctx, name: "http://169.254.169.254/latest/meta-data/"),
    ),
    Kind(
        "to_sentinel",
        0.5,
        "blocked_address",
        False,
        _redirect_to(lambda ctx, name: f"http://0.0.0.0:{ctx.sentinel}/img/{name}.jpg"),
    ),
    Kind(
        "sentinel_direct",
        0.3,
        "blocked_address",
        False,
        lambda rng, name, ctx: (f"http://0.0.0.0:{ctx.sentinel}/img/{name}.jpg", None),
    ),
    Kind("bad_redirect", 0.3, "bad_url", False, _redirect_to(lambda ctx, name: "http://[::1")),
    Kind("redirect_ftp", 0.3, "bad_url", False, _redirect_to(lambda ctx, name: "ftp://127.0.0.1/x.jpg")),
    Kind("bad_url_row", 0.5, "bad_url", False, lambda rng, name, ctx: (rng.choice(BAD_URLS), None)),
)
KIND_BY_NAME = {kind.name: kind for kind in KINDS}


@dataclass
class Row:
    """One parquet row and what must become of it."""

    subset: str
    part: str
    row: int
    task_id: str
    url: str | None
    caption: str
    kind: Kind
    image: Image | None

    @property
    def key(self) -> tuple[str, str, int]:
        return self.subset, self.part, self.row


# --- parquet files ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSpec:
    relpath: str
    schema: str  # "original" (URL, TEXT, SAMPLE_ID int), "original_float" (SAMPLE_ID as double), "wide" (url, hash)
    share: float


def file_specs() -> list[FileSpec]:
    spark = "part-{:05d}-" + str(uuid.UUID(int=7)) + "-c000.snappy.parquet"
    return [
        FileSpec(f"laion2B-en/{spark.format(0)}", "original", 0.30),
        FileSpec(f"laion2B-en/{spark.format(1)}", "original", 0.20),
        FileSpec(f"laion2B-multi/{spark.format(0)}", "original_float", 0.15),
        FileSpec("laion1B-nolang/0000.parquet", "wide", 0.20),
        FileSpec("wide_extra.parquet", "wide", 0.15),
    ]


def kind_sequence(rows: int, rng: random.Random) -> list[Kind]:
    """Each kind's share of ``rows`` (at least one row each when there is room), shuffled."""
    total = sum(kind.weight for kind in KINDS)
    counts = {kind.name: round(rows * kind.weight / total) for kind in KINDS}
    if rows >= len(KINDS):
        counts = {name: max(1, count) for name, count in counts.items()}
    counts["ok"] += rows - sum(counts.values())
    sequence = [KIND_BY_NAME[name] for name, count in counts.items() for _ in range(count)]
    rng.shuffle(sequence)
    return sequence


def write_parquet(folder: Path, rows: int, seed: int, ctx: Context) -> tuple[list[Row], list[str]]:
    """Write the parquet files; return every row with its expected outcome, and the files' descriptions."""
    rng = random.Random(seed)
    kinds = kind_sequence(rows, rng)
    specs = file_specs()
    sizes = [int(rows * spec.share) for spec in specs]
    sizes[0] += rows - sum(sizes)
    drafts: list[tuple[FileSpec, int, object, str | None, str, Kind, Image | None]] = []
    start = 0
    for spec, size in zip(specs, sizes, strict=True):
        columns: dict[str, list] = defaultdict(list)
        for offset in range(size):
            index = start + offset
            kind = kinds[index]
            name = f"{kind.name}-{seed}-{index}"
            url, image = kind.build(rng, name, ctx)
            caption = f"wide caption {index}" if spec.schema == "wide" else f"caption {index} ü"
            if spec.schema == "wide":
                sample: object = hashlib.md5(f"{seed}:{index}".encode()).hexdigest()
                if index % 500 == 7:
                    sample = f"ab/../{sample}"  # not a safe file name: becomes sha1-<hex>
                columns["url"].append(url)
                columns["hash"].append(sample)
                columns["image_suffix"].append(image.ext if image else "jpg")
                columns["caption"].append(caption)
                columns["similarity"].append(0.3)
            else:
                sample = 2_000_000_000 + index
                if spec.schema == "original_float":
                    sample = float(sample)
                columns["SAMPLE_ID"].append(sample)
                columns["URL"].append(url)
                columns["TEXT"].append(caption)
                columns["HEIGHT"].append(256)
                columns["WIDTH"].append(256)
                columns["LICENSE"].append("?")
                columns["NSFW"].append("UNLIKELY")
                columns["similarity"].append(0.31)
            drafts.append((spec, offset, sample, url, caption, kind, image))
        path = folder / spec.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        types = {"url": pa.string(), "URL": pa.string(), "hash": pa.string()}
        table = pa.table({name: pa.array(values, type=types.get(name)) for name, values in columns.items()})
        pq.write_table(table, path, row_group_size=500)
        start += size
    (folder / "laion2B-en" / "_SUCCESS").write_text("")
    (folder / "laion2B-en" / ".part-00000.crc").write_bytes(b"crc")
    sources = {source.key: source for source in inputs.find_files(folder)}
    result = []
    for spec, offset, sample, url, caption, kind, image in drafts:
        source = sources[spec.relpath]
        result.append(Row(source.subset, source.part, offset, safe_id(sample), url, caption, kind, image))
    described = [
        f"{spec.relpath} ({spec.schema}, {size:,} rows: subset {sources[spec.relpath].subset}, "
        f"part {sources[spec.relpath].part})"
        for spec, size in zip(specs, sizes, strict=True)
    ]
    return result, described


# --- services ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def kept_samples(client: redis.Redis, identity: str) -> int:
    """Samples a worker holds in its open shards (webdataset output): its kept tasks."""
    shards = client.hkeys(KEYS.kept(identity))
    return sum(client.llen(KEYS.kept_tasks(identity, shard)) for shard in shards)


class RedisService:
    """A private redis-server with AOF, restartable on the same port and data folder; stopped by PID."""

    def __init__(self, folder: Path, appendfsync: str) -> None:
        self.folder = folder
        self.port = free_port()
        self.appendfsync = appendfsync
        self.process: subprocess.Popen | None = None
        self.client = redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=10)

    def start(self) -> None:
        command = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
            "--appendonly", "yes", "--appendfsync", self.appendfsync, "--maxmemory-policy", "noeviction",
            "--save", "", "--daemonize", "no", "--logfile", str(self.folder / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.ping()
                return
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start; see {self.folder / 'redis.log'}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM: Redis writes and fsyncs its AOF and exits cleanly."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def call(self, what: Callable[[redis.Redis], object], patience: float = 60.0):
        """Run ``what(client)``, waiting while Redis is restarting."""
        deadline = time.monotonic() + patience
        while True:
            try:
                return what(self.client)
            except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


class Sentinel:
    """A listener on 127.0.0.1 behind the blocked ``0.0.0.0:<port>`` URLs: every connection it gets is a leak."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.connections = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="sentinel", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            connection.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.socket.close()


class TmpfsStore:
    """store_dir on a tmpfs of its own (the disk guard watches the run's folder, not it): shrunk to what it holds to
    fill the store, grown back to free it, unmounted at the end."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder = folder
        self.size = size
        self.mounted = False

    def mount(self) -> str | None:
        """Mount the tmpfs; return why it cannot be (not root, mounting not permitted), else None."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            done = run_mount("-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.folder))
        except (OSError, subprocess.SubprocessError) as error:
            return str(error)
        if done.returncode != 0:
            return done.stderr.strip() or f"mount exited {done.returncode}"
        self.mounted = True
        return None

    def used(self) -> int:
        stat = os.statvfs(self.folder)
        return (stat.f_blocks - stat.f_bfree) * stat.f_frsize

    def fill(self) -> int:
        """Shrink the tmpfs to what it holds plus STORE_FILL_MARGIN, again while writes outgrow that: the next writes
        fail with ENOSPC. Return its new size."""
        for _ in range(100):
            size = self.used() + STORE_FILL_MARGIN
            if run_mount("-o", f"remount,size={size}", str(self.folder)).returncode == 0:
                return size
        raise RuntimeError(f"cannot shrink the tmpfs at {self.folder} to what it holds")

    def free(self) -> None:
        """Grow the tmpfs back to its size."""
        done = run_mount("-o", f"remount,size={self.size}", str(self.folder))
        if done.returncode != 0:
            raise RuntimeError(f"cannot grow the tmpfs at {self.folder} back: {done.stderr.strip()}")

    def unmount(self, keep: bool) -> None:
        """Unmount (lazily when busy); with ``keep``, its files are copied to the run's folder first."""
        if not self.mounted:
            return
        copy = self.copy() if keep else None
        if subprocess.run(["umount", str(self.folder)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True, check=False)
        self.mounted = False
        if copy is not None:
            self.folder.rmdir()
            copy.rename(self.folder)

    def copy(self) -> Path | None:
        """Copy the tmpfs's files beside it (None when that fails: they go with the tmpfs)."""
        copy = self.folder.with_name(f"{self.folder.name}.kept")
        try:
            shutil.copytree(self.folder, copy, symlinks=True)
        except OSError as error:
            print(f"the store's files could not be kept: {error}", file=sys.stderr)
            return None
        return copy


def run_mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30, check=False)


# --- managed processes ------------------------------------------------------------------------------------------


@dataclass
class Proc:
    role: str  # worker, final, producer, saver, monitor
    name: str
    popen: subprocess.Popen
    log: Path
    signalled: bool = False  # set when this harness stopped or killed it on purpose

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self, start: int = 0) -> str:
        with contextlib.suppress(OSError), self.log.open("rb") as file:
            file.seek(start)
            return file.read().decode("utf-8", "replace")
        return ""

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except OSError:
            return 0


@dataclass
class Figures:
    """What the chaos did and what the run achieved."""

    faults: Counter = field(default_factory=Counter)
    starts: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    disk: list[str] = field(default_factory=list)
    store_fill: list[str] = field(default_factory=list)
    producer_mid_file: int = 0
    saver_mid_batch: int = 0
    window: tuple[float, float, int, int, int, int] = (0.0, 0.0, 0, 0, 0, 0)  # t0, t1, succ0, succ1, done0, done1
    all_done_after: float | None = None
    rss_peak: dict[str, int] = field(default_factory=dict)
    rss_samples: int = 0
    shard_kills: tuple[int, int, int] = (0, 0, 0)  # worker SIGKILLs, those that found open shards, their samples


class Chaos:
    """The run: services, processes, fault events and the final passes."""

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.rng = random.Random(args.seed * 7919 + 1)
        self.figures = Figures()
        self.logs = folder / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.store = folder / "images"
        self.tmpfs = TmpfsStore(self.store, args.rows * TMPFS_ROW_BYTES + TMPFS_BASE_BYTES)
        self.errors = folder / "error_task"
        self.parquet = folder / "parquet"
        self.procs: list[Proc] = []
        self.workers: dict[str, Proc] = {}  # live chaos workers by name
        self.producer: Proc | None = None
        self.producer_done = False
        self.saver: Proc | None = None
        self.monitor: Proc | None = None
        self.next_worker = 0
        self.sequence = 0
        self.started = time.monotonic()
        self.rows: list[Row] = []
        self.described: list[str] = []
        self.log_counts: Counter = Counter()
        self.fenced_logs: set[str] = set()  # logs of paused workers fenced out by their successor: identity_lost there
        self.lock = threading.Lock()
        self.sampling = threading.Event()
        (folder / "redis").mkdir()
        self.redis = RedisService(folder / "redis", args.appendfsync)
        self.server = ImageServer()
        self.sentinel = Sentinel()
        batch = args.batch or max(25, min(200, args.rows // 100))
        threshold = args.threshold or max(2 * batch, args.rows // 20)
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("LAION_")}
        self.settings = {
            "LAION_REDIS_IP": "127.0.0.1",
            "LAION_REDIS_PORT": str(self.redis.port),
            "LAION_PARQUET_DIR": str(self.parquet),
            "LAION_DONE_PATH": str(folder / "done_part.txt"),
            "LAION_STORE_DIR": str(self.store),
            "LAION_STORE_ERROR_DIR": str(self.errors),
            "LAION_LOG_DIR": "",
            "LAION_HOST_ID": HOST_ID,
            "LAION_MONITOR_DISK": str(folder),
            "LAION_MONITOR_INTERVAL": "1",
            "LAION_MIN_FREE_GB": "0",
            "LAION_ALLOWED_NETWORKS": "127.0.0.0/8",
            "LAION_ENGINE": args.engine,
            "LAION_THREAD_NUM": str(args.threads),
            "LAION_CONCURRENCY": str(args.threads),
            "LAION_MAX_PER_HOST": "0",
            "LAION_HEARTBEAT_TTL": str(HEARTBEAT_TTL),
            "LAION_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "LAION_RETRY_BACKOFF": f"{RETRY_BACKOFF:g}",
            "LAION_CONNECT_TIMEOUT": "1",
            "LAION_READ_TIMEOUT": "1",
            "LAION_DOWNLOAD_TIMEOUT": f"{DOWNLOAD_TIMEOUT:g}",
            "LAION_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
            "LAION_ADDTASK_BATCH": str(batch),
            "LAION_ADDTASK_THRESHOLD": str(threshold),
            "LAION_OUTPUT_FORMAT": args.output,
        }
        if args.output == "webdataset":
            self.settings["LAION_SHARD_SIZE"] = str(args.shard_size)
            # the audit compares each stored image with the bytes served, of every format (HEIC included)
            self.settings["LAION_WEBDATASET_KEEP_FORMAT"] = "true"
            self.settings["LAION_SHARD_MAX_SECONDS"] = f"{args.shard_seconds:g}"
        self.env.update(self.settings, PYTHONPATH=str(ROOT))

    # --- output ---

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)

    def fail(self, message: str) -> None:
        self.figures.failures.append(message)
        self.say(f"FAIL {message}")

    # --- processes ---

    def spawn(self, role: str, script: str, name: str, *args: str) -> Proc:
        self.sequence += 1
        log = self.logs / f"{self.sequence:04d}-{role}-{name}.log"
        with log.open("wb") as output:
            popen = subprocess.Popen(
                [sys.executable, str(ROOT / script), *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(role, name, popen, log)
        with self.lock:
            self.procs.append(proc)
        self.figures.starts[role] += 1
        return proc

    def start_worker(self, name: str | None = None) -> Proc:
        if name is None:
            name = f"w{self.next_worker}"
            self.next_worker += 1
        proc = self.spawn("worker", "downloader.py", name, name)
        self.workers[name] = proc
        return proc

    def start_producer(self) -> None:
        self.producer = self.spawn("producer", "add_task.py", "add_task")

    def start_saver(self) -> None:
        self.saver = self.spawn("saver", "save_error_task.py", "saver", "--batch", str(self.args.saver_batch))

    def start_monitor(self) -> None:
        self.monitor = self.spawn("monitor", "monitor_disk.py", "monitor")

    def kill(self, proc: Proc) -> None:
        """SIGKILL by PID, then reap it so that no zombie keeps its identity looking alive."""
        proc.signalled = True
        if proc.alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.popen.wait()

    def kill_worker(self, proc: Proc) -> None:
        """SIGKILL a chaos worker; with webdataset output, count the samples it kept in open shards just before."""
        if self.args.output == "webdataset":
            kills, open_kills, samples = self.figures.shard_kills
            kept = self.redis.call(lambda c: kept_samples(c, f"{HOST_ID}:{proc.name}"))
            self.figures.shard_kills = (kills + 1, open_kills + (kept > 0), samples + kept)
        self.kill(proc)

    def terminate(self, proc: Proc, timeout: float = 30.0) -> int:
        """SIGTERM by PID and wait; an exit code other than 0 is a failure."""
        proc.signalled = True
        if proc.alive():
            os.kill(proc.pid, signal.SIGTERM)
        try:
            code = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"{proc.role} {proc.name} (pid {proc.pid}) ignored SIGTERM for {timeout:.0f} s")
            self.kill(proc)
            return -9
        if code != 0:
            self.fail(f"{proc.role} {proc.name} exited {code} after SIGTERM; log tail: {tail(proc)}")
        return code

    def check_processes(self) -> None:
        """A process that ended without being told to is a failure (add_task.py finishing with 0 excepted)."""
        for proc in list(self.procs):
            code = proc.popen.poll()
            if code is None or proc.signalled:
                continue
            proc.signalled = True
            if proc is self.producer and code == 0:
                self.producer_done = True
                self.say("add_task.py finished: every file queued")
                continue
            self.fail(f"{proc.role} {proc.name} exited {code} by itself; log tail: {tail(proc)}")
            if proc.role == "worker" and self.workers.get(proc.name) is proc:
                self.start_worker(proc.name)
            elif proc is self.producer:
                self.start_producer()
            elif proc is self.saver:
                self.start_saver()
            elif proc is self.monitor:
                self.start_monitor()

    def stop_everything(self) -> None:
        """Kill, by PID, whatever this run started and is still running."""
        self.sampling.set()
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            if proc.alive():
                proc.signalled = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait()
        with contextlib.suppress(Exception):
            self.redis.stop()
        with contextlib.suppress(Exception):
            self.server.stop()
        with contextlib.suppress(Exception):
            self.sentinel.stop()

    # --- Redis figures ---

    def counters(self) -> tuple[int, int, int]:
        """(added, succeeded, failed)."""
        values = self.redis.call(lambda c: c.mget(KEYS.tongji_all, KEYS.tongji_succ, KEYS.tongji_error))
        return tuple(int(value or 0) for value in values)  # type: ignore[return-value]

    def finished(self) -> int:
        _, succeeded, failed = self.counters()
        return succeeded + failed

    # --- memory ---

    def sample_rss(self) -> None:
        while not self.sampling.wait(RSS_EVERY):
            with self.lock:
                procs = [proc for proc in self.procs if proc.role in ("worker", "final")]
            for proc in procs:
                try:
                    rss = psutil.Process(proc.pid).memory_info().rss
                except psutil.Error:
                    continue
                label = f"{proc.name}.{proc.pid}"
                self.figures.rss_peak[label] = max(self.figures.rss_peak.get(label, 0), rss)
            self.figures.rss_samples += 1

    # --- the run ---

    def run(self) -> int:
        self.server.start()
        gzip_bomb()  # computed once by the server; not part of the run
        ctx = Context(self.server.url(""), self.sentinel.port)
        rows, described = write_parquet(self.parquet, self.args.rows, self.args.seed, ctx)
        self.rows, self.described = rows, described
        self.redis.start()
        self.mount_store()
        self.say(f"{len(rows):,} rows in {len(described)} parquet files; redis on port {self.redis.port} "
                 f"(appendfsync {self.args.appendfsync}); image server {ctx.base}; sentinel port {ctx.sentinel}; "
                 f"folder {self.folder}")  # fmt: skip
        threading.Thread(target=self.sample_rss, name="rss", daemon=True).start()
        self.start_producer()
        self.start_monitor()
        self.start_saver()
        for _ in range(self.args.workers):
            self.start_worker()
        t0 = time.monotonic()
        _, succ0, fail0 = self.counters()
        self.chaos(t0)
        t1 = time.monotonic()
        _, succ1, fail1 = self.counters()
        self.figures.window = (t0, t1, succ0, succ1, succ0 + fail0, succ1 + fail1)
        self.settle(t0)
        self.final_passes()
        self.audit_logs()
        return self.audit()

    def mount_store(self) -> None:
        """Put store_dir on a tmpfs of its own for the store fill; without one (not root), say so in one line."""
        if self.args.no_store_fill:
            self.say("store fill: off (--no-store-fill); store_dir stays on the run's disk")
            return
        why = self.tmpfs.mount()
        if why is None:
            self.say(f"store_dir on a tmpfs of {self.tmpfs.size / MIB:,.0f} MiB that the disk guard does not watch")
        else:
            self.say(f"store fill: skipped, mounting a tmpfs needs root (CAP_SYS_ADMIN): {why}")

    def chaos(self, t0: float) -> None:
        """Fault events at random moments until --seconds have passed (the first round holds every kind)."""
        first = ["worker_kill_same", "worker_kill_new", "worker_term", "all_workers_kill", "redis_restart",
                 "saver_kill", "disk_trip", "worker_stop_same"]  # fmt: skip
        self.rng.shuffle(first)
        if self.tmpfs.mounted:
            first.insert(0, "store_fill")  # early, while the workers surely have images to store
        first.insert(0, "producer_kill")  # first, while add_task.py surely has files to queue
        weights = {
            "worker_kill_same": 24,
            "worker_kill_new": 24,
            "worker_term": 5,
            "all_workers_kill": 4,
            "redis_restart": 12,
            "producer_kill": 12,
            "saver_kill": 12,
            "disk_trip": 3,
            "worker_stop_same": 6,
        }
        if self.tmpfs.mounted:
            weights["store_fill"] = 3
        plan: Iterator[str] = iter(first)
        deadline = t0 + self.args.seconds
        round_done = False
        while not round_done or time.monotonic() < deadline:
            self.pause(self.rng.uniform(0.3, 1.5))
            if round_done and self.finished() >= len(self.rows):
                self.say("every task has its outcome: faults stop early")
                break
            event = next(plan, None)
            if event is None:
                round_done = True
                if time.monotonic() >= deadline:
                    break
                if self.producer_done:
                    weights.pop("producer_kill", None)
                event = self.rng.choices(list(weights), weights=list(weights.values()))[0]
            getattr(self, f"event_{event}")()
            self.check_processes()

    def pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))
            self.check_processes()

    # --- events ---

    def pick_worker(self) -> Proc:
        name = self.rng.choice(sorted(self.workers))
        return self.workers.pop(name)

    def wait_logging(self, proc: Proc) -> None:
        """Wait until a process has logged its first line: its SIGTERM handler is in place by then (a SIGTERM that
        comes while a busy machine is still importing its modules would end it with -15)."""
        deadline = time.monotonic() + STARTUP_MAX
        while proc.log_size() == 0 and proc.alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def event_worker_kill_same(self) -> None:
        proc = self.pick_worker()
        self.kill_worker(proc)
        self.start_worker(proc.name)
        self.figures.faults["worker SIGKILL, restarted under the same name"] += 1
        self.say(f"worker {proc.name}: SIGKILL, restarted under the same name")

    def event_worker_kill_new(self) -> None:
        proc = self.pick_worker()
        self.kill_worker(proc)
        new = self.start_worker()
        self.figures.faults["worker SIGKILL, replaced under a new name"] += 1
        self.say(f"worker {proc.name}: SIGKILL, replaced by {new.name} (its leases wait for reaping)")

    def event_worker_stop_same(self) -> None:
        """SIGSTOP a worker for longer than heartbeat_ttl, start its replacement under the same name, then SIGCONT the
        old one: its incarnation is fenced out, so it must exit 1 (identity_lost) having recorded and finished
        nothing after the SIGCONT."""
        proc = self.pick_worker()
        self.wait_started(proc)
        token = self.redis.call(lambda c: c.get(KEYS.heartbeat(f"{HOST_ID}:{proc.name}")))
        proc.signalled = True
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        heartbeat = KEYS.heartbeat(f"{HOST_ID}:{proc.name}")
        while self.redis.call(lambda c: c.exists(heartbeat)) and time.monotonic() < stopped + 3 * HEARTBEAT_TTL:
            self.pause(0.2)
        new = self.start_worker(proc.name)
        deadline = time.monotonic() + STARTUP_MAX
        while self.redis.call(lambda c: c.get(heartbeat)) in (None, token) and time.monotonic() < deadline:
            self.pause(0.1)
        mark = proc.log_size()
        os.kill(proc.pid, signal.SIGCONT)
        self.fenced_logs.add(proc.log.name)
        try:
            code = proc.popen.wait(timeout=DOWNLOAD_TIMEOUT + 30)
        except subprocess.TimeoutExpired:
            self.fail(f"worker {proc.name} (pid {proc.pid}) was not fenced out after SIGCONT; log tail: {tail(proc)}")
            self.kill(proc)
            return
        after = proc.log_text(mark)
        wrote = re.findall(r"shard_finished [^\n]*|shard_discarded [^\n]*|lease_lost [^\n]*", after)
        if code != 1 or "worker_fenced" not in after or wrote:
            self.fail(f"worker {proc.name} after SIGCONT: exit {code}, wrote {wrote[:3]}; log tail: {tail(proc)}")
        self.figures.faults["worker SIGSTOP > heartbeat_ttl, same-name replacement, SIGCONT"] += 1
        self.say(f"worker {proc.name}: SIGSTOP {time.monotonic() - stopped:.1f} s, replaced by pid {new.pid} under the "
                 f"same name, SIGCONT: the old one exited {code}, fenced out")  # fmt: skip

    def wait_started(self, proc: Proc) -> None:
        """Wait until a worker has registered its identity (it logs worker_start)."""
        deadline = time.monotonic() + STARTUP_MAX
        while "worker_start" not in proc.log_text() and proc.alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def event_worker_term(self) -> None:
        proc = self.pick_worker()
        self.wait_logging(proc)
        self.terminate(proc, timeout=DOWNLOAD_TIMEOUT + 20)
        self.start_worker(proc.name)
        self.figures.faults["worker SIGTERM, restarted"] += 1
        self.say(f"worker {proc.name}: SIGTERM (returns what it holds), restarted")

    def event_all_workers_kill(self) -> None:
        procs = [self.workers.pop(name) for name in sorted(self.workers)]
        for proc in procs:
            self.kill_worker(proc)
        for _ in procs:
            self.start_worker()
        self.figures.faults["every worker SIGKILLed at once, replaced under new names"] += 1
        self.say(f"all {len(procs)} workers: SIGKILL at once, replaced under new names")

    def event_redis_restart(self) -> None:
        self.redis.stop()
        also = ""
        if self.rng.random() < 0.4:
            proc = self.pick_worker()
            self.kill(proc)
            self.start_worker(proc.name)
            self.figures.faults["worker SIGKILL while Redis is down, restarted"] += 1
            also = f"; worker {proc.name} SIGKILLed and restarted while Redis was down"
        time.sleep(self.rng.uniform(0.2, 1.5))
        self.redis.start()
        self.figures.faults["Redis restart (SIGTERM, start on the same port and AOF)"] += 1
        self.say(f"redis: SIGTERM, started again{also}")

    def event_producer_kill(self) -> None:
        if self.producer_done:
            self.figures.notes.append("an add_task.py kill came after it had finished: skipped")
            return
        assert self.producer is not None
        deadline = time.monotonic() + 3
        positions: dict[str, str] = {}
        while time.monotonic() < deadline and self.producer.alive():
            positions = self.redis.call(lambda c: c.hgetall(KEYS.positions))
            if positions:
                break
            time.sleep(0.05)
        if not self.producer.alive():
            self.check_processes()
            return
        self.kill(self.producer)
        self.figures.faults["add_task.py SIGKILL, restarted"] += 1
        if positions:
            self.figures.producer_mid_file += 1
        where = ", ".join(f"{key} at row {value}" for key, value in positions.items()) or "between files"
        self.start_producer()
        self.say(f"add_task.py: SIGKILL ({where}), restarted")

    def event_saver_kill(self) -> None:
        """SIGKILL save_error_task.py, if it can be caught within a few seconds, while it holds a batch: it is
        frozen (SIGSTOP) at random moments until its processing list is not empty, and killed frozen."""
        assert self.saver is not None
        saver = self.saver
        processing = KEYS.error_processing(HOST_ID)
        held = 0
        deadline = time.monotonic() + SAVER_CATCH
        while time.monotonic() < deadline and saver.alive():
            os.kill(saver.pid, signal.SIGSTOP)
            held = self.redis.call(lambda c: c.llen(processing))
            if held:
                break
            os.kill(saver.pid, signal.SIGCONT)
            time.sleep(0.001)
        self.kill(saver)
        self.start_saver()
        self.figures.faults["save_error_task.py SIGKILL, restarted"] += 1
        if held:
            self.figures.saver_mid_batch += 1
        where = f"holding a batch of {held} records" if held else "between batches"
        self.say(f"save_error_task.py: SIGKILL ({where}), restarted under the same name")

    def event_disk_trip(self) -> None:
        """Stop the monitor, publish a full disk until every worker has paused, check that the queue does not
        shrink while they are paused, then publish an empty disk and start the monitor again."""
        assert self.monitor is not None
        self.terminate(self.monitor)
        marks = {name: proc.log_size() for name, proc in self.workers.items()}
        started = time.monotonic()
        paused: set[str] = set()
        while time.monotonic() - started < DISK_TRIP_MAX:
            self.redis.call(lambda c: publish_used(c, KEYS, HOST_ID, 10**9))
            paused = {name for name, proc in self.workers.items() if "disk_pause" in proc.log_text(marks[name])}
            if paused == set(self.workers):
                break
            time.sleep(0.5)
        took = time.monotonic() - started
        shrank = []
        if paused == set(self.workers):
            queued = self.redis.call(lambda c: c.llen(KEYS.task))
            watch_end = time.monotonic() + PAUSED_WATCH
            while time.monotonic() < watch_end:
                self.redis.call(lambda c: publish_used(c, KEYS, HOST_ID, 10**9))
                time.sleep(0.25)
                now = self.redis.call(lambda c: c.llen(KEYS.task))
                if now < queued:
                    shrank.append(f"{queued}->{now}")
                queued = now
        else:
            self.fail(f"disk trip: only {len(paused)} of {len(self.workers)} workers paused in {took:.1f} s")
        if shrank:
            self.fail(f"disk trip: the queue shrank while every worker was paused ({', '.join(shrank)})")
        self.redis.call(lambda c: publish_used(c, KEYS, HOST_ID, 0))
        released = time.monotonic()
        self.start_monitor()
        resumed: set[str] = set()
        while time.monotonic() - released < RESUME_MAX:
            resumed = {name for name in paused if "disk_resume" in self.workers[name].log_text(marks[name])}
            if resumed == paused:
                break
            time.sleep(0.2)
        if resumed != paused:
            self.fail(f"disk trip: {len(paused) - len(resumed)} paused workers did not resume within {RESUME_MAX:g} s")
        self.figures.faults["disk guard tripped and released"] += 1
        line = (
            f"{len(paused)}/{len(self.workers)} workers paused within {took:.1f} s, queue steady while paused, "
            f"{len(resumed)} resumed within {time.monotonic() - released:.1f} s of the release"
        )
        self.figures.disk.append(line)
        self.say(f"disk guard: {line}")

    def event_store_fill(self) -> None:
        """Shrink the store's tmpfs to what it holds: writes fail with ENOSPC, which the disk guard does not see. Hold
        it full until every worker has paused (at most STORE_FILL_MAX s) and watch that no download starts while they
        are, then grow it back: each paused worker must resume once its probe write succeeds."""
        for proc in self.workers.values():
            self.wait_started(proc)
        marks = {name: proc.log_size() for name, proc in self.workers.items()}
        size = self.tmpfs.fill()
        filled = time.monotonic()
        paused = self.store_paused(marks)
        while not self.store_fill_over(time.monotonic() - filled, paused):
            time.sleep(0.2)
            paused = self.store_paused(marks)
        took = time.monotonic() - filled
        fetched = self.fetches_while_paused() if paused and paused == set(self.workers) else None
        self.tmpfs.free()
        released = time.monotonic()
        resumed: set[str] = set()
        while paused and time.monotonic() - released < STORE_RESUME_MAX:
            resumed = {name for name in paused if "store_resume" in self.workers[name].log_text(marks[name])}
            if resumed == paused:
                break
            time.sleep(0.2)
        if resumed != paused:
            self.fail(f"store fill: {len(paused) - len(resumed)} paused workers did not resume within "
                      f"{STORE_RESUME_MAX:g} s of the release")  # fmt: skip
        if not paused:
            self.figures.notes.append(f"the store was full for {took:.1f} s but no worker wrote meanwhile")
            self.say(f"store fill: full for {took:.1f} s, no worker wrote meanwhile")
            return
        self.figures.faults["store full (ENOSPC, the disk guard blind), then freed"] += 1
        watched = "" if fetched is None else f", {fetched} requests in the {PAUSED_WATCH:g} s all were paused"
        line = (
            f"{len(paused)}/{len(self.workers)} workers paused within {took:.1f} s of the shrink to "
            f"{size / MIB:.1f} MiB{watched}, {len(resumed)} resumed within {time.monotonic() - released:.1f} s of "
            "the release"
        )
        self.figures.store_fill.append(line)
        self.say(f"store fill: {line}")

    def store_fill_over(self, held: float, paused: set[str]) -> bool:
        """Whether the store was full long enough: every worker paused (after STORE_FILL_MIN s), or STORE_FILL_MAX s."""
        return held >= STORE_FILL_MAX or (held >= STORE_FILL_MIN and paused == set(self.workers))

    def store_paused(self, marks: dict[str, int]) -> set[str]:
        """The workers that paused for the full store since their log's mark."""
        return {name for name, proc in self.workers.items()
                if "reason=store_failing errno=ENOSPC" in proc.log_text(marks[name])}  # fmt: skip

    def fetches_while_paused(self) -> int:
        """Requests the image server gets in PAUSED_WATCH s while every worker is paused: at most the redirects of
        the downloads in flight, never a new download."""
        asked = self.server.requests
        time.sleep(PAUSED_WATCH)
        fetched = self.server.requests - asked
        bound = len(self.workers) * self.args.threads * 6  # each download in flight: its URL and 5 redirects
        if fetched > bound:
            self.fail(f"store fill: {fetched} requests in {PAUSED_WATCH:g} s while every worker was paused "
                      f"(bound {bound})")  # fmt: skip
        return fetched

    # --- the end ---

    def settle(self, t0: float) -> None:
        """After the faults: let add_task.py finish and the workers drain what they can, then SIGTERM them."""
        deadline = time.monotonic() + self.args.drain_timeout
        if not self.producer_done and self.producer is not None and not self.producer.alive():
            self.check_processes()
        while time.monotonic() < deadline:
            self.check_processes()
            if self.producer_done and self.finished() >= len(self.rows):
                break
            time.sleep(0.2)
        if self.finished() >= len(self.rows):
            self.figures.all_done_after = time.monotonic() - t0
            self.say(f"every task has its outcome ({time.monotonic() - t0:.1f} s after the workers started)")
        else:
            self.say(f"drain timeout: {self.finished():,} of {len(self.rows):,} tasks have their outcome")
        if not self.producer_done:
            self.fail("add_task.py did not finish")
        for name in sorted(self.workers):
            proc = self.workers.pop(name)
            self.wait_logging(proc)  # a worker started a moment ago may still be importing: SIGTERM would end it
            self.terminate(proc, timeout=DOWNLOAD_TIMEOUT + 30)

    def final_passes(self) -> None:
        """downloader.py --until-empty, then save_error_task.py --until-empty, then add_task.py once more."""
        finals = [self.spawn("final", "downloader.py", f"final-{i}", f"final-{i}", "--until-empty")
                  for i in range(self.args.workers)]  # fmt: skip
        for proc in finals:
            self.expect_exit(proc, 0, self.args.drain_timeout)
        self.say(f"final pass: {len(finals)} x downloader.py --until-empty exited 0")
        for proc in (self.saver, self.monitor):
            if proc is not None:
                self.terminate(proc)
        self.expect_exit(self.spawn("final", "save_error_task.py", "saver-final", "--until-empty"), 0, 60)
        added = self.counters()[0]
        again = self.spawn("final", "add_task.py", "add_task-again")
        self.expect_exit(again, 0, 60)
        if self.counters()[0] != added:
            self.fail(f"add_task.py run again added {self.counters()[0] - added} tasks")
        self.sampling.set()

    def expect_exit(self, proc: Proc, code: int, timeout: float) -> None:
        try:
            got = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"{proc.name} did not finish within {timeout:.0f} s; log tail: {tail(proc)}")
            self.kill(proc)
            return
        proc.signalled = True
        if got != code:
            self.fail(f"{proc.name} exited {got}, not {code}; log tail: {tail(proc)}")

    def audit_logs(self) -> None:
        """Count what the processes logged; a traceback or a crashed task is a failure."""
        patterns = {
            "leases returned by a successor of the same name": re.compile(r"returned_from_predecessor=([1-9]\d*)"),
            "leases recovered from dead workers (reaped)": re.compile(r"leases_recovered worker=\S+ tasks=(\d+)"),
            "stray leases returned": re.compile(r"strays_returned worker=\S+ tasks=(\d+)"),
            "outcomes not applied (lease lost)": re.compile(r"lease_lost worker=\S+ outcomes=(\d+) applied=(\d+)"),
            "records of held-over batches (after a saver kill)": re.compile(r"held_over_batch name=\S+ records=(\d+)"),
            "  of which already in the files, skipped": re.compile(r"held_over_batch .* already_saved=(\d+)"),
            "Redis outages waited out (log lines)": re.compile(r"redis_unavailable"),
        }
        if self.args.output == "webdataset":
            patterns.update({
                "shards finished": re.compile(r"shard_finished "),
                "shards discarded (tasks queued again)": re.compile(r"shard_discarded "),
                "shards left prepared by a dead worker, finished by another": re.compile(r"shard_recovered "),
                "shards left prepared whose files were gone (tasks queued again)": re.compile(r"shard_lost "),
            })  # fmt: skip
        patterns["paused workers fenced out after SIGCONT"] = re.compile(r"worker_fenced ")
        if self.tmpfs.mounted:
            patterns.update({
                "store pauses (store_failing ENOSPC)": re.compile(r"store_pause .*reason=store_failing errno=ENOSPC"),
                "store resumes (a probe write succeeded)": re.compile(r"store_resume "),
                "probe writes that failed (store still full)": re.compile(r"store_probe_failed "),
            })  # fmt: skip
            if self.args.output == "webdataset":
                patterns["shard seals deferred (store full)"] = re.compile(r"shard_seal_deferred ")
        self.log_counts = Counter(dict.fromkeys(patterns, 0))
        bad = re.compile(r"Traceback|task_crashed|internal_error|position_conflict|identity_lost|name_lost|"
                         r"store_failed")  # fmt: skip
        bad_when_fenced = re.compile(bad.pattern.replace("|identity_lost", ""))  # the fenced exit is expected there
        for log in sorted(self.logs.glob("*.log")):
            text = log.read_text(encoding="utf-8", errors="replace")
            unexpected = bad_when_fenced if log.name in self.fenced_logs else bad
            for label, pattern in patterns.items():
                for match in pattern.finditer(text):
                    if label.startswith("outcomes not applied"):
                        self.log_counts[label] += int(match.group(1)) - int(match.group(2))
                    elif match.groups():
                        self.log_counts[label] += int(match.group(1))
                    else:
                        self.log_counts[label] += 1
            for match in unexpected.finditer(text):
                line = text[text.rfind("\n", 0, match.start()) + 1 : text.find("\n", match.end())]
                self.fail(f"{log.name}: {line[:300]}")
                break

    def audit(self) -> int:
        audit = Audit(self.rows, self.store, self.errors, self.redis, self.args.output)
        audit.check()
        self.figures.failures.extend(audit.problems)
        if audit.status_count.get("store_error"):
            self.figures.failures.append(f"{audit.status_count['store_error']} store_error records: a store failure "
                                         "used up an attempt")  # fmt: skip
        if self.sentinel.connections:
            self.figures.failures.append(f"the sentinel behind 0.0.0.0 got {self.sentinel.connections} connections")
        peak = max(self.figures.rss_peak.values(), default=0)
        bound = self.args.threads * MAX_IMAGE_BYTES + RSS_OVERHEAD_MIB * MIB
        if peak > bound:
            self.figures.failures.append(f"worker peak RSS {peak / MIB:.0f} MiB > bound {bound / MIB:.0f} MiB")
        if not self.figures.rss_samples:
            self.figures.failures.append("no RSS sample was taken")
        text = self.render(audit, peak, bound)
        print(text, flush=True)
        if not self.args.no_report:
            REPORT.write_text(self.markdown(text), encoding="utf-8")
            print(f"figures written to {REPORT.relative_to(ROOT)}")
        return 1 if self.figures.failures else 0

    # --- figures ---

    def render(self, audit: Audit, peak: int, bound: int) -> str:
        figures = self.figures
        t0, t1, succ0, succ1, done0, done1 = figures.window
        window = max(t1 - t0, 1e-9)
        total_faults = sum(figures.faults.values())
        restarts = sum(n for role, n in figures.starts.items() if role != "final") - (3 + self.args.workers)
        verdict = "PASS" if not figures.failures else f"FAIL ({len(figures.failures)} problems)"
        stored = "shard samples" if self.args.output == "webdataset" else "files"
        lines = [
            "",
            f"=== chaos run: {verdict} ===",
            f"rows (parquet)          {len(self.rows):>8,}   in {len(self.described)} files: "
            f"3 original URL/TEXT/SAMPLE_ID, 2 wide url/hash",
            f"laion5b_tongji_all      {audit.added:>8,}",
            f"succeeded               {audit.succeeded:>8,}   {stored} checked byte for byte against the server: "
            f"{audit.files_ok:,}",
            f"failed                  {audit.failed:>8,}   error records with the expected status: "
            f"{audit.records_ok:,} ({audit.record_files} files, {audit.left_in_redis} left in Redis, "
            f"{audit.torn} torn lines)",
            f"  ... transient kinds whose last try met another transient failure: {audit.other_transient}",
            f"lost                    {audit.lost:>8,}",
            f"doubled                 {audit.doubled:>8,}",
            f"wrong outcome           {audit.wrong:>8,}",
            f"left in queue/leases    {audit.leftover:>8,}   temporary files left: {audit.temp_files}",
            *self.shard_lines(audit),
            f"sentinel connections    {self.sentinel.connections:>8,}   (blocked_address records: "
            f"{audit.status_count.get('blocked_address', 0):,}, each refused by the guard before connecting)",
            "",
            f"faults                  {total_faults:>8,}   (seed {self.args.seed}, {self.args.seconds:g} s window, "
            f"{self.args.workers} workers x {self.args.threads} {self.args.engine} downloads)",
        ]
        lines += [f"  {count:>5,}  {what}" for what, count in sorted(figures.faults.items(), key=lambda x: -x[1])]
        if figures.producer_mid_file:
            lines.append(f"         ({figures.producer_mid_file} of the add_task.py kills landed mid-file)")
        if figures.saver_mid_batch:
            lines.append(f"         ({figures.saver_mid_batch} of the save_error_task.py kills landed while it held "
                         "a batch)")  # fmt: skip
        lines += [f"  disk trip: {line}" for line in figures.disk]
        lines += [f"  store fill: {line}" for line in figures.store_fill]
        if self.tmpfs.mounted:
            lines.append(f"  store_error records: {audit.status_count.get('store_error', 0)} (a full store uses no "
                         "attempt)")  # fmt: skip
        starts = ", ".join(f"{role} {count}" for role, count in sorted(figures.starts.items()))
        lines.append(f"process restarts        {restarts:>8,}   ({starts} starts); from the processes' logs:")
        lines += [f"  {count:>5,}  {what}" for what, count in self.log_counts.items()]
        lines += [
            "",
            f"under faults            {(succ1 - succ0) / window:>8,.0f} images/s, "
            f"{(done1 - done0) / window:,.0f} tasks/s over the {window:.1f} s fault window",
        ]
        if figures.all_done_after is not None:
            lines.append(f"all {len(self.rows):,} tasks done in {figures.all_done_after:,.1f} s "
                         f"({len(self.rows) / figures.all_done_after:,.0f} tasks/s)")  # fmt: skip
        lines.append(
            f"worker peak RSS         {peak / MIB:>8,.0f} MiB   (bound {self.args.threads} threads x "
            f"{MAX_IMAGE_BYTES // MIB} MiB + {RSS_OVERHEAD_MIB} MiB = {bound / MIB:.0f} MiB; "
            f"{len(figures.rss_peak)} processes, {figures.rss_samples} samples every {RSS_EVERY:g} s)"
        )
        lines += ["", "kind                    rows  expected            outcome"]
        for kind in KINDS:
            got = audit.by_kind[kind.name]
            expected = "image" if kind.expect is None else str(kind.expect)
            if kind.retried:
                expected += f" x{MAX_ATTEMPTS}"
            outcome = ", ".join(f"{label} {count:,}" for label, count in got.most_common())
            lines.append(f"{kind.name:<22} {sum(got.values()):>5,}  {expected:<18}  {outcome}")
        if figures.notes:
            lines += ["", *[f"note: {note}" for note in figures.notes]]
        if figures.failures:
            lines += ["", "problems:"]
            lines += [f"  - {problem}" for problem in figures.failures[:40]]
            if len(figures.failures) > 40:
                lines.append(f"  ... and {len(figures.failures) - 40} more")
        return "\n".join(lines)

    def shard_lines(self, audit: Audit) -> list[str]:
        """Webdataset output: the shards read back, and what the worker kills found open."""
        if self.args.output != "webdataset":
            return []
        kills, open_kills, open_samples = self.figures.shard_kills
        return [
            f"shards (finished)       {audit.shards:>8,}   {audit.shard_samples:,} samples, read with tarfile against "
            f"their .parquet index; captions and metadata checked: {audit.sidecars_ok:,}",
            f"  left unfinished: {HOST_ID}:open {audit.open_samples}, {audit.finishing} shards being finished, "
            f"{audit.kept_keys} lists of kept tasks",
            f"  {open_kills} of {kills} worker SIGKILLs found tasks kept in open shards ({open_samples} samples, "
            "downloaded again)",
        ]

    def markdown(self, text: str) -> str:
        command = "python3 bench/chaos.py " + " ".join(sys.argv[1:])
        settings = " ".join(f"{key}={value}" for key, value in self.settings.items()
                            if key not in ("LAION_REDIS_PORT",) and not value.startswith(str(self.folder)))  # fmt: skip
        return "\n".join([
            "# Chaos run",
            "",
            f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
            "",
            f"command: `{command.strip()}`",
            "",
            f"machine: {os.cpu_count()} cores ({cpu_model()}), {psutil.virtual_memory().total / 1024**3:.0f} GiB RAM, "
            f"{platform.platform()}, Python {platform.python_version()}, {redis_version()}",
            "",
            f"settings: `{settings}` (redis appendfsync {self.args.appendfsync}, noeviction)",
            "",
            "parquet files:",
            "",
            *[f"- {line}" for line in self.described],
            "",
            "What it does and checks: see the docstring of `bench/chaos.py`. Figures of the run:",
            "",
            "```",
            text.strip("\n"),
            "```",
            "",
        ])  # fmt: skip


def tail(proc: Proc, chars: int = 600) -> str:
    return " | ".join(proc.log_text().strip().splitlines()[-4:])[-chars:]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def redis_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        output = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"v=(\S+)", output)
        if match:
            return f"redis-server {match.group(1)}"
    return "redis-server"


# --- the audit --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """One stored image: a file, or the image member of a finished shard with its caption and metadata members."""

    path: Path  # the file, or the shard's tar
    name: str  # the file's or the member's name
    offset: int = 0  # where the image's bytes start in ``path``
    size: int = -1  # how many bytes (-1: the whole file)
    caption: bytes | None = None  # webdataset: the ``<key>.txt`` member
    metadata: dict | None = None  # webdataset: the ``<key>.json`` member, parsed

    def data(self) -> bytes:
        with self.path.open("rb") as file:
            file.seek(self.offset)
            return file.read(self.size)


def shard_key(part: str, row: int) -> str:
    """A sample's key in a shard, as docs/output.md defines it (laion5b.sidecars.sample_key)."""
    return f"{part.replace('.', '_')}-{row:09d}"


class Audit:
    """Every row against what the run left: files or shards, error records, counters and Redis lists."""

    def __init__(self, rows: list[Row], store: Path, errors: Path, service: RedisService, output: str) -> None:
        self.rows = rows
        self.store = store
        self.output = output
        self.errors = errors
        self.redis = service
        self.problems: list[str] = []
        self.by_kind: dict[str, Counter] = defaultdict(Counter)
        self.status_count: Counter = Counter()
        self.lost = self.doubled = self.wrong = 0
        self.files_ok = self.records_ok = self.other_transient = 0
        self.added = self.succeeded = self.failed = 0
        self.record_files = self.torn = self.left_in_redis = self.leftover = self.temp_files = 0
        self.shards = self.shard_samples = self.sidecars_ok = 0
        self.open_samples = self.finishing = self.kept_keys = 0

    def problem(self, message: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(message)

    def check(self) -> None:
        client = self.redis.client
        stored = self.stored_samples()
        records = self.error_records(client)
        self.check_counters(client)
        self.check_rows(stored, records)
        self.check_leftovers(client)

    def stored_samples(self) -> dict[tuple[str, str, int], list[Stored]]:
        """Stored images by row (subset, part, row), read as the output format lays them out; the files left in .tmp
        are counted apart."""
        self.count_temp_files()
        return self.shard_samples_by_row() if self.output == "webdataset" else self.files_by_row()

    def count_temp_files(self) -> None:
        temp = self.store / ".tmp"
        self.temp_files = sum(1 for path in temp.rglob("*") if not path.is_dir())
        if self.temp_files:
            self.problem(f"{self.temp_files} files left in {temp}")

    def files_by_row(self) -> dict[tuple[str, str, int], list[Stored]]:
        """Files output: ``<subset>/<part>/<row // SHARD_ROWS>/<id>.<ext>``."""
        found: dict[tuple[str, str], list[Stored]] = defaultdict(list)
        for path in self.store.rglob("*"):
            relative = path.relative_to(self.store)
            if path.is_file() and relative.parts[0] != ".tmp":
                found[relative.parent.as_posix(), path.stem].append(Stored(path, path.name))
        by_row: dict[tuple[str, str, int], list[Stored]] = {}
        for row in self.rows:
            folder = f"{row.subset}/{row.part}/{row.row // SHARD_ROWS:05d}"
            by_row[row.key] = found.get((folder, row.task_id), [])
        extra = sum(len(files) for files in found.values()) - sum(len(files) for files in by_row.values())
        if extra:
            self.problem(f"{extra} stored files belong to no row")
        return by_row

    def shard_samples_by_row(self) -> dict[tuple[str, str, int], list[Stored]]:
        """Webdataset output: every finished shard ``<subset>/<name>.tar`` with its ``.parquet`` index beside."""
        row_keys = {(row.subset, shard_key(row.part, row.row)): row.key for row in self.rows}
        by_row: dict[tuple[str, str, int], list[Stored]] = defaultdict(list)
        extra = 0
        for path in sorted(self.store.rglob("*")):
            relative = path.relative_to(self.store)
            if path.is_dir() or relative.parts[0] == ".tmp":
                continue
            if path.suffix == ".parquet" and path.with_suffix(".tar").exists():
                continue
            if path.suffix != ".tar":
                self.problem(f"not a finished shard: {relative}")
                continue
            self.shards += 1
            subset = relative.parent.as_posix()
            for key, sample in self.read_shard(path).items():
                self.shard_samples += 1
                if (subset, key) in row_keys:
                    by_row[row_keys[subset, key]].append(sample)
                else:
                    extra += 1
        if extra:
            self.problem(f"{extra} samples in shards belong to no row")
        return by_row

    def read_shard(self, tar: Path) -> dict[str, Stored]:
        """The samples of one shard by key, once the tar and its index have been found sound (else none)."""
        where = tar.relative_to(self.store)
        size = tar.stat().st_size
        with tar.open("rb") as file:
            file.seek(max(0, size - 2 * TAR_BLOCK))
            end = file.read()
        if size % TAR_BLOCK or end != bytes(2 * TAR_BLOCK):
            self.problem(f"shard {where}: {size} bytes, not whole tar blocks ending with two zero blocks")
            return {}
        try:
            with tarfile.open(tar, "r:") as archive:
                infos = archive.getmembers()
                sidecars = {info.name: archive.extractfile(info).read() for info in infos
                            if info.isfile() and info.name.endswith((".txt", ".json"))}  # fmt: skip
        except (tarfile.TarError, OSError) as error:
            self.problem(f"shard {where}: not a valid tar ({error})")
            return {}
        names: dict[str, list[str]] = defaultdict(list)
        for info in infos:
            names[info.name.partition(".")[0]].append(info.name)
        regular = {info.name for info in infos if info.isfile()}
        if len(regular) != len(infos):
            self.problem(f"shard {where}: {len(infos)} members, {len(regular)} distinct regular files")
            return {}
        problem = self.index_problem(tar.with_suffix(".parquet"), names)
        if problem:
            self.problem(f"shard {where}: {problem}")
            return {}
        samples = {}
        for key, members in names.items():
            image = [name for name in members if name not in (f"{key}.txt", f"{key}.json")]
            if len(members) != 3 or len(image) != 1:
                self.problem(f"shard {where}: sample {key} has the members {members}")
                continue
            info = next(info for info in infos if info.name == image[0])
            try:
                metadata = json.loads(sidecars[f"{key}.json"])
            except ValueError:
                metadata = {"unreadable": True}
            samples[key] = Stored(tar, image[0], info.offset_data, info.size, sidecars[f"{key}.txt"], metadata)
        return samples

    def index_problem(self, index: Path, names: dict[str, list[str]]) -> str | None:
        """What is wrong with a shard's index, given its tar's member names by key (None: it lists exactly them)."""
        try:
            table = pq.read_table(index)
        except (pa.ArrowException, OSError) as error:
            return f"index {index.name} unreadable ({error})"
        missing = set(INDEX_COLUMNS) - set(table.column_names)
        if missing:
            return f"index {index.name} lacks the columns {sorted(missing)}"
        listed = table.select(["key", "members"]).to_pylist()
        keys = Counter(entry["key"] for entry in listed)
        if keys.most_common(1) and keys.most_common(1)[0][1] > 1:
            return f"index {index.name} lists the key {keys.most_common(1)[0][0]} twice"
        members = {entry["key"]: sorted(entry["members"]) for entry in listed}
        if members != {key: sorted(found) for key, found in names.items()}:
            return f"index {index.name} does not list exactly the tar's members"
        return None

    def error_records(self, client: redis.Redis) -> dict[tuple[str, str, int], list[dict]]:
        """Error records by (subset, part, row): the saved files, the error list and every processing list."""
        lines: list[str] = []
        files = errorfiles.error_files(self.errors)
        self.record_files = len(files)
        for path in files:
            for _, _, line in errorfiles.lines_from(path):
                lines.append(line.decode("utf-8", "replace"))
        in_redis = list(client.lrange(KEYS.error, 0, -1))
        for key in client.scan_iter(match=f"{KEYS.error}:processing:*"):
            in_redis += client.lrange(key, 0, -1)
        self.left_in_redis = len(in_redis)
        records: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
        seen_ids: Counter = Counter()
        for line in lines + in_redis:
            record = errorfiles.parse(line)
            if record is None:
                self.torn += 1
                continue
            seen_ids[record.get("record_id")] += 1
            if "raw" in record or not {"subset", "part", "row"} <= record.keys():
                self.problem(f"an error record that is no task's: {line[:200]}")
                continue
            records[record["subset"], record["part"], record["row"]].append(record)
        twice = [record_id for record_id, count in seen_ids.items() if count > 1]
        if twice:
            self.problem(f"{len(twice)} error records saved more than once, e.g. record_id {twice[0]}")
        return records

    def check_counters(self, client: redis.Redis) -> None:
        added, succeeded, failed = (int(v or 0) for v in client.mget(KEYS.tongji_all, KEYS.tongji_succ,
                                                                     KEYS.tongji_error))  # fmt: skip
        self.added, self.succeeded, self.failed = added, succeeded, failed
        expected_succ = sum(1 for row in self.rows if row.kind.expect is None)
        if not len(self.rows) == succeeded + failed == added:
            self.problem(f"rows {len(self.rows)}, succeeded + failed {succeeded + failed}, tongji_all {added}")
        if succeeded != expected_succ or failed != len(self.rows) - expected_succ:
            self.problem(f"succeeded {succeeded} / failed {failed}, expected {expected_succ} / "
                         f"{len(self.rows) - expected_succ}")  # fmt: skip
        hosts = client.hgetall(KEYS.host_counters)
        host_succ, host_error = int(hosts.get(f"{HOST_ID}:succ", 0)), int(hosts.get(f"{HOST_ID}:error", 0))
        bad_rows = sum(1 for row in self.rows if row.kind.name == "bad_url_row")
        if host_succ != succeeded or host_error + bad_rows != failed:
            self.problem(f"host counters {host_succ} succ / {host_error} errors do not match {succeeded} / "
                         f"{failed} ({bad_rows} bad rows are counted by add_task.py)")  # fmt: skip

    def check_rows(self, samples: dict[tuple[str, str, int], list[Stored]], records: dict) -> None:
        for row in self.rows:
            stored = samples.get(row.key, [])
            found = records.get(row.key, [])
            outcomes = len(stored) + len(found)
            label = self.judge(row, stored, found)
            self.by_kind[row.kind.name][label] += 1
            for record in found:
                self.status_count[str(record.get("status"))] += 1
            if outcomes == 0:
                self.lost += 1
                self.problem(f"lost: {row.kind.name} row {row.key} ({row.url})")
            elif outcomes > 1:
                self.doubled += 1
                self.problem(f"doubled: {row.kind.name} row {row.key}: {len(stored)} stored, {len(found)} records")
            elif not label.startswith("ok"):
                self.wrong += 1
                self.problem(f"wrong: {row.kind.name} row {row.key} ({row.url}): {label}")
        for kind in KINDS:
            got = self.by_kind[kind.name]
            rows = sum(got.values())
            if kind.retried and rows >= 10 and got[f"ok {kind.expect}"] < OWN_STATUS_SHARE * rows:
                self.problem(f"only {got[f'ok {kind.expect}']} of {rows} {kind.name} rows ended with {kind.expect}")
        known = {row.key for row in self.rows}
        strays = sum(len(found) for key, found in records.items() if key not in known)
        if strays:
            self.problem(f"{strays} error records belong to no row")

    def judge(self, row: Row, stored: list[Stored], found: list[dict]) -> str:
        """ok/... when the row ended as its kind must; else what happened instead."""
        kind = row.kind
        if kind.expect is None:
            if len(stored) != 1 or found:
                return f"{len(stored)} files + {len(found)} records" if stored or found else "lost"
            data = stored[0].data()
            assert row.image is not None
            if data != row.image.data():
                return f"bytes differ ({len(data)} stored)"
            if image_extension(data) != row.image.ext or Path(stored[0].name).suffix != f".{row.image.ext}":
                return f"not a valid {row.image.ext}: {stored[0].name}"
            if stored[0].caption is not None:
                problem = self.sidecar_problem(row, stored[0], data)
                if problem:
                    return problem
                self.sidecars_ok += 1
            self.files_ok += 1
            return "ok image"
        if stored or len(found) != 1:
            return f"{len(stored)} files + {len(found)} records" if stored or found else "lost"
        record = found[0]
        status = record.get("status")
        if not kind.accepts(status):
            return f"status {status} ({record.get('error_msg', '')[:120]})"
        if kind.retried and record.get("attempts") != MAX_ATTEMPTS:
            return f"status {status} after {record.get('attempts')} tries, not {MAX_ATTEMPTS}"
        if record.get("id") != row.task_id or record.get("url") != (row.url or ""):
            return f"record of another task: {record.get('id')} {record.get('url')}"
        if status == "blocked_address" and not str(record.get("error_msg", "")).startswith("refused to connect"):
            return f"blocked without the guard's refusal: {record.get('error_msg')}"
        self.records_ok += 1
        if status != kind.expect:
            self.other_transient += 1
            return f"ok {status} (last try)"
        return f"ok {status}"

    def sidecar_problem(self, row: Row, sample: Stored, data: bytes) -> str | None:
        """What is wrong with a shard sample's caption and metadata members (None: nothing)."""
        if sample.caption != row.caption.encode("utf-8"):
            return f"caption differs: {sample.caption[:80]!r}"
        metadata = sample.metadata or {}
        if metadata.get("sha256") != hashlib.sha256(data).hexdigest():
            return f"metadata sha256 {metadata.get('sha256')} is not the image's"
        wanted = {"key": shard_key(row.part, row.row), "id": row.task_id, "url": row.url, "caption": row.caption}
        differs = {name: metadata.get(name) for name, value in wanted.items() if metadata.get(name) != value}
        if differs:
            return f"metadata of another sample: {differs}"
        return None

    def check_leftovers(self, client: redis.Redis) -> None:
        queued = client.llen(KEYS.task)
        delayed = client.zcard(KEYS.delayed)
        leased = sum(client.llen(key) for key in client.scan_iter(match=f"{KEYS.task}:lease:*"))
        self.leftover = queued + delayed + leased
        if self.leftover:
            self.problem(f"left behind: {queued} queued, {delayed} delayed, {leased} leased")
        if client.exists(KEYS.producer):
            self.problem("the producer key is still set after add_task.py exited")
        self.open_samples = int(client.hget(KEYS.host_counters, f"{HOST_ID}:open") or 0)
        self.finishing = client.hlen(KEYS.shards)
        kept = {*client.scan_iter(match=KEYS.kept("*")), *client.scan_iter(match=KEYS.shard_tasks("*"))}
        self.kept_keys = len(kept)
        if self.open_samples or self.finishing or self.kept_keys:
            self.problem(f"shards left unfinished: {HOST_ID}:open {self.open_samples}, {self.finishing} shards being "
                         f"finished, {self.kept_keys} lists of kept tasks (e.g. {sorted(kept)[:3]})")  # fmt: skip


# --- entry point ------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="URLs in the parquet files")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the fault window")
    parser.add_argument("--seed", type=int, default=1, help="seed of the URL mix and of the faults")
    parser.add_argument("--workers", type=int, default=3, help="downloader processes")
    parser.add_argument("--threads", type=int, default=16, help="downloads in flight per downloader (threads or async)")
    parser.add_argument("--engine", choices=("threads", "async"), default="threads", help="LAION_ENGINE of the workers")
    parser.add_argument("--output", choices=("files", "webdataset"), default="files",
                        help="LAION_OUTPUT_FORMAT of the workers")  # fmt: skip
    parser.add_argument("--shard-size", type=int, default=25,
                        help="LAION_SHARD_SIZE with --output webdataset: small, so that many shards finish and kills "
                        "land mid-shard")  # fmt: skip
    parser.add_argument("--shard-seconds", type=float, default=2.0,
                        help="LAION_SHARD_MAX_SECONDS with --output webdataset: some shards close by age")  # fmt: skip
    parser.add_argument("--batch", type=int, default=0, help="LAION_ADDTASK_BATCH (default: rows / 100, 25..200)")
    parser.add_argument("--threshold", type=int, default=0, help="LAION_ADDTASK_THRESHOLD (default: rows / 20)")
    parser.add_argument("--saver-batch", type=int, default=25, help="save_error_task.py --batch")
    parser.add_argument("--appendfsync", choices=("everysec", "always"), default="everysec")
    parser.add_argument("--drain-timeout", type=float, default=180.0, help="seconds allowed to finish after faults")
    parser.add_argument("--workdir", type=Path, help="folder of the run (default: a new temporary folder)")
    parser.add_argument("--no-store-fill", action="store_true",
                        help="keep store_dir on the run's disk: no tmpfs, no store that fills")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (images, logs, Redis data)")
    parser.add_argument("--no-report", action="store_true", help=f"do not write {REPORT.relative_to(ROOT)}")
    args = parser.parse_args()
    if args.rows < 1 or args.workers < 1 or args.threads < 1 or args.shard_size < 1:
        parser.error("--rows, --workers, --threads and --shard-size must be at least 1")
    if args.shard_seconds <= 0:
        parser.error("--shard-seconds must be more than 0")
    return args


def main() -> int:
    args = parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="chaos-", dir=args.workdir))
    else:
        folder = Path(tempfile.mkdtemp(prefix="laion5b-chaos-"))
    chaos = Chaos(args, folder)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    code = 1
    try:
        code = chaos.run()
    except KeyboardInterrupt:
        print("interrupted: stopping everything this run started", file=sys.stderr)
        code = 130
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):  # a second signal (timeout(1) sends two) must not cut this short
            signal.signal(signum, signal.SIG_IGN)
        try:
            chaos.stop_everything()
        finally:
            chaos.tmpfs.unmount(keep=code != 0 or args.keep)
        if code == 0 and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"run folder kept: {folder}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
