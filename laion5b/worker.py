"""One downloader process: a main thread that talks to Redis in batches, and a download engine (threads or async)."""

from __future__ import annotations

import functools
import ipaddress
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis

from laion5b.aiofetch import MAX_IDLE_CONNECTIONS
from laion5b.asyncengine import AsyncEngine
from laion5b.bucketstore import BucketStore
from laion5b.config import Config
from laion5b.control import DRAINED, DRAINING, PAUSED, PAUSING, RUNNING, WorkerControl
from laion5b.disk import DiskGuard
from laion5b.dnscache import SPARE_THREADS, BlockingLookups, CachedResolver, DnsCache
from laion5b.fetchpolicy import FetchPolicy, tls_context, user_agent_of
from laion5b.fleetslots import FleetSlots
from laion5b.guard import IDLE_PER_THREAD, Resolver, system_resolver
from laion5b.hostledger import HostLedger
from laion5b.imaging import process_policy
from laion5b.leases import FAILED, KEPT, RETRY, RETURN, STORED, IdentityLost, Leases
from laion5b.limits import raise_open_files_limit
from laion5b.objectstore import bucket_of
from laion5b.pipeline import Outcome, Parked, Pipeline, Sink
from laion5b.redisconn import retrying
from laion5b.robots import async_robots_gate, robots_gate
from laion5b.shards import RECOVERY_LOCK_SECONDS, Shard, ShardSink, count_own_prepared, recover
from laion5b.sidecars import Sidecars
from laion5b.store import Store
from laion5b.storehealth import STORE_STALLED, WRITTEN_STANDS, StoreProblem
from laion5b.threadengine import ThreadEngine
from laion5b.uploads import STORE_ERRORS, describe

log = logging.getLogger(__name__)

FLUSH_AFTER = 0.2
CLAIM_RETRY = 0.2
TICK = 0.01
IDLE_POLL = 0.5
DRAIN_POLL = 0.1
DISK_CHECK_EVERY = 10.0
DISK_RECHECK_MAX = 30.0
SUMMARY_EVERY = 30.0
CONTROL_EVERY = 1.0
"""Seconds between two reads of the control state (pause, drain)."""
THREADS_KNEE = 128
"""Past this many threads the threads engine gains nothing on web-like traffic (bench/RESULTS.md): use async."""

STORE_CHECK_EVERY = 0.25
"""Seconds between two looks at the store's health (writes that hang, probes of a failing store)."""

SHARD_WAIT = 0.05
"""Seconds a stopping worker waits at a time for its last shards to be sealed."""
EXIT_SECONDS = 50.0
"""Longest a stopping worker takes, under the systemd unit's TimeoutStopSec (60 s): what is not done by then (a
download, a shard, a write that hangs) is given up, its tasks go back to the queue with the leases."""
ENGINE_STOP_SECONDS = 30.0
"""Longest a stopping worker waits for its downloads in flight (download_timeout + 5 s when that is shorter)."""
EXIT_RESERVE = 5.0
"""Seconds of EXIT_SECONDS kept for the last steps: recording outcomes, retiring, removing the temporary folder."""
CLOSE_STALLED_SECONDS = 1.0
"""Seconds given to removing the temporary folder on a store that does not answer (the next worker removes it)."""
UPLOADS_WAITING_MAX = 2
"""Object storage: shards waiting for their upload past which the worker stops claiming (uploads slower than
downloads, or a store that refuses): its staging area holds at most its open shards + this many."""

Engine = ThreadEngine | AsyncEngine


class StoreRefused(RuntimeError):
    """The object store refuses this worker's writes at start (credentials, permissions, bucket, endpoint)."""


def make_sink(config: Config, name: str, identity: str, incarnation: str) -> Sink:
    """Where this worker stores images, as ``config.output_format`` says (shards named with the incarnation)."""
    if config.output_format == "webdataset":
        size, seconds, bucket = config.shard_size, config.shard_max_seconds, bucket_of(config)
        if bucket is not None:
            return ShardSink(config.store_dir, config.host_id, name, identity, size, seconds, incarnation,
                             Path(config.staging_dir), bucket)  # fmt: skip
        return ShardSink(Path(config.store_dir), config.host_id, name, identity, size, seconds, incarnation)
    sidecars = Sidecars(config.save_caption, config.save_metadata, config.host_id, identity)
    bucket = bucket_of(config)
    if bucket is not None:
        return BucketStore(bucket, config.store_dir, Path(config.staging_dir), config.host_id, name, sidecars)
    return Store(Path(config.store_dir), config.host_id, name, config.fsync_images, sidecars)


def fetch_policy(config: Config, resolver: Resolver | None = None) -> FetchPolicy:
    """The fetch limits that the settings ask for."""
    return FetchPolicy(
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        download_timeout=config.download_timeout,
        max_bytes=config.max_image_bytes,
        max_redirects=config.max_redirects,
        user_agent=config.user_agent or user_agent_of(config.user_agent_contact),
        disallowed_directives=frozenset(config.disallowed_header_directives),
        honour_tdm_reservation=config.honour_tdm_reservation,
        allowed_networks=tuple(ipaddress.ip_network(n, strict=False) for n in config.allowed_networks),
        resolver=resolver,
        dns_timeout=config.dns_timeout,
        tls_ca_file=config.tls_ca_file,
    )


def make_engine(
    config: Config,
    pipeline: Pipeline,
    done: queue.SimpleQueue[Outcome],
    resolver: Resolver | None,
    slots: FleetSlots[Parked],
    ips: FleetSlots[Parked] | None = None,
) -> Engine:
    """The download engine that ``config.engine`` names, with the process's TLS context, DNS cache, host slots and
    server address slots (max_per_ip)."""
    cache = DnsCache(config.dns_cache_ttl) if config.dns_cache_ttl > 0 else None
    tls = tls_context(config.tls_ca_file)
    if config.engine == "async":
        policy = fetch_policy(config, resolver)
        return AsyncEngine(
            pipeline,
            policy,
            config.concurrency,
            done,
            slots,
            config.max_inflight_bytes,
            tls,
            cache,
            config.engine_loop,
            async_robots_gate(config),
            ips,
        )
    resolver = BlockingLookups(resolver or system_resolver, config.dns_timeout, config.thread_num + SPARE_THREADS)
    if cache is not None:
        resolver = CachedResolver(resolver, cache)
    policy = fetch_policy(config, resolver)
    return ThreadEngine(
        pipeline, policy, config.thread_num, done, slots, config.max_inflight_bytes, tls, robots_gate(config), ips
    )


def postponer(pipeline: Pipeline, done: queue.SimpleQueue[Outcome]):
    """How parked tasks are postponed (their host paused, or busy too long): an outcome on ``done``."""

    def postpone(parked: Parked, delay: float, reason: str) -> None:
        raw, task = parked
        done.put(pipeline.postpone(task, raw, delay, reason))

    return postpone


@dataclass
class Tally:
    """What this process did since it started, for its summary log lines."""

    stored: int = 0
    failed: int = 0
    retried: int = 0
    returned: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, outcome: Outcome) -> None:
        kind, _, payload = outcome
        if kind == STORED:
            self.stored += 1
            self.bytes += int(payload)
        elif kind == FAILED:
            self.failed += 1
        elif kind == RETRY:
            self.retried += 1
        elif kind == RETURN:
            self.returned += 1


class Worker:
    """Takes tasks from Redis, has its engine download and store them, records every outcome."""

    def __init__(
        self,
        client: redis.Redis,
        config: Config,
        name: str,
        stop: threading.Event,
        until_empty: bool = False,
        resolver: Resolver | None = None,
    ) -> None:
        self.client = client
        self.config = config
        self.keys = config.keys
        self.identity = f"{config.host_id}:{name}"
        self.stop = stop
        self.until_empty = until_empty
        self.leases = Leases(
            client, config.keys, config.host_id, self.identity, config.heartbeat_ttl, config.redis_min_replicas
        )
        self.sink = make_sink(config, name, self.identity, self.leases.incarnation)
        self.shards = self.sink if isinstance(self.sink, ShardSink) else None
        self.guard = DiskGuard(
            client,
            config.keys,
            config.host_id,
            config.monitor_disk,
            config.stop_threshold,
            config.min_free_gb,
            config.monitor_interval,
        )
        self.pipeline = Pipeline(
            self.sink,
            self.identity,
            config.max_attempts,
            config.retry_backoff,
            config.max_retry_after,
            process_policy(config),
        )
        self.done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        in_flight = config.concurrency if config.engine == "async" else config.thread_num
        postpone = postponer(self.pipeline, self.done)
        self.slots: FleetSlots[Parked] = FleetSlots(config.max_per_host, postpone, in_flight, config.max_retry_after)
        self.ledger = HostLedger(
            client, config.keys, self.identity, config.host_start_concurrency, config.max_per_host, config.heartbeat_ttl
        )
        self.ip_slots: FleetSlots[Parked] = FleetSlots(config.max_per_ip, postpone, in_flight)
        self.ip_ledger = HostLedger(
            client, config.keys, self.identity, config.max_per_ip, config.max_per_ip, config.heartbeat_ttl, kind="ip"
        )
        self.fleets = [(self.slots, self.ledger), (self.ip_slots, self.ip_ledger)]
        """Each kind of fleet-wide slots with its ledger; a kind whose limit is 0 costs nothing."""
        self.engine: Engine = make_engine(config, self.pipeline, self.done, resolver, self.slots, self.ip_slots)
        self.held: Counter[str] = Counter()
        self.held_count = 0
        self.kept: Counter[str] = Counter()
        """Shard -> its samples' outcomes (kind KEPT) recorded in Redis: a shard is finished once all of them are."""
        self.sealed: list[Shard] = []
        self.pending: list[Outcome] = []
        self.pending_since = 0.0
        self.pause_reason: str | None = None
        self.store_problem: StoreProblem | None = None
        self.unsealed: list[Shard] = []
        """Shards whose sealing the store refused (full, read-only): sealed again once it is healthy."""
        self.tally = Tally()
        self.round_trips = 0
        self.heartbeat_gap_max = 0.0
        self._last_heartbeat: float | None = None
        self._next: dict[str, float] = {}
        self._next_claim = 0.0
        self.control = WorkerControl(client, config.keys, config.host_id, self.identity)
        self.paused = False
        self.draining = False
        self.fenced = False
        """Another incarnation took the identity over: this process stops without touching Redis or the store."""

    # --- life cycle ---

    def run(self) -> None:
        """Work until stopped (or, with ``until_empty``, until no task remains anywhere)."""
        config = self.config
        in_flight = config.concurrency if config.engine == "async" else config.thread_num
        idle = MAX_IDLE_CONNECTIONS if config.engine == "async" else IDLE_PER_THREAD * config.thread_num
        open_files = raise_open_files_limit(in_flight, idle)
        if config.engine == "threads" and config.thread_num > THREADS_KNEE:
            log.warning("threads_past_knee worker=%s threads=%d knee=%d: use engine=async (LAION_ENGINE=async) for "
                        "this many downloads in flight", self.identity, config.thread_num, THREADS_KNEE)  # fmt: skip
        self._check_bucket()
        returned = self._redis(self.leases.register, "register")
        loop = self.engine.loop_name if isinstance(self.engine, AsyncEngine) else "-"
        log.info("worker_start worker=%s engine=%s loop=%s in_flight=%d open_files=%d returned_from_predecessor=%d",
                 self.identity, config.engine, loop, in_flight, open_files, returned)  # fmt: skip
        if self.shards is not None:
            bucket = self.shards.bucket
            recovered = self._redis(lambda: recover(self.leases, config.host_id, 2 * RECOVERY_LOCK_SECONDS, bucket),
                                    "shard")  # fmt: skip
            log.info("shards_recovered worker=%s shards=%d", self.identity, recovered)
        self._redis(lambda: self.sink.open(self.leases.claimed_folders), "temp_folders")
        for slots, ledger in self.fleets:
            if slots.limit:
                self._redis(ledger.drop, "host_slots")  # a predecessor's, should it have died holding some
        self.engine.start()
        try:
            self._main_loop()
        except IdentityLost:
            self.fenced = True
            raise
        finally:
            self._shut_down()

    def _check_bucket(self) -> None:
        """Raise StoreRefused when an s3:// store_dir refuses a small write (and its delete) now."""
        bucket = self.sink.bucket if isinstance(self.sink, ShardSink | BucketStore) else None
        if bucket is None:
            return
        try:
            bucket.check_writable(self.config.host_id)
        except STORE_ERRORS as error:
            raise StoreRefused(
                f"store_dir (LAION_STORE_DIR) {self.config.store_dir} refuses writes: {describe(error)} (credentials: "
                f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws or the instance role; endpoint: s3_endpoint_url "
                f"{self.config.s3_endpoint_url or '(AWS)'}, s3_region {self.config.s3_region or '(default)'})"
            ) from None

    def _main_loop(self) -> None:
        capacity = self.engine.capacity
        idle = DRAIN_POLL if self.until_empty else IDLE_POLL
        while not self.stop.is_set():
            now = time.monotonic()
            self._periodic(now)
            self._sync_hosts(now)
            if self.shards is not None:
                self._finish_shards()
            # Tasks not yet finished: in flight, or waiting in the engine. Keep 2 x its capacity of them, topping up
            # once half a capacity is missing, so downloads never wait on Redis; outcomes ride along in the same call.
            room = 2 * capacity - (self.held_count - len(self.pending)) if self._may_claim() else 0
            want = room >= max(1, capacity // 2) and now >= self._next_claim
            flush = bool(self.pending) and (
                len(self.pending) >= capacity
                or now - self.pending_since >= FLUSH_AFTER
                or len(self.pending) == self.held_count
            )
            claimed = 0
            if want or flush:
                claimed = self._exchange(room)
                if claimed < room:  # the queue ran dry: ask again later, not at every tick
                    self._next_claim = now + CLAIM_RETRY
            if self.shards is not None and self.held_count == 0 and (not self._may_claim() or claimed == 0):
                self.shards.seal_all()  # nothing in flight, nothing more coming for now: do not hold the tasks
            if self.draining and self._drained():
                return
            if self.until_empty and claimed == 0 and self._holding() == 0 and self._nothing_left():
                log.info("queue_drained worker=%s", self.identity)
                return
            self._collect(idle if self.held_count == 0 else TICK)

    def _shut_down(self) -> None:
        """Stop within EXIT_SECONDS: downloads in flight and the last shards get what time the store allows."""
        deadline = time.monotonic() + EXIT_SECONDS
        stalled = self._store_stalled()
        wait = 0.0 if stalled else min(self.config.download_timeout + 5, ENGINE_STOP_SECONDS)
        for raw in self.engine.stop(wait):
            self.done.put((RETURN, raw, ""))
        if self.fenced:
            self._abandon()
            return
        self._collect(0)
        try:
            if self.shards is not None:
                self._finish_last_shards(deadline - EXIT_RESERVE)
            if self.pending:
                self._record()
            for slots, ledger in self.fleets:
                if slots.limit:
                    self._redis(ledger.drop, "retire")
            returned = self._redis(self.leases.retire, "retire")
            self._acknowledge_exit()
        except IdentityLost:
            self.fenced = True
            self._abandon()
            raise
        except redis.RedisError as error:
            log.error("shutdown_incomplete worker=%s error=%s: leases return after heartbeat_ttl", self.identity,
                      error)  # fmt: skip
            returned = -1
        self._close_sink(CLOSE_STALLED_SECONDS if self._store_stalled() else max(0.0, deadline - time.monotonic()))
        log.info(
            "worker_exit worker=%s stored=%d failed=%d retried=%d returned=%d round_trips=%d heartbeat_gap_max=%.2f",
            self.identity,
            self.tally.stored,
            self.tally.failed,
            self.tally.retried,
            returned,
            self.round_trips,
            self.heartbeat_gap_max,
        )

    def _abandon(self) -> None:
        """Stop as a stale incarnation: the outcomes and shards this process holds are dropped, nothing is written to
        Redis; the process that owns the identity now, and the reaper, answer for the tasks."""
        log.error("worker_fenced worker=%s outcomes_dropped=%d shards_dropped=%d: another process owns this identity",
                  self.identity, self.done.qsize() + len(self.pending), self._holding() - self.held_count)  # fmt: skip
        if self.shards is not None:
            self.shards.abandon()
        else:
            self.sink.close()

    # --- Redis side (main thread only) ---

    def _redis(self, call, what: str):
        self.round_trips += 1
        return retrying(call, what, self.stop if what not in ("retire", "finish", "shard") else None)

    def _exchange(self, count: int) -> int:
        """Record the pending outcomes and claim up to ``count`` tasks in one round trip; return how many came.

        Sent again (a lost reply, replicas that did not confirm the write), the call claims nothing: what the first
        one claimed is returned as strays, and replicas that stay behind do not drain the queue into the lease list.
        """
        batch, self.pending = self.pending, []
        counts = iter((count,))
        what = "finish" if batch else "claim"
        applied, tasks = self._redis(lambda: self.leases.exchange(batch, next(counts, 0)), what)
        self._heartbeat_sent(time.monotonic())
        self._settle(batch, applied)
        for raw in tasks:
            self.held[raw] += 1
        self.engine.submit(tasks)
        self.held_count += len(tasks)
        return len(tasks)

    def _sync_hosts(self, now: float) -> None:
        """Tell the fleet's ledgers what changed for this worker's web hosts and server addresses; hand out the slots
        they grant."""
        for slots, ledger in self.fleets:
            if slots.due(now):
                reports = slots.reports(now)
                grants = self._redis(functools.partial(ledger.sync, reports), "host_slots") if reports else []
                slots.apply(reports, grants, time.monotonic())

    def _collect(self, wait: float) -> None:
        """Wait ``wait`` seconds (less when stopped), then move every finished outcome into the pending batch.

        The main thread wakes on a clock, not on each outcome: under 32 busy threads each wake costs a turn of
        the GIL, and one wake per TICK collects every outcome that arrived meanwhile.
        """
        if wait > 0:
            self.stop.wait(wait)
        try:
            outcome = self.done.get_nowait()
        except queue.Empty:
            return
        if not self.pending:
            self.pending_since = time.monotonic()
        while True:
            self.pending.append(outcome)
            try:
                outcome = self.done.get_nowait()
            except queue.Empty:
                return

    def _record(self) -> None:
        self._exchange(0)

    def _settle(self, batch: list[Outcome], applied: int) -> None:
        for outcome in batch:
            kind, raw, payload = outcome
            if kind == KEPT:
                self.kept[str(payload)] += 1
            self.held[raw] -= 1
            if self.held[raw] <= 0:
                del self.held[raw]
            self.tally.add(outcome)
        self.held_count -= len(batch)
        if applied < len(batch):
            log.warning("lease_lost worker=%s outcomes=%d applied=%d: another worker recovered these tasks",
                        self.identity, len(batch), applied)  # fmt: skip

    def _periodic(self, now: float) -> None:
        ttl = self.config.heartbeat_ttl
        if self._due("heartbeat", now, ttl / 3):
            self._redis(self.leases.heartbeat, "heartbeat")
            self._heartbeat_sent(time.monotonic())
        if self._due("host_reap", now, ttl / 6):
            for slots, ledger in self.fleets:
                dropped, _ = self._redis(ledger.reap, "host_reap") if slots.limit else (0, 0)
                if dropped > 0:
                    log.info("host_slots_recovered worker=%s kind=%s slots=%d", self.identity, ledger.kind, dropped)
        if self._due("reap", now, ttl / 2):
            self._return_strays()
            self._reap()
            if self.shards is not None:
                self._redis(lambda: recover(self.leases, self.config.host_id, bucket=self.shards.bucket), "shard")
        if self._due("store", now, STORE_CHECK_EVERY):
            self._check_store(now)
        if now >= self._next.get("disk", 0.0):
            self._check_disk()
            paused_recheck = min(DISK_RECHECK_MAX, self.config.monitor_interval)
            self._next["disk"] = now + (paused_recheck if self.pause_reason else DISK_CHECK_EVERY)
        if self._due("control", now, CONTROL_EVERY):
            self._follow_control()
        if self._due("summary", now, SUMMARY_EVERY):
            elapsed = max(now - self.tally.started, 1e-9)
            log.info(
                "summary worker=%s rate=%.1f/s stored=%d failed=%d retried=%d held=%d in_open_shards=%d "
                "waiting_for_host=%d paused=%s round_trips=%d heartbeat_gap_max=%.2f",
                self.identity,
                (self.tally.stored + self.tally.failed) / elapsed,
                self.tally.stored,
                self.tally.failed,
                self.tally.retried,
                self.held_count,
                self.shards.open_samples if self.shards is not None else 0,
                self.engine.slots.waiting(),
                self.pause_reason is not None,
                self.round_trips,
                self.heartbeat_gap_max,
            )

    # --- webdataset shards ---

    def _holding(self) -> int:
        """Tasks this worker still answers for: leased, or in a shard not finished yet."""
        return self.held_count + (self.shards.unfinished if self.shards is not None else 0)

    def _finish_shards(self) -> None:
        """Seal shards open too long; finish (or discard) each sealed one whose samples' outcomes are all in Redis."""
        assert self.shards is not None
        self.shards.seal_old(time.monotonic())
        while True:
            try:
                self._sealed(self.shards.ready.get_nowait())
            except queue.Empty:
                break
        if self._store_stalled():  # renaming on a store that does not answer would hang this thread too
            return
        for shard in list(self.sealed):
            if self.kept[shard.id] < shard.samples:
                if not self.pending:
                    continue
                self._record()
                if self.kept[shard.id] < shard.samples:
                    continue
            self.sealed.remove(shard)
            del self.kept[shard.id]
            counted = self.shards.finish(shard, self.leases, lambda call: self._redis(call, "shard"))
            self._tally_shard(shard, counted)
        while self.shards.uploader is not None:
            ended = self.shards.commit_uploaded(self.leases, lambda call: self._redis(call, "shard"))
            if ended is None:
                break
            self._tally_shard(*ended)

    def _tally_shard(self, shard: Shard, counted: int) -> None:
        if counted > 0:
            self.tally.stored += counted
            self.tally.bytes += shard.bytes

    def _sealed(self, shard: Shard) -> None:
        """Take a shard from the sealer: to be finished, or kept aside when the store refused to seal it."""
        error = shard.error
        refused = isinstance(error, OSError) and self.sink.health.failed(error, shard.paths()["temp_tar"])
        if refused and error.errno in WRITTEN_STANDS:
            log.warning("shard_seal_deferred shard=%s samples=%d error=%s", shard.id, shard.samples, error)
            self.unsealed.append(shard)
        else:
            self.sealed.append(shard)

    def _reseal(self) -> None:
        assert self.shards is not None
        for shard in self.unsealed:
            self.shards.reseal(shard)
        self.unsealed.clear()

    def _finish_last_shards(self, deadline: float) -> None:
        """At exit: seal every shard and finish it before the tasks are given up. New puts are refused first (their
        tasks are returned). A shard not finished by ``deadline``, or while the store does not answer, or after an
        error, is left: its kept tasks go back to the queue with the leases."""
        assert self.shards is not None
        self.shards.closing = True
        try:
            if not self.sink.health.blocked:
                self._reseal()
            while self.shards.unfinished > len(self.unsealed) and time.monotonic() < deadline:
                if self._store_check_stalled():
                    break
                self.shards.seal_all()  # also a shard a put opened just before puts were refused
                self._collect(0)
                self._finish_shards()
                time.sleep(SHARD_WAIT)
        except IdentityLost:
            raise
        except Exception:
            log.exception("shards_unfinished worker=%s", self.identity)
        if self.shards.unfinished:
            log.error("shards_unfinished worker=%s shards=%d: their tasks are queued again", self.identity,
                      self.shards.unfinished)  # fmt: skip

    # --- remote control (control.py) ---

    def _may_claim(self) -> bool:
        return (self.pause_reason is None and self.store_problem is None and not self.paused and not self.draining
                and not self._uploads_behind())  # fmt: skip

    def _uploads_behind(self) -> bool:
        """Object storage: too many shards wait for their upload (the store is slow or refuses)."""
        return self.shards is not None and self.shards.uploads_waiting() >= UPLOADS_WAITING_MAX

    def _upload_problem(self) -> StoreProblem | None:
        uploader = self.shards.uploader if self.shards is not None else None
        return uploader.problem if uploader is not None else None

    def _drained(self) -> bool:
        """Whether a draining worker may exit: it holds nothing, or only what the store keeps (the writes of a
        stalled store, the unsealed shards of a failing one), which goes back to the queue at exit."""
        if self._store_stalled():
            return True
        if self.store_problem is not None:
            return self.held_count == 0
        return self._holding() == 0

    def _follow_control(self) -> None:
        """Read the control state; on a new pause or drain, return the tasks not started yet; acknowledge."""
        asked = self._redis(self.control.read, "control")
        if asked.drain and not self.draining:
            log.info("drain_asked worker=%s held=%d", self.identity, self.held_count)
            self.draining = True
            self._return_unstarted()
        elif asked.paused != self.paused:
            log.info("%s worker=%s held=%d", "pause_asked" if asked.paused else "resume_asked", self.identity,
                     self.held_count)  # fmt: skip
            self.paused = asked.paused
            if self.paused:
                self._return_unstarted()
        problem = self.store_problem or self._upload_problem()
        if self.draining:
            state = DRAINING
        elif problem is not None:
            state = problem.state
        elif self.paused:
            state = PAUSED if self._holding() == 0 else PAUSING
        else:
            state = RUNNING
        detail = problem.to_json() if problem is not None else None
        self._redis(lambda: self.control.ack(state, detail), "control")

    def _return_unstarted(self) -> None:
        for raw in self.engine.drain_unstarted():
            self.done.put((RETURN, raw, ""))

    def _acknowledge_exit(self) -> None:
        """A drained worker says so; any other leaves no acknowledgement behind."""
        self._redis(lambda: self.control.ack(DRAINED) if self.draining else self.control.forget(), "control")

    def _heartbeat_sent(self, now: float) -> None:
        """Keep the longest time between two heartbeats (every exchange keeps the heartbeat alive too)."""
        if self._last_heartbeat is not None:
            self.heartbeat_gap_max = max(self.heartbeat_gap_max, now - self._last_heartbeat)
        self._last_heartbeat = now

    def _due(self, what: str, now: float, every: float) -> bool:
        if now < self._next.get(what, 0.0):
            return False
        self._next[what] = now + every
        return True

    def _return_strays(self) -> None:
        strays = self._redis(lambda: self.leases.strays(self.held.elements()), "strays")
        if strays:
            returned = self._redis(lambda: self.leases.finish([(RETURN, raw, "") for raw in strays]), "finish")
            log.warning("strays_returned worker=%s tasks=%d", self.identity, returned)
        if self.shards is None:
            return
        for shard in self._redis(lambda: self.leases.stray_shards(self.kept), "strays"):
            returned = self._redis(lambda shard=shard: self.leases.release_kept(shard), "shard")
            log.warning("stray_shard_returned worker=%s shard=%s tasks=%d", self.identity, shard, returned)
        self.tally.stored += count_own_prepared(
            self.leases, self.config.host_id, lambda call: self._redis(call, "shard")
        )

    def _check_store(self, now: float) -> None:
        """Stop claiming while the store fails or stalls, returning the tasks not started; resume once it is healthy
        again (a probe write succeeded, or the write that hung returned), sealing the shards it refused."""
        problem = self._store_health(now)
        before, self.store_problem = self.store_problem, problem
        if problem is not None and (before is None or before.state != problem.state):
            log.warning("store_pause worker=%s reason=%s held=%d", self.identity, problem, self.held_count)
            self._return_unstarted()
        elif problem is None and before is not None:
            log.info("store_resume worker=%s after=%s", self.identity, before.state)
            if self.shards is not None:
                self._reseal()

    def _store_stalled(self) -> bool:
        return self.store_problem is not None and self.store_problem.state == STORE_STALLED

    def _store_check_stalled(self) -> bool:
        """At exit: whether a write hangs now (the engine is stopped: nothing is returned to it)."""
        self.store_problem = self._store_health(time.monotonic())
        return self._store_stalled()

    def _store_health(self, now: float) -> StoreProblem | None:
        return self.sink.health.check(now, self.config.store_stall_seconds, self.sink.temp_dir)

    def _close_sink(self, seconds: float) -> None:
        """Close the sink (stop the sealer, remove the temporary folder) for at most ``seconds``: on a store that
        does not answer the folder is left, and the next worker of this host removes it."""
        closer = threading.Thread(target=self.sink.close, name="sink-close", daemon=True)
        closer.start()
        closer.join(max(seconds, CLOSE_STALLED_SECONDS))
        if closer.is_alive():
            log.error("store_close_timeout worker=%s folder=%s: left for the next worker of this host", self.identity,
                      self.sink.temp_dir)  # fmt: skip

    def _check_disk(self) -> None:
        try:
            reason = self._redis(self.guard.full_reason, "disk_check")
        except OSError as error:
            reason = f"cannot measure {self.config.monitor_disk}: {error}"
        if reason and self.pause_reason is None:
            log.warning("disk_pause worker=%s reason=%s", self.identity, reason)
        elif reason is None and self.pause_reason is not None:
            log.info("disk_resume worker=%s", self.identity)
        self.pause_reason = reason

    def _nothing_left(self) -> bool:
        """True when no producer runs and no task is queued, waiting for a retry or leased by any worker."""

        def check() -> bool:
            pipe = self.client.pipeline(transaction=False)
            pipe.exists(self.keys.producer)
            pipe.llen(self.keys.task)
            pipe.zcard(self.keys.delayed)
            pipe.smembers(self.keys.workers)
            pipe.hlen(self.keys.shards)
            producing, queued, delayed, workers, finishing = pipe.execute()
            if producing or queued or delayed or finishing:
                return False
            self.round_trips += 1
            pipe = self.client.pipeline(transaction=False)
            for worker in workers:
                pipe.llen(self.keys.lease(worker))
                pipe.exists(self.keys.kept(worker))
            return not any(pipe.execute())

        if self._redis(check, "drain_check"):
            return True
        self._reap()
        return False

    def _reap(self) -> None:
        reaped = self._redis(self.leases.reap, "reap")
        if reaped:
            log.info("leases_recovered worker=%s tasks=%d", self.identity, reaped)
