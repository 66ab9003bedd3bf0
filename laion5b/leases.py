"""The reliable queue: tasks move atomically into a worker's lease list and leave it only with their outcome.

Every step is one Lua script, so it is atomic in Redis and safe to send again after a lost reply:
- ``claim`` moves up to N tasks from the queue into the worker's lease list and keeps its heartbeat alive;
- ``finish`` records a batch of outcomes, each only if its task is still in the lease list (LREM returned 1),
  together with its counters, its error record or its retry, so no task is ever counted twice;
- ``exchange`` does both in one script (``claim`` and ``finish`` are its two halves): one round trip per batch;
- a retry waits in the delayed set, scored by the Redis time it is due; ``exchange`` and ``heartbeat`` move due
  tasks (a bounded number per call) back to the end of the queue that is claimed next, in the same script;
- ``reap`` returns the leases of a worker whose heartbeat has expired to the queue, exactly once.

With webdataset output a stored sample's task is *kept* instead (kind KEPT): it leaves the lease list for a list of
its open shard, and is counted as succeeded only when its shard is finished (docs/output.md, "Webdataset output"):
- ``prepare_shard`` moves a shard's kept tasks, all of them or none, to the shard's own list once its files are
  written and fsynced, before they are renamed; ``commit_shard`` counts them once the files have their final names;
- ``release_shard`` returns them to the queue when the shard is discarded;
- a dead worker's kept tasks return to the queue with its leases; a shard it left prepared is finished (or, when its
  files are gone, released) by a worker of its host (``laion5b.shards.recover``).

With ``redis_min_replicas`` set, ``exchange`` and the shard steps return only once that many replicas hold their
writes (``laion5b.replicas``): a download, a shard's rename or the next step never depends on a write a failover can
lose. A worker's open shards that Redis holds and the worker does not know (a failover brought them back) are
returned with ``stray_shards`` and ``release_kept``, as its stray leases are.

Fencing: each process makes a random incarnation when it starts, and its token (the heartbeat's value) carries it.
Every script that records, counts or returns tasks for a worker first checks that the identity's heartbeat holds
this token (``exchange`` also takes a heartbeat that expired while nobody took the identity over); a stale process
(paused past ``heartbeat_ttl`` while a successor of its name started) gets IdentityLost having changed nothing, and
its shards, named with its incarnation, never mix with its successor's. Liveness is the heartbeat: a PID is only a
hint, used by ``register`` to take over at once from a holder that is provably dead in this PID namespace.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis

from laion5b.keys import Keys
from laion5b.replicas import Replicas

STORED, FAILED, RETRY, RETURN, KEPT = "s", "e", "r", "q", "k"
"""Outcome kinds: stored (payload: bytes), failed (payload: see ``failed_outcome``; a bare error record is read for
its status), retry later (payload: see ``retry_outcome``), returned untouched (to the queue's head), kept in an open
shard (payload: the shard)."""
PROMOTE_BATCH = 1000
"""Due tasks moved from the delayed set to the queue by one script run at most."""

CLOCK_LUA = """
local function clock()
  local time = redis.call('TIME')
  return tonumber(time[1]) + tonumber(time[2]) / 1000000
end
"""
"""The Redis clock (TIME) as Unix seconds, for Lua scripts: every delay is measured on it, never on a worker's clock."""

# Moves up to PROMOTE_BATCH members due by ``now`` from the delayed set to the queue's right end (claimed next, the
# longest overdue first), each without its ``<nonce>|`` prefix. Returns how many moved.
_PROMOTE = f"""
local function promote(delayed, queue, now)
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, {PROMOTE_BATCH})
  for i = #due, 1, -1 do
    local member = due[i]
    redis.call('ZREM', delayed, member)
    redis.call('RPUSH', queue, string.sub(member, (string.find(member, '|', 1, true) or 0) + 1))
  end
  return #due
end
"""

# Keeps the heartbeat of KEYS[hb] owned by ARGV token; fails when another live process owns the identity.
_TOUCH = """
local function touch(hb, workers, token, ttl, worker)
  local current = redis.call('GET', hb)
  if current and current ~= token then return false end
  redis.call('SET', hb, token, 'EX', ttl)
  if not current then redis.call('SADD', workers, worker) end
  return true
end
"""

# Returns the tasks of one shard's list to the queue, taking them off the open count of the shard's host.
_RELEASE_SHARD_TASKS = """
local function release_shard(list, queue, hosts, host)
  local count = 0
  while redis.call('LMOVE', list, queue, 'RIGHT', 'RIGHT') do count = count + 1 end
  if count > 0 then redis.call('HINCRBY', hosts, host .. ':open', -count) end
  return count
end
"""

# Returns every task of a worker to the queue: its leases, and the tasks kept in its open shards.
_RELEASE = (
    _RELEASE_SHARD_TASKS
    + """
local function release(lease, kept, queue, hosts)
  local moved = 0
  while redis.call('LMOVE', lease, queue, 'RIGHT', 'RIGHT') do moved = moved + 1 end
  local shards = redis.call('HGETALL', kept)
  for i = 1, #shards, 2 do
    moved = moved + release_shard(kept .. ':' .. shards[i], queue, hosts, shards[i + 1])
  end
  redis.call('DEL', kept)
  return moved
end
"""
)

# KEYS: heartbeat, lease, queue, workers, kept, host counters. ARGV: token, ttl, worker, token it may replace ('' for
# none).
_REGISTER = (
    _RELEASE
    + """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[4] then return current end
local moved = release(KEYS[2], KEYS[5], KEYS[3], KEYS[6])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SADD', KEYS[4], ARGV[3])
return moved
"""
)

# Records (kind, task, payload) triples from ARGV[first] on, each only if its task is still in the lease list.
# A retry's payload is "<delay>|<nonce>|<task>": "<nonce>|<task>" goes into the delayed set, due at now + delay.
# A failure's payload is "<status>|<error record>" (or a bare JSON record, whose status is read from it); the record
# goes to the error list and its status is counted in the failures hash.
_RECORD = """
local function failure(payload)
  if string.sub(payload, 1, 1) == '{' then
    local ok, decoded = pcall(cjson.decode, payload)
    if ok and type(decoded) == 'table' and decoded.status ~= nil then return tostring(decoded.status), payload end
    return 'unknown', payload
  end
  local bar = string.find(payload, '|', 1, true) or 0
  return string.sub(payload, 1, bar - 1), string.sub(payload, bar + 1)
end
local function record(lease, queue, errors, succ_key, error_key, bytes_key, hosts, host, delayed, now, first, failures,
  kept)
  local stored, failed, bytes, applied, held = 0, 0, 0, 0, 0
  local statuses, shards = {}, {}
  for i = first, #ARGV, 3 do
    local kind, task, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    -- from the tail: claims are pushed at the head, and tasks end roughly in the order they were claimed
    if redis.call('LREM', lease, -1, task) == 1 then
      applied = applied + 1
      if kind == 's' then
        stored = stored + 1
        bytes = bytes + tonumber(payload)
      elseif kind == 'e' then
        failed = failed + 1
        local status, error_record = failure(payload)
        statuses[status] = (statuses[status] or 0) + 1
        redis.call('LPUSH', errors, error_record)
      elseif kind == 'r' then
        local bar = string.find(payload, '|', 1, true) or 0
        local delay = tonumber(string.sub(payload, 1, bar - 1))
        if not delay or delay ~= delay then delay = 0 end
        redis.call('ZADD', delayed, now + delay, string.sub(payload, bar + 1))
      elseif kind == 'k' then
        held = held + 1
        local shard = shards[payload]
        if not shard then
          shard = {}
          shards[payload] = shard
        end
        shard[#shard + 1] = task
      else
        redis.call('RPUSH', queue, task)
      end
    end
  end
  if stored > 0 then
    redis.call('INCRBY', succ_key, stored)
    redis.call('INCRBY', bytes_key, bytes)
    redis.call('HINCRBY', hosts, host .. ':succ', stored)
    redis.call('HINCRBY', hosts, host .. ':bytes', bytes)
  end
  if failed > 0 then
    redis.call('INCRBY', error_key, failed)
    redis.call('HINCRBY', hosts, host .. ':error', failed)
  end
  if held > 0 then redis.call('HINCRBY', hosts, host .. ':open', held) end
  for shard, tasks in pairs(shards) do
    for first = 1, #tasks, 1000 do
      redis.call('RPUSH', kept .. ':' .. shard, unpack(tasks, first, math.min(first + 999, #tasks)))
    end
    redis.call('HSET', kept, shard, host)
  end
  for status, count in pairs(statuses) do redis.call('HINCRBY', failures, status, count) end
  return applied
end
"""

# Records outcomes, promotes due retries, then claims tasks, in one round trip. KEYS: lease, queue, error list,
# succ counter, error counter, bytes counter, host counters, heartbeat, workers, delayed set, failures hash, kept.
# ARGV: host, token, ttl, worker, count, then triples. Returns {applied, 1, claimed tasks...}, or {0, 0} when another
# process (another incarnation) owns the identity: then nothing is recorded, promoted or claimed. A heartbeat that
# expired while nobody took the identity over is taken again: a reaper may have returned the tasks meanwhile, and
# their outcomes are then not recorded (LREM finds nothing).
_EXCHANGE = (
    _TOUCH
    + CLOCK_LUA
    + _PROMOTE
    + _RECORD
    + """
local holder = redis.call('GET', KEYS[8])
if holder and holder ~= ARGV[2] then return {0, 0} end
local now = clock()
local applied = record(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV[1], KEYS[10], now, 6,
  KEYS[11], KEYS[12])
promote(KEYS[10], KEYS[2], now)
touch(KEYS[8], KEYS[9], ARGV[2], ARGV[3], ARGV[4])
local reply = {applied, 1}
local count = tonumber(ARGV[5])
if count < 1 then return reply end
local tasks = redis.call('RPOP', KEYS[2], count)
if not tasks then return reply end
for first = 1, #tasks, 1000 do
  redis.call('LPUSH', KEYS[1], unpack(tasks, first, math.min(first + 999, #tasks)))
end
for i = 1, #tasks do reply[i + 2] = tasks[i] end
return reply
"""
)

# KEYS: heartbeat, workers, delayed set, queue. ARGV: token, ttl, worker. Promotes due retries (so they move even
# while no worker claims), then returns 1, or 0 when another process owns the identity.
_HEARTBEAT = (
    _TOUCH
    + CLOCK_LUA
    + _PROMOTE
    + """
if not touch(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
promote(KEYS[3], KEYS[4], clock())
return 1
"""
)

# KEYS: heartbeat, lease, queue, workers, kept, host counters. ARGV: worker. Returns the tasks returned, or -1 when
# it is alive.
_REAP = (
    _RELEASE
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local moved = release(KEYS[2], KEYS[5], KEYS[3], KEYS[6])
redis.call('SREM', KEYS[4], ARGV[1])
return moved
"""
)

# KEYS: heartbeat, lease, queue, workers, kept, host counters. ARGV: token, worker. Gives the identity up and
# returns its tasks.
_RETIRE = (
    _RELEASE
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local moved = release(KEYS[2], KEYS[5], KEYS[3], KEYS[6])
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[4], ARGV[2])
return moved
"""
)

# Whether a shard step must not run: KEYS[fence] does not hold ARGV value (the owner's heartbeat and its token, or the
# recovery lock and its token), or, for a recovery, the shard's owner holds its identity again (owner_key holds owner).
_FENCED = """
local function fenced(key, value, owner_key, owner)
  if redis.call('GET', key) ~= value then return true end
  return owner ~= '' and redis.call('GET', owner_key) == owner
end
"""

# KEYS: kept, kept tasks, shards, shard tasks, heartbeat. ARGV: shard, samples in its files, field, record, token.
# Moves the shard's kept tasks to its own list and records it as being finished, only if every sample's task is
# there; returns -1 then (also when it already was, with this record), -2 when another shard of that name is being
# finished, -3 when this process no longer owns its identity (nothing done), else how many tasks are there (a shard
# without a sample is forgotten, never prepared: 0).
_PREPARE = """
if redis.call('GET', KEYS[5]) ~= ARGV[5] then return -3 end
local current = redis.call('HGET', KEYS[3], ARGV[3])
if current then return current == ARGV[4] and -1 or -2 end
local held = redis.call('LLEN', KEYS[2])
if held ~= tonumber(ARGV[2]) then return held end
if held == 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
redis.call('RENAME', KEYS[2], KEYS[4])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
return -1
"""

# KEYS: shards, shard tasks, succ counter, bytes counter, host counters, fence key, owner's heartbeat. ARGV: field,
# host, bytes, fence value, owner token ('' when the owner commits). Counts a prepared shard's tasks as succeeded and
# forgets it; returns how many, -1 when it is not (or no longer) prepared, -3 when fenced (nothing done).
_COMMIT = (
    _FENCED
    + """
if fenced(KEYS[6], ARGV[4], KEYS[7], ARGV[5]) then return -3 end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return -1 end
local count = redis.call('LLEN', KEYS[2])
redis.call('DEL', KEYS[2])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('INCRBY', KEYS[3], count)
redis.call('INCRBY', KEYS[4], ARGV[3])
redis.call('HINCRBY', KEYS[5], ARGV[2] .. ':succ', count)
redis.call('HINCRBY', KEYS[5], ARGV[2] .. ':bytes', ARGV[3])
redis.call('HINCRBY', KEYS[5], ARGV[2] .. ':open', -count)
return count
"""
)

# KEYS: the shard's task list, queue, the hash that records the shard, host counters, fence key, owner's heartbeat.
# ARGV: field, host, fence value, owner token ('' for the owner). Returns a discarded shard's tasks to the queue and
# forgets it; returns how many, -1 when a recovery finds it no longer being finished, -3 when fenced (nothing done).
_RELEASE_SHARD = (
    _RELEASE_SHARD_TASKS
    + _FENCED
    + """
if fenced(KEYS[5], ARGV[3], KEYS[6], ARGV[4]) then return -3 end
if ARGV[4] ~= '' and redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then return -1 end
local count = release_shard(KEYS[1], KEYS[2], KEYS[4], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[1])
return count
"""
)

# KEYS: lock. ARGV: token, seconds. Keeps a lock this token holds for ``seconds`` more; 0 when it lost it.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('EXPIRE', KEYS[1], ARGV[2])
"""

# KEYS: lock. ARGV: token. Deletes the lock only if this token holds it.
_UNLOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


def failed_outcome(raw: str, status: int | str, record: str) -> tuple[str, str, str]:
    """The outcome of a held task ``raw`` that failed with ``status``: ``record`` goes to the error list, the status
    is counted in the failures hash."""
    return FAILED, raw, f"{status}|{record}"


def retry_outcome(raw: str, task: str, delay: float) -> tuple[str, str, str]:
    """The outcome of a held task ``raw`` to try again as ``task`` (its attempt count raised) in ``delay`` seconds.

    It waits in the delayed set as ``<nonce>|<task>``: the random nonce keeps two equal tasks apart (a sorted set
    would merge them into one) and is stripped when the task rejoins the queue.
    """
    return RETRY, raw, f"{max(delay, 0.0):.6f}|{secrets.token_hex(8)}|{task}"


class IdentityInUse(RuntimeError):
    """Another live process already works under this worker identity."""


class IdentityLost(RuntimeError):
    """Another process (another incarnation) took this worker identity over while this one was running."""


def _namespace() -> str:
    """This machine's boot and this process's PID namespace, e.g. ``5d1c0a2e.4026531836``: two PIDs compare only
    when both are the same (containers sharing a host_id have PID namespaces of their own); '' when unknown."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}.{pid_namespace.strip('pid:[]')}"


NAMESPACE = _namespace()


@dataclass(frozen=True)
class Owner:
    """Who holds a worker identity: one incarnation (a random id made when the process starts) of a process on a
    host. The incarnation is what fences a stale process out; the PID is only a hint, and only in this PID
    namespace."""

    host: str
    pid: int
    started: float
    namespace: str = ""
    incarnation: str = ""

    @classmethod
    def this_process(cls, host: str) -> Owner:
        return cls(host, os.getpid(), psutil.Process().create_time(), NAMESPACE, secrets.token_hex(8))

    @classmethod
    def parse(cls, token: str) -> Owner | None:
        """Read ``<host>|<pid>@<started>|<namespace>|<incarnation>``, or an older ``<host>|<pid>@<started>``."""
        parts = token.rsplit("|", 3)
        if len(parts) == 4:
            host, process, namespace, incarnation = parts
        else:
            host, _, process = token.rpartition("|")
            namespace = incarnation = ""
        pid, _, started = process.partition("@")
        try:
            return cls(host, int(pid), float(started), namespace, incarnation)
        except ValueError:
            return None

    def token(self) -> str:
        return f"{self.host}|{self.pid}@{self.started:.2f}|{self.namespace}|{self.incarnation}"

    def is_dead_here(self) -> bool:
        """Whether this owner is provably gone: a process of this boot and PID namespace whose PID is free, a zombie,
        or another process now. A process of another namespace, or one hidden by ``hidepid``, is never proved dead:
        its heartbeat decides."""
        if not self.namespace or self.namespace != NAMESPACE:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        try:
            process = psutil.Process(self.pid)
            return process.status() == psutil.STATUS_ZOMBIE or abs(process.create_time() - self.started) >= 0.01
        except psutil.Error:
            return False

    def is_alive_here(self) -> bool:
        """Whether this owner may still run: everything not proved dead (``is_dead_here``) is taken as alive."""
        return not self.is_dead_here()


FENCED = -3
"""What a shard script returns when its fence does not hold (the caller no longer owns the identity or the lock)."""


class Lock:
    """A lock held by one random token: taken with SET NX, renewed and given up only by its holder (Lua)."""

    def __init__(self, client: redis.Redis, key: str, seconds: int) -> None:
        self.client = client
        self.key = key
        self.seconds = seconds
        self.token = secrets.token_hex(16)
        self._renew = client.register_script(_RENEW)
        self._unlock = client.register_script(_UNLOCK)

    def acquire(self, wait: float, poll: float = 0.2) -> bool:
        """Take the lock, waiting up to ``wait`` seconds for it; False when it stays taken."""
        deadline = time.monotonic() + wait
        while not self.client.set(self.key, self.token, nx=True, ex=self.seconds):
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True

    def renew(self) -> bool:
        """Keep it ``seconds`` more; False when it expired and was lost (someone else may hold it now)."""
        return bool(self._renew(keys=[self.key], args=[self.token, self.seconds]))

    def release(self) -> None:
        self._unlock(keys=[self.key], args=[self.token])


class Leases:
    """One worker's side of the reliable queue."""

    def __init__(
        self, client: redis.Redis, keys: Keys, host_id: str, worker: str, ttl: int, min_replicas: int = 0
    ) -> None:
        self.client = client
        self.replicas = Replicas(min_replicas)
        """Replicas that hold an exchange's and a shard step's writes before they return (redis_min_replicas)."""
        self.keys = keys
        self.host_id = host_id
        self.worker = worker
        self.ttl = ttl
        self.owner = Owner.this_process(host_id)
        self.token = self.owner.token()
        self.lease_key = keys.lease(worker)
        self.heartbeat_key = keys.heartbeat(worker)
        self.kept_key = keys.kept(worker)
        self._finish_keys = [
            self.lease_key,
            keys.task,
            keys.error,
            keys.tongji_succ,
            keys.tongji_error,
            keys.tongji_bytes,
            keys.host_counters,
            self.heartbeat_key,
            keys.workers,
            keys.delayed,
            keys.failures,
            self.kept_key,
        ]
        self._register = client.register_script(_REGISTER)
        self._exchange = client.register_script(_EXCHANGE)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._reap = client.register_script(_REAP)
        self._retire = client.register_script(_RETIRE)
        self._prepare = client.register_script(_PREPARE)
        self._commit = client.register_script(_COMMIT)
        self._release_shard = client.register_script(_RELEASE_SHARD)

    @property
    def incarnation(self) -> str:
        return self.owner.incarnation

    def _worker_keys(self, worker: str) -> list[str]:
        """The keys of the scripts that give up a worker's identity and return its tasks (register, retire, reap)."""
        keys = self.keys
        return [
            keys.heartbeat(worker),
            keys.lease(worker),
            keys.task,
            keys.workers,
            keys.kept(worker),
            keys.host_counters,
        ]

    def register(self) -> int:
        """Take the identity, returning a predecessor's leases to the queue; return how many were returned.

        An identity whose heartbeat expired is taken at once (a predecessor that comes back is fenced out by its
        incarnation). Raise IdentityInUse while the heartbeat lives, unless its holder is provably dead on this host
        (same PID namespace, its PID gone): a live heartbeat is never declared dead from another namespace.
        """
        keys = self._worker_keys(self.worker)
        result = self._register(keys=keys, args=[self.token, self.ttl, self.worker, ""])
        if not isinstance(result, str):
            return int(result)
        if result == self.token:
            return 0
        holder = Owner.parse(result)
        if holder is None or holder.host != self.host_id or not holder.is_dead_here():
            raise IdentityInUse(f"worker {self.worker} is already running (owner {result})")
        result = self._register(keys=keys, args=[self.token, self.ttl, self.worker, result])
        if isinstance(result, str):
            raise IdentityInUse(f"worker {self.worker} was taken by {result} while starting")
        return int(result)

    def claim(self, count: int) -> list[str]:
        """Move up to ``count`` tasks from the queue into this worker's lease list."""
        return self.exchange((), count)[1]

    def finish(self, outcomes: Sequence[tuple[str, str, str | int]]) -> int:
        """Record (kind, task, payload) outcomes of held tasks; return how many were still held and so applied."""
        return self.exchange(outcomes, 0)[0]

    def exchange(self, outcomes: Sequence[tuple[str, str, str | int]], count: int) -> tuple[int, list[str]]:
        """Record ``outcomes``, then claim up to ``count`` tasks, in one round trip: (outcomes applied, tasks claimed).

        Raise IdentityLost, having recorded nothing, when another incarnation owns this worker's identity.
        """
        args: list[str | int] = [self.host_id, self.token, self.ttl, self.worker, count]
        for outcome in outcomes:
            args.extend(outcome)
        reply = self.replicas.run(self._exchange, self._finish_keys, args)
        if not reply[1]:
            raise IdentityLost(f"worker {self.worker} was taken over by another process")
        return int(reply[0]), reply[2:]

    def heartbeat(self) -> None:
        """Keep the identity alive and move due retries to the queue; raise IdentityLost when another process has
        taken the identity."""
        keys = [self.heartbeat_key, self.keys.workers, self.keys.delayed, self.keys.task]
        if not self._heartbeat(keys=keys, args=[self.token, self.ttl, self.worker]):
            raise IdentityLost(f"worker {self.worker} was taken over by another process")

    def strays(self, held: Iterable[str]) -> list[str]:
        """Tasks in this worker's lease list that it does not hold (a lost reply, or Redis replaying old writes)."""
        leased = Counter(self.client.lrange(self.lease_key, 0, -1))
        leased.subtract(Counter(held))
        return [task for task, count in leased.items() for _ in range(count) if count > 0]

    def stray_shards(self, known: Iterable[str]) -> list[str]:
        """This worker's open shards in Redis that it does not know (a failover brought back a shard it finished on a
        master whose last writes were lost): their kept tasks are to be returned with ``release_kept``."""
        return sorted(set(self.client.hkeys(self.kept_key)) - set(known))

    def prepare_shard(self, shard: str, samples: int, field: str, record: str) -> bool:
        """Move the tasks kept for ``shard`` to the list of the shard being finished (``field`` in the shards hash,
        holding ``record``), if all ``samples`` of its files are there; False when some are not (a lease was lost) or
        another shard of that name is being finished. Raise IdentityLost (nothing done) when another incarnation
        owns the identity, or its heartbeat expired."""
        keys = [self.kept_key, self.keys.kept_tasks(self.worker, shard), self.keys.shards, self.keys.shard_tasks(field)]
        keys.append(self.heartbeat_key)
        return self._fenced(self.replicas.run(self._prepare, keys, [shard, samples, field, record, self.token])) == -1

    def commit_shard(self, field: str, host_id: str, stored_bytes: int) -> int:
        """Count this process's prepared shard's tasks as succeeded; return how many (-1: not prepared, or counted
        already). Raise IdentityLost (nothing counted) when this incarnation no longer owns the identity."""
        keys = self._commit_keys(field, self.heartbeat_key, self.heartbeat_key)
        return self._fenced(self.replicas.run(self._commit, keys, [field, host_id, stored_bytes, self.token, ""]))

    def release_kept(self, shard: str) -> int:
        """Return the tasks kept for one of this worker's open shards to the queue (the shard is discarded). Raise
        IdentityLost (nothing returned) when this incarnation no longer owns the identity."""
        keys = [self.keys.kept_tasks(self.worker, shard), self.keys.task, self.kept_key, self.keys.host_counters]
        keys += [self.heartbeat_key, self.heartbeat_key]
        return self._fenced(self.replicas.run(self._release_shard, keys, [shard, self.host_id, self.token, ""]))

    def commit_recovered(self, field: str, host_id: str, stored_bytes: int, lock: Lock, owner: str, worker: str) -> int:
        """Count a dead worker's prepared shard (``owner`` the token of the incarnation that prepared it, ``worker``
        its identity): only while ``lock`` is held and that incarnation does not hold its identity; return how many,
        -1 when it is no longer prepared, FENCED (nothing done) otherwise."""
        keys = self._commit_keys(field, lock.key, self.keys.heartbeat(worker))
        return int(self.replicas.run(self._commit, keys, [field, host_id, stored_bytes, lock.token, owner]))

    def release_recovered(self, field: str, host_id: str, lock: Lock, owner: str, worker: str) -> int:
        """Return a dead worker's prepared shard's tasks to the queue (its files are gone), fenced as
        ``commit_recovered``: how many, -1 when it is no longer prepared (counted meanwhile), or FENCED."""
        keys = [self.keys.shard_tasks(field), self.keys.task, self.keys.shards, self.keys.host_counters]
        keys += [lock.key, self.keys.heartbeat(worker)]
        return int(self.replicas.run(self._release_shard, keys, [field, host_id, lock.token, owner]))

    def _commit_keys(self, field: str, fence: str, owner_heartbeat: str) -> list[str]:
        keys = self.keys
        return [keys.shards, keys.shard_tasks(field), keys.tongji_succ, keys.tongji_bytes, keys.host_counters, fence,
                owner_heartbeat]  # fmt: skip

    def _fenced(self, reply: int) -> int:
        """A shard script's reply; raise IdentityLost when it says this incarnation does not own the identity."""
        if int(reply) == FENCED:
            raise IdentityLost(f"worker {self.worker} is no longer owned by this process: shard step refused")
        return int(reply)

    def claimed_folders(self, names: list[str]) -> set[str]:
        """Of the temporary folders of this host (``<NAME>.<pid>``), those whose worker ``<host>:<NAME>`` has a live
        heartbeat held by that PID."""
        parsed = [name.rpartition(".") for name in names]
        tokens = self.client.mget([self.keys.heartbeat(f"{self.host_id}:{worker}") for worker, _, _ in parsed])
        owners = [Owner.parse(token) if token else None for token in tokens]
        return {name for name, (_, _, pid), owner in zip(names, parsed, owners, strict=True)
                if owner is not None and owner.host == self.host_id and str(owner.pid) == pid}  # fmt: skip

    def retire(self) -> int:
        """Give the identity up, returning every task still leased to the queue."""
        keys = self._worker_keys(self.worker)
        return int(self._retire(keys=keys, args=[self.token, self.worker]))

    def reap(self) -> int:
        """Return the leases of every worker whose heartbeat expired; one worker at a time does it (a lock)."""
        if not self.client.set(self.keys.reap_lock, self.token, nx=True, ex=max(2, self.ttl // 3)):
            return 0
        workers = sorted(self.client.smembers(self.keys.workers))
        pipe = self.client.pipeline(transaction=False)
        for worker in workers:
            pipe.exists(self.keys.heartbeat(worker))
        alive = pipe.execute()
        returned = 0
        for worker, exists in zip(workers, alive, strict=True):
            if not exists:
                keys = self._worker_keys(worker)
                returned += max(0, int(self._reap(keys=keys, args=[worker])))
        return returned
