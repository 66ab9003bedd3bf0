"""The snapshot as Prometheus metrics (text format through prometheus_client): counters for what only grows, gauges
for the rest."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from laion5b import control
from laion5b.stats import Snapshot
from laion5b.storehealth import STORE_FAILING, STORE_STALLED
from laion5b.uploads import UPLOAD_FAILING


def families(snapshot: Snapshot) -> Iterator[Metric]:
    """Every metric of one snapshot."""
    for name, value, help_text in (
        ("added", snapshot.added, "Tasks added to the queue (or rejected as bad rows) by add_task.py."),
        ("succeeded", snapshot.succeeded, "Tasks that ended as a stored image."),
        ("bytes", snapshot.bytes, "Bytes of stored images."),
        ("requeued", snapshot.requeued, "Error records put back on the queue by save_error_task.py requeue."),
    ):
        yield CounterMetricFamily(f"laion5b_{name}", help_text, value=value)
    for name, value, help_text in (
        ("failed", snapshot.failed, "Tasks that ended as an error record (a requeue lowers it)."),
        ("queued", snapshot.queued, "Tasks waiting in the queue."),
        ("delayed", snapshot.delayed, "Tasks waiting for a retry."),
        ("in_flight", snapshot.in_flight, "Tasks held by workers."),
        ("in_shards", snapshot.in_shards, "Samples in unfinished webdataset shards, not counted as succeeded yet."),
        ("error_queue", snapshot.error_queue, "Error records waiting for save_error_task.py."),
        ("expected", snapshot.total or 0, "Rows add_task.py expects to have added once every known file is queued."),
    ):
        yield GaugeMetricFamily(f"laion5b_{name}", help_text, value=value)
    yield from _host_families(snapshot)
    failures = GaugeMetricFamily("laion5b_failures", "Tasks failed, by status (requeue lowers it).", labels=["status"])
    for status, count in snapshot.failures.items():
        failures.add_metric([status], count)
    yield failures
    yield from _control_families(snapshot)
    yield from _throttled_families(snapshot)


def _throttled_families(snapshot: Snapshot) -> Iterator[Metric]:
    """The most throttled web hosts (at most 20): their 429/503s, fleet-wide limit and pause."""
    label = ["web_host"]
    throttles = GaugeMetricFamily(
        "laion5b_web_host_throttles", "429/503 answers and timeout bursts of a most throttled web host.", labels=label
    )
    limit = GaugeMetricFamily(
        "laion5b_web_host_limit", "Downloads the whole fleet may have in progress to that web host now.", labels=label
    )
    paused = GaugeMetricFamily(
        "laion5b_web_host_paused_seconds", "Seconds its Retry-After pause still lasts for the fleet.", labels=label
    )
    for host in snapshot.throttled:
        throttles.add_metric([host.host], host.throttles)
        limit.add_metric([host.host], host.limit)
        paused.add_metric([host.host], host.paused)
    yield throttles
    yield limit
    yield paused


def _host_families(snapshot: Snapshot) -> Iterator[Metric]:
    succeeded = CounterMetricFamily("laion5b_host_succeeded", "Images stored by a host.", labels=["host"])
    stored = CounterMetricFamily("laion5b_host_bytes", "Bytes of images stored by a host.", labels=["host"])
    gauges = {
        "failed": GaugeMetricFamily("laion5b_host_failed", "Tasks failed on a host.", labels=["host"]),
        "in_flight": GaugeMetricFamily("laion5b_host_in_flight", "Tasks held by a host's workers.", labels=["host"]),
        "in_shards": GaugeMetricFamily(
            "laion5b_host_in_shards", "Samples in a host's unfinished webdataset shards.", labels=["host"]
        ),
        "workers": GaugeMetricFamily("laion5b_host_workers", "Live downloader processes of a host.", labels=["host"]),
        "used": GaugeMetricFamily("laion5b_host_disk_used_gb", "GB used on a host's download disk.", labels=["host"]),
        "free": GaugeMetricFamily("laion5b_host_disk_free_gb", "GB free on a host's download disk.", labels=["host"]),
    }
    for host in snapshot.hosts:
        label = [host.host]
        succeeded.add_metric(label, host.succeeded)
        stored.add_metric(label, host.bytes)
        gauges["failed"].add_metric(label, host.failed)
        gauges["in_flight"].add_metric(label, host.in_flight)
        gauges["in_shards"].add_metric(label, host.in_shards)
        gauges["workers"].add_metric(label, host.live_workers)
        if host.used_gb is not None:
            gauges["used"].add_metric(label, host.used_gb)
        if host.free_gb is not None:
            gauges["free"].add_metric(label, host.free_gb)
    yield succeeded
    yield stored
    yield from gauges.values()
    yield from _store_families(snapshot)


def _store_families(snapshot: Snapshot) -> Iterator[Metric]:
    """1 for each host whose store fails (with the errno) or does not answer, as its live workers report."""
    failing = GaugeMetricFamily("laion5b_host_store_failing", "1 while a host's store refuses writes (ENOSPC, EDQUOT, "
                                "EROFS, EIO): its workers pause and probe it.", labels=["host", "errno"])  # fmt: skip
    stalled = GaugeMetricFamily(
        "laion5b_host_store_stalled",
        "1 while a write to a host's store has not returned for store_stall_seconds.",
        labels=["host"],
    )
    uploads = GaugeMetricFamily("laion5b_host_upload_failing", "1 while uploads of a host's shards to object storage "
                                "fail (the store's error: SlowDown, AccessDenied, 500, a network error); they are "
                                "tried again.", labels=["host", "error"])  # fmt: skip
    for host in snapshot.hosts:
        if host.state == STORE_FAILING:
            failing.add_metric([host.host, host.store_errno or ""], 1)
        elif host.state == STORE_STALLED:
            stalled.add_metric([host.host], 1)
        elif host.state == UPLOAD_FAILING:
            uploads.add_metric([host.host, host.store_errno or ""], 1)
    yield failing
    yield stalled
    yield uploads


def _control_families(snapshot: Snapshot) -> Iterator[Metric]:
    paused = GaugeMetricFamily(
        "laion5b_paused", "1 while a pause is asked for the scope (run, host <h>, worker <id>).", labels=["scope"]
    )
    paused.add_metric(["run"], 1 if control.PAUSE in snapshot.control else 0)
    for name in sorted(snapshot.control):
        if name.startswith(f"{control.PAUSE}:"):
            paused.add_metric([control.scope(name)], 1)
    yield paused
    acks = GaugeMetricFamily("laion5b_workers_acknowledged", "Workers by the control state they acknowledged.",
                             labels=["state"])  # fmt: skip
    for state, count in sorted(Counter(snapshot.acks.values()).items()):
        acks.add_metric([state], count)
    yield acks


class _Collector:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return families(self.snapshot)


def exposition(snapshot: Snapshot) -> bytes:
    """The Prometheus text format of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshot))
    return generate_latest(registry)
