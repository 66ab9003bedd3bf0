"""The fleet's ledger of web hosts in Redis: download slots held per host by all workers together, and each host's
adaptive limit (AIMD) and pause. The worker's main thread talks to it; its engines never do (laion5b/fleetslots.py).

Cost: one Lua call (``sync``) carries, for every host whose local state changed since the last call, the slots the
worker holds, the slots it wants, and what the host answered (good answers, 429/503, timeouts, Retry-After); it
returns the slots granted, how many the worker may keep, the host's limit and its pause. Every Redis command in the
script works on all hosts of the call at once (one HMGET, one HSET, one HDEL per hash), so a call costs about eight
commands whether it carries one host or a thousand, and a host seen once costs nothing but its fields in that call.
Per-host keys (one hash with a TTL each) would cost two to four commands per host, several per task on the web's
spread of hosts (37 % of LAION's URLs are on hosts seen once).

Redis holds, per host and only while it holds a slot or has left its start state, one field of ``web_hosts``:
``count|holders|limit|good|timeouts|throttles|since|pause|cut|denied|denier``; per worker, ``web_holds(worker)``:
host -> its slots, so that a dead worker's slots are dropped (``reap``, once per heartbeat_ttl / 6 by one worker of
the fleet, for workers whose heartbeat expired: within 7/6 heartbeat_ttl of its last heartbeat). A host's state is
forgotten STATE_SECONDS after it last changed (the sorted set ``web_expiry``): nothing grows with the number of hosts
ever seen.

AIMD: a host starts at ``host_start_concurrency``; GOOD_ROUNDS rounds of good answers at its limit (good answers
while tasks wait for it) add one (up to ``max_per_host``); a 429 or 503, or TIMEOUT_BURST timeouts in a row, halves
it (at most once per CUT_SECONDS for the whole fleet: one overload is one signal, however many workers saw it, unless
more signals came since the last cut than the host has slots, which one burst cannot give); a Retry-After pauses it
for the fleet.

Fair share: a worker keeps its slots while it has tasks for the host and hands them on locally. When another
worker was refused a slot of the host (``denied`` within CONTENTION_SECONDS), each worker may keep only
ceil(limit / workers that want it), gives the rest back as its downloads end, and is granted no more than that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from laion5b.keys import Keys
from laion5b.leases import CLOCK_LUA

CUT_SECONDS = 1.0
"""A host's limit is halved at most once per this many seconds (for the whole fleet)."""
GOOD_ROUNDS = 2
"""A host's limit grows by one after this many rounds of good answers at its current limit (limit x rounds)."""
TIMEOUT_BURST = 3
"""Timeouts in a row (no good answer between them, fleet-wide) that halve a host's limit."""
CONTENTION_SECONDS = 1.0
"""A refusal of a slot this recent makes the host's holders keep only their fair share. Ages of signals (refusals,
cuts) are told on the workers' clocks, which a skew of a few hundred ms leaves good enough; pauses on Redis' own."""
STATE_SECONDS = 600
"""Seconds after its last change (or its pause's end) that a host's throttled state is forgotten."""
THROTTLED_KEEP = 100
"""Hosts kept in the sorted set of the most throttled (``web_throttled``)."""
EXPIRE_BATCH = 1000
"""Expired host states forgotten per reap at most."""
FIELDS = 8
"""ARGV fields per host in ``sync``: host, known, held, want, good, throttles, timeouts, retry_after."""

_COMMON = (
    CLOCK_LUA
    + """
local function chunked(command, key, list, step)
  local out = {}
  for first = 1, #list, step do
    local part = redis.call(command, key, unpack(list, first, math.min(first + step - 1, #list)))
    if type(part) == 'table' then for j = 1, #part do out[#out + 1] = part[j] end end
  end
  return out
end
local PATTERN = '^(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|([%d.]+)|([%d.]+)|([%d.]+)|(.*)$'
local function decode(raw, start)
  if raw then
    local c, h, l, g, t, r, s, p, u, d, w = string.match(raw, PATTERN)
    if c then
      return {count = tonumber(c), holders = tonumber(h), limit = tonumber(l), good = tonumber(g),
        timeouts = tonumber(t), throttles = tonumber(r), since = tonumber(s), pause = tonumber(p), cut = tonumber(u),
        denied = tonumber(d), denier_holds = string.sub(w, 1, 1) == '1', denier = string.sub(w, 2)}
    end
  end
  return {count = 0, holders = 0, limit = start, good = 0, timeouts = 0, throttles = 0, since = 0, pause = 0, cut = 0,
    denied = 0, denier_holds = false, denier = ''}
end
local function encode(e)
  return string.format('%d|%d|%d|%d|%d|%d|%d|%.3f|%.3f|%.3f|%s', e.count, e.holders, e.limit, e.good, e.timeouts,
    e.throttles, e.since, e.pause, e.cut, e.denied, (e.denier_holds and '1' or '0') .. e.denier)
end
-- Nothing held, not throttled, not paused: nothing worth keeping (good answers and timeouts count only while busy).
local function at_start(e, start, now)
  return e.count == 0 and e.limit == start and e.throttles == 0 and e.pause <= now
end
-- Gives back every slot the holds hash records, in the hosts hash; deletes it. Returns the slots dropped.
local function drop(hosts, holds, start, now)
  local held = redis.call('HGETALL', holds)
  local dropped = 0
  for i = 1, #held, 2 do
    local e = decode(redis.call('HGET', hosts, held[i]), start)
    local n = tonumber(held[i + 1]) or 0
    e.count = math.max(0, e.count - n)
    e.holders = math.max(0, e.holders - 1)
    if at_start(e, start, now) then
      redis.call('HDEL', hosts, held[i])
    else
      redis.call('HSET', hosts, held[i], encode(e))
    end
    dropped = dropped + n
  end
  redis.call('DEL', holds)
  return dropped
end
"""
)

# KEYS: web hosts, this worker's holds, expiry, throttled, holders. ARGV: worker, start, max, register (1: add the
# worker to the holders set), the worker's clock (Unix seconds), check (1: read the holds hash, the last reply may
# have been lost), then FIELDS per host: host, known (its slots as the ledger counted them at the last reply), held
# (slots the worker holds by its own count), want (slots it asks for), good answers, throttles (429/503), timeouts,
# Retry-After seconds (0: none). Returns 4 integers per host, in order: granted, keep (-1: all), limit, pause left in
# ms.
_SYNC = (
    _COMMON
    + f"""
local FIELDS, FIRST = {FIELDS}, 7
local worker, start, max, wall = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])
local time_now
local function now() -- Redis' TIME for pauses only; the worker's clock (wall) is enough to compare ages of signals
  if not time_now then time_now = clock() end
  return time_now
end
local hosts = {{}}
for i = FIRST, #ARGV, FIELDS do hosts[#hosts + 1] = ARGV[i] end
local entries = chunked('HMGET', KEYS[1], hosts, 1000)
local mines = ARGV[6] == '1' and chunked('HMGET', KEYS[2], hosts, 1000) or nil
local hosts_set, hosts_del, holds_set, holds_del, expiry, throttled, reply = {{}}, {{}}, {{}}, {{}}, {{}}, {{}}, {{}}
local function cut(e, signals)
  e.since = e.since + signals
  if wall - e.cut >= {CUT_SECONDS} or e.since > e.limit then
    e.limit = math.max(1, math.floor(e.limit / 2))
    e.cut = wall
    e.good = 0
    e.since = 0
  end
end
for n = 1, #hosts do
  local i = FIRST + (n - 1) * FIELDS
  local host = hosts[n]
  local e = decode(entries[n], start)
  local mine = tonumber(ARGV[i + 1])
  if mines then mine = tonumber(mines[n]) or 0 end
  local recorded = mine
  local held, want = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local good, throttles, timeouts = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6])
  local retry_after = tonumber(ARGV[i + 7])
  e.limit = math.min(e.limit, max)
  -- the worker's own count is the truth (a reply lost on the way is settled here)
  e.count = math.max(0, e.count + held - mine)
  if mine == 0 and held > 0 then e.holders = e.holders + 1 elseif mine > 0 and held == 0 then
    e.holders = math.max(0, e.holders - 1)
  end
  mine = held
  local changed = false -- in a way that must expire
  if throttles > 0 then
    e.throttles = e.throttles + throttles
    cut(e, throttles)
    changed = true
    throttled[#throttled + 1] = e.throttles
    throttled[#throttled + 1] = host
  end
  if timeouts > 0 then
    e.timeouts = e.timeouts + timeouts
    if e.timeouts >= {TIMEOUT_BURST} then
      cut(e, 1)
      e.timeouts = 0
      e.throttles = e.throttles + 1
      throttled[#throttled + 1] = e.throttles
      throttled[#throttled + 1] = host
    end
    changed = true
  end
  if good > 0 then
    e.timeouts = 0
    e.good = e.good + good
    if e.good >= e.limit * {GOOD_ROUNDS} then
      e.limit = math.min(max, e.limit + 1)
      e.good = 0
      changed = true
    end
  end
  if retry_after > 0 then
    e.pause = math.max(e.pause, now() + retry_after)
    changed = true
  end
  local paused = e.pause > 0 and e.pause > now()
  local contended = e.denier ~= worker and e.denied > wall - {CONTENTION_SECONDS}
  local fair = e.limit
  if contended then
    local parties = e.holders
    if not e.denier_holds then parties = parties + 1 end
    if mine == 0 then parties = parties + 1 end
    fair = math.ceil(e.limit / math.max(1, parties))
  end
  local granted = 0
  if want > 0 and not paused then
    granted = math.max(0, math.min(want, e.limit - e.count, fair - mine))
    if granted > 0 and mine == 0 then e.holders = e.holders + 1 end
    mine = mine + granted
    e.count = e.count + granted
    if granted < want and mine < fair then -- refused below its fair share: the holders must make room
      e.denied = wall
      e.denier = worker
      e.denier_holds = mine > 0
    end
  end
  local keep = -1
  if e.count > e.limit then
    keep = math.floor(mine * e.limit / e.count)
  elseif contended then
    keep = fair
  end
  if at_start(e, start, paused and now() or 0) then
    hosts_del[#hosts_del + 1] = host
  else
    hosts_set[#hosts_set + 1] = host
    hosts_set[#hosts_set + 1] = encode(e)
    if changed then
      expiry[#expiry + 1] = string.format('%.3f', math.max(now() + {STATE_SECONDS}, e.pause))
      expiry[#expiry + 1] = host
    end
  end
  if mine > 0 then
    holds_set[#holds_set + 1] = host
    holds_set[#holds_set + 1] = mine
  elseif recorded > 0 then
    holds_del[#holds_del + 1] = host
  end
  local pause = paused and math.floor((e.pause - now()) * 1000) or 0
  reply[#reply + 1] = granted
  reply[#reply + 1] = keep
  reply[#reply + 1] = e.limit
  reply[#reply + 1] = pause
end
chunked('HSET', KEYS[1], hosts_set, 1000)
chunked('HDEL', KEYS[1], hosts_del, 1000)
chunked('HSET', KEYS[2], holds_set, 1000)
chunked('HDEL', KEYS[2], holds_del, 1000)
chunked('ZADD', KEYS[3], expiry, 1000)
if #throttled > 0 then
  chunked('ZADD', KEYS[4], throttled, 1000)
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -{THROTTLED_KEEP + 1})
end
if ARGV[4] == '1' then redis.call('SADD', KEYS[5], worker) end
return reply
"""
)

# KEYS: lock, holders, web hosts, expiry, throttled. ARGV: lock seconds, heartbeat key prefix, holds key prefix,
# start. Drops the slots of every holder whose heartbeat expired and forgets expired host states, when this caller
# takes the lock; returns {slots dropped, states forgotten}, or {-1, -1} when another worker holds the lock.
_REAP = (
    _COMMON
    + f"""
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return {{-1, -1}} end
local start, now = tonumber(ARGV[4]), clock()
local dropped = 0
for _, worker in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('EXISTS', ARGV[2] .. worker) == 0 then
    dropped = dropped + drop(KEYS[3], ARGV[3] .. worker, start, now)
    redis.call('SREM', KEYS[2], worker)
  end
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, {EXPIRE_BATCH})
for _, host in ipairs(expired) do
  local raw = redis.call('HGET', KEYS[3], host)
  if raw then
    local e = decode(raw, start)
    if e.count == 0 then
      redis.call('HDEL', KEYS[3], host)
    else
      local fresh = decode(false, start)
      fresh.count, fresh.holders = e.count, e.holders
      redis.call('HSET', KEYS[3], host, encode(fresh))
    end
  end
  redis.call('ZREM', KEYS[4], host)
  redis.call('ZREM', KEYS[5], host)
end
return {{dropped, #expired}}
"""
)

# KEYS: web hosts, this worker's holds, holders. ARGV: worker, start. Gives back every slot the worker holds.
_DROP = (
    _COMMON
    + """
local dropped = drop(KEYS[1], KEYS[2], tonumber(ARGV[2]), clock())
redis.call('SREM', KEYS[3], ARGV[1])
return dropped
"""
)


@dataclass
class HostReport:
    """What one worker tells the ledger about one host."""

    host: str
    held: int = 0
    want: int = 0
    known: int = 0
    """Its slots as the ledger counted them at the last reply (held then, plus what that reply granted)."""
    good: int = 0
    throttles: int = 0
    timeouts: int = 0
    retry_after: float = 0.0


@dataclass(frozen=True)
class HostGrant:
    """The ledger's answer about one host: slots granted, slots the worker may keep (-1: all it holds), the host's
    limit, and seconds its pause still lasts."""

    granted: int
    keep: int
    limit: int
    pause: float


@dataclass(frozen=True)
class ThrottledHost:
    """One of the most throttled hosts, for speed.py, /metrics and the dashboard."""

    host: str
    throttles: int
    limit: int
    held: int
    paused: float

    def to_json(self) -> dict[str, object]:
        return {
            "host": self.host,
            "throttles": self.throttles,
            "limit": self.limit,
            "held": self.held,
            "paused_s": round(self.paused, 1),
        }


class HostLedger:
    """One worker's side of the ledger (main thread only)."""

    def __init__(
        self, client: redis.Redis, keys: Keys, worker: str, start: int, limit: int, ttl: int, kind: str = "web"
    ) -> None:
        """``kind``: "web" (host names, AIMD from ``start`` to ``limit``) or "ip" (server addresses, max_per_ip:
        ``start`` = ``limit``, and no answers are reported, so the limit stays fixed), each in keys of its own."""
        self.client = client
        self.keys = keys
        self.kind = kind
        self.worker = worker
        self.start = min(start, limit)
        self.limit = limit
        self.reap_seconds = max(1, ttl // 6)
        self._registered = False
        self._uncertain = True  # until a first reply: read what a predecessor may have left
        self._sync = client.register_script(_SYNC)
        self._reap = client.register_script(_REAP)
        self._drop = client.register_script(_DROP)

    def sync(self, reports: list[HostReport]) -> list[HostGrant]:
        """Send the reports, one round trip; return the answers in the same order. The ledger trusts each report's
        ``known`` unless the last call failed (its reply may have been lost): then it reads the worker's holds."""
        if not reports:
            return []
        keys = self.keys
        argv: list[str | int | float] = [
            self.worker,
            self.start,
            self.limit,
            0 if self._registered else 1,
            f"{time.time():.3f}",
            1 if self._uncertain else 0,
        ]
        for r in reports:
            argv += [r.host, r.known, r.held, r.want, r.good, r.throttles, r.timeouts, f"{r.retry_after:.3f}"]
        kind = self.kind
        names = [
            keys.ledger_hosts(kind),
            keys.ledger_holds(kind, self.worker),
            keys.ledger_expiry(kind),
            keys.ledger_throttled(kind),
            keys.ledger_holders(kind),
        ]
        self._uncertain = True
        reply = self._sync(keys=names, args=argv)
        self._uncertain = False
        self._registered = True
        values = [int(value) for value in reply]
        return [
            HostGrant(values[i], values[i + 1], values[i + 2], values[i + 3] / 1000) for i in range(0, len(values), 4)
        ]

    def reap(self) -> tuple[int, int]:
        """Drop the slots of dead workers and forget expired host states, unless another worker just did; return
        (slots dropped, states forgotten), (-1, -1) when another worker holds the turn."""
        keys, kind = self.keys, self.kind
        names = [
            keys.ledger_reap_lock(kind),
            keys.ledger_holders(kind),
            keys.ledger_hosts(kind),
            keys.ledger_expiry(kind),
            keys.ledger_throttled(kind),
        ]
        reply = self._reap(
            keys=names, args=[self.reap_seconds, keys.heartbeat(""), keys.ledger_holds(kind, ""), self.start]
        )
        return int(reply[0]), int(reply[1])

    def drop(self) -> int:
        """Give back every slot this worker identity holds (at start: a predecessor's; at exit: its own)."""
        keys, kind = self.keys, self.kind
        self._registered = False
        names = [keys.ledger_hosts(kind), keys.ledger_holds(kind, self.worker), keys.ledger_holders(kind)]
        return int(self._drop(keys=names, args=[self.worker, self.start]))


def read_throttled(client: redis.Redis, keys: Keys, count: int = 20) -> list[ThrottledHost]:
    """The ``count`` most throttled hosts (most 429/503 and timeout bursts first) with their current state."""
    ranked = client.zrevrange(keys.web_throttled, 0, count - 1, withscores=True)
    if not ranked:
        return []
    hosts = [_text(host) for host, _ in ranked]
    pipe = client.pipeline(transaction=False)
    pipe.hmget(keys.web_hosts, hosts)
    pipe.time()
    entries, (seconds, micros) = pipe.execute()
    now = seconds + micros / 1e6
    throttled = []
    for host, (_, score), raw in zip(hosts, ranked, entries, strict=True):
        fields = _text(raw).split("|") if raw else []
        if len(fields) < 11:
            continue  # forgotten since: the host is back to its start state
        held, limit, pause = int(fields[0]), int(fields[2]), float(fields[7])
        throttled.append(ThrottledHost(host, int(score), limit, held, max(0.0, pause - now)))
    return throttled


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
