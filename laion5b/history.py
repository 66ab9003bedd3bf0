"""A bounded history of the run in Redis: one sample a minute for 48 h and one an hour for ``history_days``, per host
and for the whole run (scope ``*``).

Each scope has two lists of compact text samples, oldest first (``keys.history(scope, "minute" | "hour")``); one
script appends a sample only when its minute (and, to the hour list, its hour) is newer than the last one's, and trims
both lists to their length, so the history is bounded whatever writes it and however often. A sample is about 70
bytes: 3216 samples a scope, 101 scopes (100 hosts and the run) take about 25 MB.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass

import redis

from laion5b import stats
from laion5b.control import redis_time
from laion5b.keys import Keys
from laion5b.monitor import HostSample
from laion5b.tables import table

log = logging.getLogger(__name__)

RUN = "*"
MINUTE, HOUR = 60, 3600
MINUTES_KEPT = 48 * 60
LOCK_SECONDS = 2 * MINUTE

# KEYS: minute list, hour list, hosts set. ARGV: sample, its Unix time, minutes kept, hours kept, host ('' for the
# run). Returns 1 when the sample was added, 0 when its minute already has one.
_APPEND = f"""
local function slot(sample, step)
  return math.floor(tonumber(string.match(sample, '^[0-9]+')) / step)
end
local at = tonumber(ARGV[2])
local last = redis.call('LINDEX', KEYS[1], -1)
if last and slot(last, {MINUTE}) >= math.floor(at / {MINUTE}) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
local last_hour = redis.call('LINDEX', KEYS[2], -1)
if not last_hour or slot(last_hour, {HOUR}) < math.floor(at / {HOUR}) then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
end
if ARGV[5] ~= '' then redis.call('SADD', KEYS[3], ARGV[5]) end
return 1
"""


@dataclass(frozen=True)
class Sample:
    """The figures of one scope at one minute. ``succeeded`` includes the samples in unfinished shards (webdataset
    output), so rates do not wait for shards. For a host, ``in_flight`` is what its workers hold and ``queued`` and
    ``delayed`` are None; disk figures are None when unknown."""

    at: int
    succeeded: int
    failed: int
    bytes: int
    queued: int | None
    delayed: int | None
    in_flight: int
    disk_used_gb: float | None
    disk_free_gb: float | None
    workers: int

    def encode(self) -> str:
        return ",".join(_text(value) for value in dataclasses.astuple(self))

    @classmethod
    def decode(cls, text: str) -> Sample | None:
        parts = text.split(",")
        names = [item.name for item in dataclasses.fields(cls)]
        if len(parts) != len(names):
            return None
        try:
            values = [None if part == "" else float(part) if "." in part else int(part) for part in parts]
        except ValueError:
            return None
        return cls(**dict(zip(names, values, strict=True)))

    def to_list(self) -> list:
        return list(dataclasses.astuple(self))


def _text(value: int | float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f}" if isinstance(value, float) else str(value)


class History:
    """Writes and reads the history lists."""

    def __init__(self, client: redis.Redis, keys: Keys, days: int) -> None:
        self.client = client
        self.keys = keys
        self.hours_kept = max(1, days) * 24
        self._append = client.register_script(_APPEND)

    def append(self, scope: str, sample: Sample) -> bool:
        """Add ``sample`` unless its minute already has one; True when added."""
        keys = [self.keys.history(scope, "minute"), self.keys.history(scope, "hour"), self.keys.history_hosts]
        host = "" if scope == RUN else scope
        args = [sample.encode(), sample.at, MINUTES_KEPT, self.hours_kept, host]
        return bool(self._append(keys=keys, args=args))

    def take_run_lock(self, at: float, owner: str) -> bool:
        """Whether this process writes the run-wide sample of ``at``'s minute (the first to ask does)."""
        return bool(self.client.set(self.keys.history_lock(int(at // MINUTE)), owner, nx=True, ex=LOCK_SECONDS))

    def hosts(self) -> list[str]:
        return sorted(self.client.smembers(self.keys.history_hosts))

    def read(self, scopes: list[str], since: float, now: float) -> dict[str, list[Sample]]:
        """Samples of each scope from ``now - since`` on: hourly ones older than the minute list, then minutes."""
        minutes = min(MINUTES_KEPT, int(since // MINUTE) + 2)
        hours = min(self.hours_kept, int(since // HOUR) + 2) if since > MINUTES_KEPT * MINUTE else 0
        pipe = self.client.pipeline(transaction=False)
        for scope in scopes:
            pipe.lrange(self.keys.history(scope, "minute"), -minutes, -1)
            pipe.lrange(self.keys.history(scope, "hour"), -hours, -1) if hours else pipe.echo("")
        replies = pipe.execute()
        start = now - since
        result = {}
        for index, scope in enumerate(scopes):
            by_minute = _decoded(replies[2 * index])
            by_hour = _decoded(replies[2 * index + 1]) if hours else []
            first = by_minute[0].at if by_minute else now
            merged = [sample for sample in by_hour if sample.at < first] + by_minute
            result[scope] = [sample for sample in merged if sample.at >= start]
        return result


def _decoded(texts: list[str]) -> list[Sample]:
    return [sample for sample in map(Sample.decode, texts) if sample is not None]


def run_sample(snapshot: stats.Snapshot, at: int) -> Sample:
    """The run-wide sample of a snapshot; disk figures are the sums over the hosts that report them."""
    used = [host.used_gb for host in snapshot.hosts if host.used_gb is not None]
    free = [host.free_gb for host in snapshot.hosts if host.free_gb is not None]
    return Sample(
        at=at,
        succeeded=snapshot.stored,
        failed=snapshot.failed,
        bytes=snapshot.bytes,
        queued=snapshot.queued,
        delayed=snapshot.delayed,
        in_flight=snapshot.in_flight,
        disk_used_gb=float(sum(used)) if used else None,
        disk_free_gb=float(sum(free)) if free else None,
        workers=sum(host.live_workers for host in snapshot.hosts),
    )


def host_sample(client: redis.Redis, keys: Keys, host_id: str, machine: HostSample, at: int) -> Sample:
    """This host's sample: its counters, what its workers hold, and the machine sample just published."""
    identities = [worker for worker in client.smembers(keys.workers) if worker.rpartition(":")[0] == host_id]
    pipe = client.pipeline(transaction=False)
    pipe.hmget(keys.host_counters, [f"{host_id}:{name}" for name in stats.HOST_COUNTERS])
    for identity in identities:
        pipe.llen(keys.lease(identity))
    (succeeded, failed, stored_bytes, in_shards), *leased = pipe.execute()
    return Sample(
        at=at,
        succeeded=int(succeeded or 0) + int(in_shards or 0),
        failed=int(failed or 0),
        bytes=int(stored_bytes or 0),
        queued=None,
        delayed=None,
        in_flight=sum(leased),
        disk_used_gb=machine.used_gb,
        disk_free_gb=machine.free_gb,
        workers=machine.downloaders,
    )


@dataclass
class Historian:
    """monitor_disk.py's writer: after each machine sample, this host's minute sample and, when it takes the
    minute's lock, the run-wide one."""

    history: History
    host_id: str
    heartbeat_ttl: int
    monitor_interval: int

    def record(self, machine: HostSample) -> None:
        client, keys = self.history.client, self.history.keys
        at = int(redis_time(client))
        self.history.append(self.host_id, host_sample(client, keys, self.host_id, machine, at))
        if self.history.take_run_lock(at, self.host_id):
            snapshot = stats.read_snapshot(client, keys, self.heartbeat_ttl, self.monitor_interval)
            self.history.append(RUN, run_sample(snapshot, at))
            log.info("history_run_sample host=%s at=%d succeeded=%d", self.host_id, at, snapshot.succeeded)


# --- speed.py --history ---

SPARKS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 32


def rates(samples: list[Sample]) -> list[tuple[int, float]]:
    """Images per second between consecutive samples, at the later one's time."""
    return [
        (after.at, max(0, after.succeeded - before.succeeded) / (after.at - before.at))
        for before, after in itertools.pairwise(samples)
        if after.at > before.at
    ]


def sparkline(points: list[tuple[int, float]], start: float, end: float, width: int = SPARK_WIDTH) -> str:
    """Mean of the values in each of ``width`` equal stretches of [start, end], as bars; a blank where none is."""
    buckets: list[list[float]] = [[] for _ in range(width)]
    span = max(end - start, 1e-9)
    for at, value in points:
        if start <= at <= end:
            buckets[min(width - 1, int((at - start) / span * width))].append(value)
    means = [sum(bucket) / len(bucket) if bucket else None for bucket in buckets]
    top = max((mean for mean in means if mean is not None), default=0.0)
    return "".join(
        " " if mean is None else SPARKS[min(len(SPARKS) - 1, int(mean / top * (len(SPARKS) - 1)))] if top else SPARKS[0]
        for mean in means
    )


def render(history: dict[str, list[Sample]], since: float, now: float) -> str:
    """One row per scope (the run first, then each host): images/s over the stretch, last figures, a sparkline."""
    header = ["scope", "samples", "img/s last", "img/s mean", "img/s max", "succeeded", "held", "disk free",
              f"img/s over the last {describe(since)}"]  # fmt: skip
    rows = []
    for scope, samples in history.items():
        points = rates(samples)
        values = [value for _, value in points]
        last = samples[-1] if samples else None
        rows.append(
            [
                "run" if scope == RUN else scope,
                str(len(samples)),
                f"{values[-1]:.1f}" if values else "-",
                f"{sum(values) / len(values):.1f}" if values else "-",
                f"{max(values):.1f}" if values else "-",
                f"{last.succeeded:,}" if last else "-",
                f"{last.in_flight:,}" if last else "-",
                f"{last.disk_free_gb:,.0f} GB" if last and last.disk_free_gb is not None else "-",
                f"|{sparkline(points, now - since, now)}|",
            ]
        )
    return table(header, rows, right=(1, 2, 3, 4, 5, 6, 7)) + "\n"


UNITS = {"s": 1, "m": MINUTE, "h": HOUR, "d": 24 * HOUR}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``6h``, ``2d`` (or plain seconds) as seconds; raise ValueError otherwise."""
    text = text.strip().lower()
    unit = UNITS.get(text[-1:]) if text else None
    seconds = float(text[:-1]) * unit if unit else float(text)
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"not a duration: {text!r}")
    return seconds


def describe(seconds: float) -> str:
    for suffix, unit in sorted(UNITS.items(), key=lambda item: -item[1]):
        if seconds >= unit and seconds % unit == 0:
            return f"{int(seconds // unit)}{suffix}"
    return f"{seconds:g}s"
