"""Every Redis key name of the suite, built in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """The original suite's key names (from setting.RedisKey) and the keys this port adds beside them.

    Added keys live under the task key's name as a namespace, so two deployments that use different task keys
    on one Redis never touch each other's state.
    """

    task: str = "laion5b_task"
    tongji_all: str = "laion5b_tongji_all"
    error: str = "laion5b_task_error"
    tongji_error: str = "laion5b_tongji_error"
    tongji_succ: str = "laion5b_tongji_succ"
    tongji_disk: str = "tongji_worker_disk"

    @classmethod
    def from_redis_key(cls, redis_key: type) -> Keys:
        """Build from a class shaped like setting.RedisKey."""
        return cls(
            task=redis_key.task_key,
            tongji_all=redis_key.tongji_all,
            error=redis_key.error_key,
            tongji_error=redis_key.tongji_error,
            tongji_succ=redis_key.tongji_succ,
            tongji_disk=redis_key.tongji_disk,
        )

    @property
    def tongji_bytes(self) -> str:
        """Counter: bytes of stored images."""
        return f"{self.task}:bytes"

    @property
    def tongji_total(self) -> str:
        """Counter: rows the producer expects to have added once every known file is queued."""
        return f"{self.task}:total"

    @property
    def started(self) -> str:
        """Unix time of the first task added (for rates since start)."""
        return f"{self.task}:started"

    @property
    def host_counters(self) -> str:
        """Hash: ``<host_id>:succ``, ``<host_id>:error``, ``<host_id>:bytes`` per download host, and ``<host_id>:open``:
        samples in its workers' unfinished shards (webdataset output), not counted as succeeded yet."""
        return f"{self.task}:hosts"

    @property
    def workers(self) -> str:
        """Set: identities of workers that may hold leases."""
        return f"{self.task}:workers"

    @property
    def producer(self) -> str:
        """String with a TTL: present while add_task.py runs."""
        return f"{self.task}:producer"

    @property
    def positions(self) -> str:
        """Hash: parquet file -> rows of it already added (resume point after a crash; kept once the file is done,
        so that batches a crashed Redis lost after the file was marked done are found and queued again)."""
        return f"{self.task}:position"

    @property
    def delayed(self) -> str:
        """Sorted set: tasks waiting to be tried again, as ``<nonce>|<task>``, scored by the Redis time they are due."""
        return f"{self.task}:delayed"

    @property
    def reap_lock(self) -> str:
        """Short lock taken by the worker that returns dead workers' leases to the queue."""
        return f"{self.task}:reap_lock"

    def lease(self, worker: str) -> str:
        """List: tasks held by one worker."""
        return f"{self.task}:lease:{worker}"

    def kept(self, worker: str) -> str:
        """Hash: shard -> host_id, for each open shard of a worker (webdataset output); the tasks of its samples,
        out of the lease list but not counted yet, are held in the list ``kept_tasks(worker, shard)``."""
        return f"{self.task}:kept:{worker}"

    def kept_tasks(self, worker: str, shard: str) -> str:
        """List: tasks whose samples are in one open shard of a worker. The scripts build it as ``kept(worker)``
        + ``:`` + shard."""
        return f"{self.kept(worker)}:{shard}"

    @property
    def shards(self) -> str:
        """Hash: ``<host_id>|<shard>`` -> JSON record of a shard being finished (its files fsynced, maybe not renamed
        yet); its tasks wait in ``shard_tasks``. An entry left by a dead worker is finished by its host's workers."""
        return f"{self.task}:shards"

    def shard_tasks(self, field: str) -> str:
        """List: the tasks of a shard being finished (``field`` as in ``shards``)."""
        return f"{self.task}:shard:{field}"

    def shard_lock(self, host_id: str) -> str:
        """Short lock taken by the worker that finishes the shards dead workers of ``host_id`` left."""
        return f"{self.task}:shard_lock:{host_id}"

    def heartbeat(self, worker: str) -> str:
        """String with a TTL: the live process that owns a worker identity."""
        return f"{self.task}:worker:{worker}"

    def host_record(self, host_id: str) -> str:
        """Hash with a TTL: the latest machine sample published by monitor_disk.py."""
        return f"{self.task}:host:{host_id}"

    def disk_timestamp_field(self, host_id: str) -> str:
        """Field of ``tongji_disk`` holding when ``host_id``'s used GB was measured."""
        return f"{host_id}:ts"

    def error_processing(self, saver: str) -> str:
        """List: error records one save_error_task.py instance is writing to disk."""
        return f"{self.error}:processing:{saver}"

    def error_saver(self, saver: str) -> str:
        """String with a TTL: the live save_error_task.py process that owns the name ``saver``."""
        return f"{self.error}:saver:{saver}"

    @property
    def failures(self) -> str:
        """Hash: status -> tasks whose error record carries it (lowered again by requeue)."""
        return f"{self.task}:failures"

    @property
    def requeued_total(self) -> str:
        """Counter: error records put back on the queue by requeue, ever."""
        return f"{self.task}:requeued"

    @property
    def control(self) -> str:
        """Hash: what the operator asked (control.py): ``pause`` / ``pause:host:<host>`` / ``pause:worker:<identity>``
        -> Redis time asked; ``drain`` / ``drain:host:<host>`` / ``drain:worker:<identity>`` -> Redis time asked."""
        return f"{self.task}:control"

    @property
    def control_acks(self) -> str:
        """Hash: worker identity -> JSON ``{"state": ..., "at": ...}``: what the worker last did about the control."""
        return f"{self.task}:control:acks"

    def history(self, scope: str, resolution: str) -> str:
        """List of compact samples, oldest first: ``resolution`` is ``minute`` or ``hour``; ``scope`` a host or the
        run-wide scope ``*``."""
        return f"{self.task}:history:{resolution}:{scope}"

    def history_lock(self, minute: int) -> str:
        """Short lock: the monitor that takes it writes the run-wide sample of that minute."""
        return f"{self.task}:history_lock:{minute}"

    @property
    def history_hosts(self) -> str:
        """Set: hosts that have a history."""
        return f"{self.task}:history_hosts"

    def robots(self, origin: str) -> str:
        """String with a TTL: the compact rules of a site's robots.txt for our agents (``laion5b.robots``)."""
        return f"{self.task}:robots:{origin}"

    def robots_lock(self, origin: str) -> str:
        """Short lock taken by the worker that fetches a site's robots.txt."""
        return f"{self.task}:robots_lock:{origin}"

    def crawl(self, origin: str) -> str:
        """Hash with a TTL: the Crawl-delay turns of a site that asks for one (next start, request in flight)."""
        return f"{self.task}:crawl:{origin}"

    @property
    def web_hosts(self) -> str:
        """Hash: web host name -> its fleet-wide state (slots held, AIMD limit, pause; laion5b/hostledger.py), only
        for hosts that hold a slot or left their start state."""
        return self.ledger_hosts("web")

    def web_holds(self, worker: str) -> str:
        """Hash: web host name -> download slots of that host one worker holds (dropped when the worker dies)."""
        return self.ledger_holds("web", worker)

    @property
    def web_holders(self) -> str:
        """Set: workers that may hold web host slots (checked for a live heartbeat by the ledger's reaper)."""
        return self.ledger_holders("web")

    @property
    def web_expiry(self) -> str:
        """Sorted set: web host -> Redis time its throttled state is forgotten (bounds ``web_hosts``)."""
        return self.ledger_expiry("web")

    @property
    def web_throttled(self) -> str:
        """Sorted set: web host -> times it answered 429/503 or timed out in bursts; the most throttled, trimmed."""
        return self.ledger_throttled("web")

    @property
    def web_reap_lock(self) -> str:
        """Short lock taken by the worker that drops dead workers' web host slots and forgets expired states."""
        return self.ledger_reap_lock("web")

    # The same six keys for each ledger of fleet-wide download slots (laion5b/hostledger.py): kind "web" (host
    # names, the keys above) or "ip" (server addresses, max_per_ip).

    def ledger_hosts(self, kind: str) -> str:
        return f"{self.task}:{kind}:hosts"

    def ledger_holds(self, kind: str, worker: str) -> str:
        return f"{self.task}:{kind}:holds:{worker}"

    def ledger_holders(self, kind: str) -> str:
        return f"{self.task}:{kind}:holders"

    def ledger_expiry(self, kind: str) -> str:
        return f"{self.task}:{kind}:expiry"

    def ledger_throttled(self, kind: str) -> str:
        return f"{self.task}:{kind}:throttled"

    def ledger_reap_lock(self, kind: str) -> str:
        return f"{self.task}:{kind}:reap_lock"

    @property
    def requeued(self) -> str:
        """Hash: ``<host_id>:<error file path>`` -> JSON ``{selector: byte offset}`` of what requeue handled."""
        return f"{self.error}:requeued"
