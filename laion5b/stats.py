"""Progress figures for speed.py: one snapshot of the counters, queues, workers and hosts; rates, ETA, rendering."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from laion5b import control
from laion5b.hostledger import ThrottledHost, read_throttled
from laion5b.keys import Keys
from laion5b.leases import Owner
from laion5b.monitor import RECORD_TTL_INTERVALS, HostSample
from laion5b.storehealth import STORE_STALLED
from laion5b.tables import table

MB = 1024 * 1024
HOST_COUNTERS = ("succ", "error", "bytes", "open")


@dataclass(frozen=True)
class Worker:
    """One identity of the workers set, alive (heartbeat present) or stale (expired, not yet reaped)."""

    identity: str
    host: str
    alive: bool
    heartbeat_age: float | None
    leased: int


@dataclass(frozen=True)
class Host:
    """The figures of one download machine."""

    host: str
    succeeded: int
    failed: int
    bytes: int
    used_gb: float | None
    free_gb: float | None
    disk_age: float | None
    heartbeat_age: float | None
    live_workers: int
    stale_workers: int
    sample: HostSample | None
    state: str
    in_flight: int = 0
    in_shards: int = 0
    """Samples in its workers' unfinished shards (webdataset output): stored, counted as succeeded once finished."""
    store_errno: str | None = None
    """The errno name of its failing store: ``state`` is then store_failing (or store_stalled, which comes first),
    whatever ``_state`` says, as long as a live worker of it reports the problem."""

    @property
    def dead(self) -> bool:
        return self.state == "DEAD"

    @property
    def stored(self) -> int:
        """Samples stored, finished shards or not (see ``Snapshot.stored``)."""
        return self.succeeded + self.in_shards


@dataclass(frozen=True)
class Snapshot:
    """Everything speed.py shows, read at one moment; missing keys read as zero."""

    at: float
    added: int
    succeeded: int
    failed: int
    queued: int
    delayed: int
    in_flight: int
    error_queue: int
    bytes: int
    total: int | None
    started: float | None
    hosts: list[Host]
    failures: dict[str, int] = field(default_factory=dict)
    requeued: int = 0
    control: dict[str, str] = field(default_factory=dict)
    acks: dict[str, str] = field(default_factory=dict)
    stores: dict[str, dict[str, str]] = field(default_factory=dict)
    """Worker identity -> its store problem (``store``: store_failing or store_stalled, ``errno``, ``path``)."""
    throttled: list[ThrottledHost] = field(default_factory=list)
    """The web hosts that answered 429/503 or timed out in bursts most often, with their fleet-wide limit and pause."""

    @property
    def in_shards(self) -> int:
        """Samples in unfinished shards (webdataset output), not counted as succeeded yet."""
        return sum(host.in_shards for host in self.hosts)

    @property
    def stored(self) -> int:
        """Samples stored, finished shards or not: what rates are measured on, so that they do not wait for shards."""
        return self.succeeded + self.in_shards

    @property
    def done(self) -> int:
        return self.stored + self.failed


@dataclass(frozen=True)
class Rates:
    """Throughput over a stretch of time."""

    seconds: float
    images_per_s: float
    tasks_per_s: float
    mb_per_s: float
    success_ratio: float | None


def read_snapshot(client: redis.Redis, keys: Keys, heartbeat_ttl: int, monitor_interval: int) -> Snapshot:
    """Read the whole state in five round trips; raise redis errors as they come."""
    pipe = client.pipeline(transaction=True)
    for key in (keys.tongji_all, keys.tongji_succ, keys.tongji_error, keys.tongji_bytes, keys.tongji_total):
        pipe.get(key)
    pipe.get(keys.started)
    pipe.llen(keys.task)
    pipe.zcard(keys.delayed)
    pipe.llen(keys.error)
    pipe.smembers(keys.workers)
    pipe.hgetall(keys.host_counters)
    pipe.hgetall(keys.tongji_disk)
    pipe.hgetall(keys.failures)
    pipe.get(keys.requeued_total)
    pipe.hgetall(keys.control)
    pipe.hgetall(keys.control_acks)
    (added, succeeded, failed, stored_bytes, total, started, queued, delayed, errors, members, counters, disks,
     failures, requeued, requests, acks) = pipe.execute()  # fmt: skip
    now = time.time()
    workers = read_workers(client, keys, sorted(members), heartbeat_ttl)
    records = {identity: _ack_record(text) for identity, text in sorted(acks.items())}
    stores = {identity: _store_problem(record) for identity, record in records.items() if "store" in record}
    per_host = _host_counters(counters)
    names = set(per_host) | {w.host for w in workers} | {f for f in disks if not f.endswith(":ts")}
    samples = _host_samples(client, keys, sorted(names))
    by_host: dict[str, list[Worker]] = {name: [] for name in names}
    for worker in workers:
        by_host[worker.host].append(worker)
    hosts = [
        _host(name, per_host.get(name), disks, samples[name], by_host[name], stores, now, monitor_interval)
        for name in sorted(names)
    ]
    return Snapshot(
        at=now,
        added=_int(added),
        succeeded=_int(succeeded),
        failed=_int(failed),
        queued=queued,
        delayed=delayed,
        in_flight=sum(worker.leased for worker in workers),
        error_queue=errors,
        bytes=_int(stored_bytes),
        total=_int(total) if total is not None else None,
        started=_float(started),
        hosts=hosts,
        failures={status: _int(count) for status, count in sorted(failures.items())},
        requeued=_int(requeued),
        control=requests,
        acks={identity: str(record.get("state", "?")) for identity, record in records.items()},
        stores=stores,
        throttled=read_throttled(client, keys),
    )


def _ack_record(text: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _store_problem(record: dict[str, Any]) -> dict[str, str]:
    return {name: str(record.get(name) or "") for name in ("store", "errno", "path")}


def read_workers(client: redis.Redis, keys: Keys, identities: list[str], heartbeat_ttl: int) -> list[Worker]:
    """Every worker identity with its lease length and heartbeat."""
    pipe = client.pipeline(transaction=False)
    for identity in identities:
        pipe.llen(keys.lease(identity))
        pipe.get(keys.heartbeat(identity))
        pipe.ttl(keys.heartbeat(identity))
    replies = pipe.execute()
    workers = []
    for index, identity in enumerate(identities):
        leased, token, ttl = replies[3 * index : 3 * index + 3]
        owner = Owner.parse(token) if token else None
        host = owner.host if owner else identity.rpartition(":")[0]
        age = max(0.0, heartbeat_ttl - ttl) if token and ttl >= 0 else None
        workers.append(Worker(identity, host, token is not None, age, leased))
    return workers


def _host_counters(fields: dict[str, str]) -> dict[str, Counter[str]]:
    per_host: dict[str, Counter[str]] = {}
    for name, value in fields.items():
        host, _, counter = name.rpartition(":")
        if counter in HOST_COUNTERS:
            per_host.setdefault(host, Counter())[counter] += _int(value)
    return per_host


def _host_samples(client: redis.Redis, keys: Keys, names: list[str]) -> dict[str, HostSample | None]:
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.host_record(name))
    return {name: HostSample.parse(fields) for name, fields in zip(names, pipe.execute(), strict=True)}


def _host(
    name: str,
    counters: Counter[str] | None,
    disks: dict[str, str],
    sample: HostSample | None,
    workers: list[Worker],
    stores: dict[str, dict[str, str]],
    now: float,
    monitor_interval: int,
) -> Host:
    counters = counters or Counter()
    stamp = _float(disks.get(f"{name}:ts"))
    disk_age = max(0.0, now - stamp) if stamp is not None else None
    used = sample.used_gb if sample else _float(disks.get(name))
    ages = [worker.heartbeat_age for worker in workers if worker.heartbeat_age is not None]
    live = sum(1 for worker in workers if worker.alive)
    stale = len(workers) - live
    fresh = RECORD_TTL_INTERVALS * monitor_interval
    monitor = "missing" if disk_age is None else "fresh" if disk_age <= fresh else "stale"
    problems = [stores[worker.identity] for worker in workers if worker.alive and worker.identity in stores]
    problem = min(problems, key=lambda found: found["store"] != STORE_STALLED, default=None)  # stalled comes first
    return Host(
        host=name,
        succeeded=counters["succ"],
        failed=counters["error"],
        bytes=counters["bytes"],
        used_gb=used,
        free_gb=sample.free_gb if sample else None,
        disk_age=disk_age,
        heartbeat_age=min(ages) if ages else None,
        live_workers=live,
        stale_workers=stale,
        sample=sample,
        state=problem["store"] if problem is not None else _state(live, stale, monitor),
        in_flight=sum(worker.leased for worker in workers),
        in_shards=counters["open"],
        store_errno=(problem["errno"] or None) if problem is not None else None,
    )


def _state(live: int, stale: int, monitor: str) -> str:
    """ok: workers alive; no monitor: workers alive, no recent disk sample; idle: no worker, none died either;
    DEAD: no worker alive, and some died without retiring or the monitor stopped publishing."""
    if live:
        return "ok" if monitor == "fresh" else "no monitor"
    return "DEAD" if stale or monitor == "stale" else "idle"


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        number = _float(value)
        return int(number) if number is not None else 0


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --- rates and ETA ---


def between(before: Snapshot, after: Snapshot) -> Rates:
    """Throughput from one snapshot to the next."""
    seconds = max(after.at - before.at, 1e-9)
    return _rates(seconds, after.stored - before.stored, after.failed - before.failed, after.bytes - before.bytes)


def since_start(snapshot: Snapshot) -> Rates | None:
    """Throughput since the first task was added, or None when that time is unknown."""
    if snapshot.started is None:
        return None
    seconds = max(snapshot.at - snapshot.started, 1e-9)
    return _rates(seconds, snapshot.stored, snapshot.failed, snapshot.bytes)


def _rates(seconds: float, succeeded: int, failed: int, stored_bytes: int) -> Rates:
    done = succeeded + failed
    return Rates(
        seconds=seconds,
        images_per_s=succeeded / seconds,
        tasks_per_s=done / seconds,
        mb_per_s=stored_bytes / MB / seconds,
        success_ratio=succeeded / done if done > 0 else None,
    )


def eta_seconds(snapshot: Snapshot, rates: Rates | None) -> float | None:
    """Seconds until every row the producer expects is done, at the given pace; None when unknown."""
    if snapshot.total is None:
        return None
    left = max(snapshot.total, snapshot.added) - snapshot.done
    if left <= 0:
        return 0.0
    if rates is None or rates.tasks_per_s <= 0:
        return None
    return left / rates.tasks_per_s


def host_rates(before: Snapshot | None, after: Snapshot) -> dict[str, float]:
    """Images per second of each host, between two snapshots (or since start when there is no earlier one)."""
    if before is None:
        rates = since_start(after)
        seconds = rates.seconds if rates else None
        return {host.host: host.stored / seconds if seconds else 0.0 for host in after.hosts}
    seconds = max(after.at - before.at, 1e-9)
    earlier = {host.host: host.stored for host in before.hosts}
    return {host.host: (host.stored - earlier.get(host.host, 0)) / seconds for host in after.hosts}


# --- output ---


def to_json(snapshot: Snapshot) -> dict[str, Any]:
    """The snapshot as a JSON object; rates are since the first task was added."""
    rates = since_start(snapshot)
    per_host = host_rates(None, snapshot)
    return {
        "time": round(snapshot.at, 3),
        "added": snapshot.added,
        "succeeded": snapshot.succeeded,
        "failed": snapshot.failed,
        "queued": snapshot.queued,
        "delayed": snapshot.delayed,
        "in_flight": snapshot.in_flight,
        "in_shards": snapshot.in_shards,
        "error_queue": snapshot.error_queue,
        "bytes": snapshot.bytes,
        "total": snapshot.total,
        "started": snapshot.started,
        "images_per_s": _round(rates.images_per_s if rates else None),
        "mb_per_s": _round(rates.mb_per_s if rates else None),
        "success_ratio": _round(rates.success_ratio if rates else None, 4),
        "eta_seconds": _round(eta_seconds(snapshot, rates), 0),
        "hosts": [_host_json(host, per_host[host.host]) for host in snapshot.hosts],
        "failures_by_status": snapshot.failures,
        "requeued": snapshot.requeued,
        "control": control_json(snapshot),
        "throttled_hosts": [host.to_json() for host in snapshot.throttled],
    }


def control_json(snapshot: Snapshot) -> dict[str, Any]:
    """What is paused or drained, each worker's acknowledgement, and the store problems workers report."""
    return {
        "paused": sorted(control.scope(name) for name in snapshot.control if name.startswith(control.PAUSE)),
        "drains": sorted(control.scope(name) for name in snapshot.control if name.startswith(control.DRAIN)),
        "acks": snapshot.acks,
        "stores": snapshot.stores,
    }


def _host_json(host: Host, rate: float) -> dict[str, Any]:
    figures = {
        "host": host.host,
        "succeeded": host.succeeded,
        "failed": host.failed,
        "bytes": host.bytes,
        "rate": _round(rate),
        "disk_used_gb": _round(host.used_gb),
        "disk_free_gb": _round(host.free_gb),
        "disk_age_seconds": _round(host.disk_age, 1),
        "heartbeat_age_seconds": _round(host.heartbeat_age, 1),
        "in_flight": host.in_flight,
        "in_shards": host.in_shards,
        "live_workers": host.live_workers,
        "stale_workers": host.stale_workers,
        "state": host.state,
        "store_errno": host.store_errno,
        "dead": host.dead,
    }
    sample = asdict(host.sample) if host.sample else {}
    for name in ("cpu_percent", "memory_percent", "net_in_bps", "net_out_bps", "downloaders"):
        figures[name] = sample.get(name)
    return figures


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def render(snapshot: Snapshot, before: Snapshot | None, min_success_ratio: float) -> str:
    """The status view: totals, rates over the last interval and since start, ETA, one row per host."""
    start = since_start(snapshot)
    last = between(before, snapshot) if before else None
    total = f" of {snapshot.total:,} expected" if snapshot.total is not None else ""
    lines = [
        f"laion5b progress at {datetime.fromtimestamp(snapshot.at, tz=UTC):%Y-%m-%d %H:%M:%S} UTC",
        f"queued {snapshot.queued:,} | delayed {snapshot.delayed:,} | added {snapshot.added:,}{total} | "
        f"succeeded {snapshot.succeeded:,} | failed {snapshot.failed:,} | held by workers {snapshot.in_flight:,} | "
        f"error queue {snapshot.error_queue:,}"
        + (f" | in open shards {snapshot.in_shards:,}" if snapshot.in_shards else ""),
    ]
    if last:
        lines.append(_rates_line(f"last {_seconds(last.seconds)} s:", last))
    if start:
        lines.append(_rates_line("since start:", start) + f"  running {_duration(start.seconds)}")
    eta = eta_seconds(snapshot, last if last and last.tasks_per_s > 0 else start)
    if eta is not None and snapshot.total is not None:
        left = max(snapshot.total, snapshot.added) - snapshot.done
        lines.append(f"ETA {_duration(eta)} for {left:,} tasks left")
    if last and last.success_ratio is not None and last.success_ratio < min_success_ratio:
        lines.append(
            f"!! success ratio {100 * last.success_ratio:.0f}% over the last {_seconds(last.seconds)} s is under "
            f"{100 * min_success_ratio:.0f}%: check DNS and the network of the download hosts"
        )
    if snapshot.failures:
        lines.append("failures: " + ", ".join(f"{status} {count:,}" for status, count in _by_count(snapshot.failures)))
    lines += _control_lines(snapshot)
    if snapshot.hosts:
        lines += ["", _hosts_table(snapshot, host_rates(before, snapshot))]
    if snapshot.throttled:
        lines += ["", "most throttled web hosts (fleet-wide limit, slots held, pause):", _throttled_table(snapshot)]
    return "\n".join(lines) + "\n"


def _by_count(failures: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(failures.items(), key=lambda item: (-item[1], item[0]))


def _control_lines(snapshot: Snapshot) -> list[str]:
    state = control_json(snapshot)
    lines = []
    if state["paused"]:
        lines.append(f"PAUSED: {', '.join(state['paused'])} (control.py resume)")
    if state["drains"]:
        lines.append(f"drains asked: {', '.join(state['drains'])}")
    waiting = Counter(ack for ack in snapshot.acks.values() if ack != control.RUNNING)
    if waiting:
        lines.append("workers: " + ", ".join(f"{count} {ack}" for ack, count in sorted(waiting.items())))
    return lines


def _rates_line(label: str, rates: Rates) -> str:
    ratio = f"{100 * rates.success_ratio:.1f}%" if rates.success_ratio is not None else "-"
    return f"{label:<13}{rates.images_per_s:9.1f} img/s {rates.mb_per_s:8.2f} MB/s  success {ratio}"


def _hosts_table(snapshot: Snapshot, rates: dict[str, float]) -> str:
    header = ["host", "img/s", "succeeded", "failed", "disk used", "disk free", "heartbeat", "workers", "state"]
    rows = [
        [
            host.host,
            f"{rates[host.host]:.1f}",
            f"{host.succeeded:,}" + (f" (+{host.in_shards:,} in shards)" if host.in_shards else ""),
            f"{host.failed:,}",
            _gb(host.used_gb),
            _gb(host.free_gb),
            f"{host.heartbeat_age:.0f} s ago" if host.heartbeat_age is not None else "-",
            f"{host.live_workers}" + (f" (+{host.stale_workers} dead)" if host.stale_workers else ""),
            host.state + (f" {host.store_errno}" if host.store_errno else ""),
        ]
        for host in snapshot.hosts
    ]
    return table(header, rows, right=(1, 2, 3, 4, 5, 6, 7))


def _throttled_table(snapshot: Snapshot) -> str:
    header = ["web host", "429/503", "limit", "held", "paused"]
    rows = [
        [host.host, f"{host.throttles:,}", f"{host.limit}", f"{host.held}", _paused(host.paused)]
        for host in snapshot.throttled
    ]
    return table(header, rows, right=(1, 2, 3, 4))


def _paused(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds > 0 else "-"


def _gb(value: float | None) -> str:
    return f"{value:,.0f} GB" if value is not None else "-"


def _seconds(seconds: float) -> str:
    return f"{round(seconds, 1):g}"


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"
