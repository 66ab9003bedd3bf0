"""Disk usage of the download disk, measured here or read from what monitor_disk.py published."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import redis

from laion5b.keys import Keys

GB = 1024**3


@dataclass(frozen=True)
class DiskUsage:
    used_gb: float
    free_gb: float
    total_gb: float
    free_inodes_ratio: float

    @property
    def percent(self) -> float:
        return 100.0 * self.used_gb / self.total_gb if self.total_gb else 0.0


def measure(path: str) -> DiskUsage:
    """Usage of the filesystem holding ``path``; raise FileNotFoundError when it does not exist."""
    stats = os.statvfs(path)
    total = stats.f_blocks * stats.f_frsize
    free = stats.f_bavail * stats.f_frsize
    used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
    inodes = stats.f_favail / stats.f_files if stats.f_files else 1.0
    return DiskUsage(used / GB, free / GB, total / GB, inodes)


def publish_used(client: redis.Redis, keys: Keys, host_id: str, used_gb: float) -> None:
    """Write the used GB (an integer, as the original suite did) and its timestamp to ``tongji_disk``."""
    client.hset(
        keys.tongji_disk,
        mapping={host_id: int(used_gb), keys.disk_timestamp_field(host_id): f"{time.time():.3f}"},
    )


def published_used(client: redis.Redis, keys: Keys, host_id: str, max_age: float) -> float | None:
    """The used GB monitor_disk.py published for ``host_id``, or None when missing or older than ``max_age``."""
    used, stamp = client.hmget(keys.tongji_disk, [host_id, keys.disk_timestamp_field(host_id)])
    try:
        if used is None or stamp is None or time.time() - float(stamp) > max_age:
            return None
        return float(used)
    except ValueError:
        return None


@dataclass
class DiskGuard:
    """Decides whether this machine's workers must stop taking tasks because its disk is (nearly) full."""

    client: redis.Redis
    keys: Keys
    host_id: str
    path: str
    stop_threshold_gb: float
    min_free_gb: float
    monitor_interval: float

    def full_reason(self) -> str | None:
        """Why taking tasks must pause now, or None."""
        local = measure(self.path)
        used = published_used(self.client, self.keys, self.host_id, 2 * self.monitor_interval)
        used = local.used_gb if used is None else used
        if used > self.stop_threshold_gb:
            return f"used {used:.0f} GB > stop_threshold {self.stop_threshold_gb:g} GB"
        if local.free_gb < self.min_free_gb:
            return f"free {local.free_gb:.1f} GB < min_free_gb {self.min_free_gb:g} GB"
        if local.free_inodes_ratio < 0.01:
            return f"free inodes {100 * local.free_inodes_ratio:.2f}% < 1%"
        return None
