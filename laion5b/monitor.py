"""This machine's sample for monitor_disk.py: the download disk, CPU, memory, network and live downloaders."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import psutil
import redis

from laion5b import disk
from laion5b.keys import Keys
from laion5b.leases import Owner
from laion5b.redisconn import RETRYABLE, retrying

log = logging.getLogger(__name__)

RECORD_TTL_INTERVALS = 3
"""The host record expires after this many monitor intervals without a new sample."""
WARM_UP = 1.0
"""Seconds between the first reading of the CPU and network counters and the first sample."""


@dataclass(frozen=True)
class HostSample:
    """What monitor_disk.py publishes for one machine in ``keys.host_record(host_id)``."""

    used_gb: float
    free_gb: float
    total_gb: float
    percent: float
    cpu_percent: float
    memory_percent: float
    net_in_bps: float
    net_out_bps: float
    downloaders: int
    ts: float

    def fields(self) -> dict[str, str]:
        """The hash fields, as text."""
        return {
            name: f"{value:.3f}" if isinstance(value, float) else str(value)
            for name, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def parse(cls, fields: Mapping[str, str]) -> HostSample | None:
        """The sample in a host record, or None when the record is missing or malformed."""
        try:
            return cls(**{item.name: _number(item.type, fields[item.name]) for item in dataclasses.fields(cls)})
        except (KeyError, ValueError):
            return None


def _number(kind: str, text: str) -> int | float:
    return int(text) if kind == "int" else float(text)


class Sampler:
    """Measures this machine; CPU and network figures cover the time since the previous sample."""

    def __init__(self, path: str) -> None:
        self.path = path
        psutil.cpu_percent(interval=None)
        self._net = _net_totals()
        self._at = time.monotonic()

    def sample(self, downloaders: int) -> HostSample:
        """Measure now; raise OSError when the watched path cannot be measured."""
        usage = disk.measure(self.path)
        received, sent = _net_totals()
        now = time.monotonic()
        elapsed = max(now - self._at, 1e-3)
        net_in, net_out = (max(0, received - self._net[0]) / elapsed, max(0, sent - self._net[1]) / elapsed)
        self._net, self._at = (received, sent), now
        return HostSample(
            used_gb=usage.used_gb,
            free_gb=usage.free_gb,
            total_gb=usage.total_gb,
            percent=usage.percent,
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_percent=psutil.virtual_memory().percent,
            net_in_bps=net_in,
            net_out_bps=net_out,
            downloaders=downloaders,
            ts=time.time(),
        )


def _net_totals() -> tuple[int, int]:
    """Bytes received and sent by every network interface but the loopback ones."""
    counters = psutil.net_io_counters(pernic=True)
    outside = [value for name, value in counters.items() if not name.startswith("lo")]
    return sum(value.bytes_recv for value in outside), sum(value.bytes_sent for value in outside)


def live_downloaders(client: redis.Redis, keys: Keys, host_id: str) -> int:
    """Downloader processes of ``host_id`` whose heartbeat is alive: the workers the queue counts as running."""
    workers = sorted(client.smembers(keys.workers))
    if not workers:
        return 0
    tokens = client.mget([keys.heartbeat(worker) for worker in workers])
    owners = [Owner.parse(token) for token in tokens if token]
    return sum(1 for owner in owners if owner is not None and owner.host == host_id)


@dataclass
class Monitor:
    """Publishes this machine's samples: the used GB in ``tongji_disk`` and the richer host record."""

    client: redis.Redis
    keys: Keys
    host_id: str
    sampler: Sampler
    interval: float
    after_publish: Callable[[HostSample], None] | None = None
    """Called with each sample once it is published (monitor_disk.py writes the history there)."""

    def publish_once(self) -> HostSample:
        """Take one sample and publish it in one transaction; Redis and OS errors are raised."""
        sample = self.sampler.sample(live_downloaders(self.client, self.keys, self.host_id))
        record = self.keys.host_record(self.host_id)
        pipe = self.client.pipeline(transaction=True)
        disk.publish_used(pipe, self.keys, self.host_id, sample.used_gb)
        pipe.hset(record, mapping=sample.fields())
        pipe.expire(record, int(RECORD_TTL_INTERVALS * self.interval))
        pipe.execute()
        log.info(
            "disk_published host=%s used_gb=%d free_gb=%.1f cpu=%.0f%% mem=%.0f%% downloaders=%d",
            self.host_id,
            int(sample.used_gb),
            sample.free_gb,
            sample.cpu_percent,
            sample.memory_percent,
            sample.downloaders,
        )
        if self.after_publish is not None:
            self.after_publish(sample)
        return sample

    def run(self, stop: threading.Event) -> None:
        """Publish a sample every ``interval`` seconds until ``stop`` is set, riding out Redis outages."""
        stop.wait(WARM_UP)
        while not stop.is_set():
            try:
                retrying(self.publish_once, "publish_disk", stop)
            except OSError as error:
                log.error("disk_unmeasurable path=%s error=%s", self.sampler.path, error)
            except RETRYABLE:
                return  # retrying gives up only once stop is set
            stop.wait(self.interval)
