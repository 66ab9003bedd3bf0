"""The reliable queue's scripts against a real Redis."""

from __future__ import annotations

import os

import psutil
import pytest

from laion5b.keys import Keys
from laion5b.leases import FAILED, RETRY, RETURN, STORED, IdentityInUse, IdentityLost, Leases, Owner

KEYS = Keys()


def leases_for(client, worker: str = "h:0", host: str = "h", ttl: int = 30) -> Leases:
    return Leases(client, KEYS, host, worker, ttl)


def counters(client) -> tuple[int, int, int]:
    return tuple(int(client.get(key) or 0) for key in (KEYS.tongji_succ, KEYS.tongji_error, KEYS.tongji_bytes))


def test_claim_moves_tasks_into_the_lease(redis_server):
    client = redis_server.client()
    client.lpush(KEYS.task, *[f"t{i}" for i in range(10)])
    leases = leases_for(client)
    leases.register()
    claimed = leases.claim(4)
    assert claimed == ["t0", "t1", "t2", "t3"]
    assert client.llen(KEYS.task) == 6
    assert sorted(client.lrange(KEYS.lease("h:0"), 0, -1)) == claimed
    assert client.ttl(KEYS.heartbeat("h:0")) > 0
    assert leases.claim(100) == [f"t{i}" for i in range(4, 10)]
    assert leases.claim(5) == []


def test_finish_records_each_kind_once(redis_server):
    client = redis_server.client()
    client.lpush(KEYS.task, "a", "b", "c", "d")
    leases = leases_for(client)
    leases.register()
    leases.claim(4)
    outcomes = [(STORED, "a", 100), (FAILED, "b", '{"status":404}'), (RETRY, "c", "c-again"), (RETURN, "d", "")]
    assert leases.finish(outcomes) == 4
    assert counters(client) == (1, 1, 100)
    assert client.lrange(KEYS.error, 0, -1) == ['{"status":404}']
    assert client.lrange(KEYS.task, 0, -1) == ["c-again", "d"]
    assert client.llen(KEYS.lease("h:0")) == 0
    assert client.hgetall(KEYS.host_counters) == {"h:succ": "1", "h:bytes": "100", "h:error": "1"}
    assert leases.finish(outcomes) == 0, "a second recording of the same outcomes must change nothing"
    assert counters(client) == (1, 1, 100)


def test_reap_returns_a_dead_workers_leases_exactly_once(redis_server):
    client = redis_server.client()
    client.lpush(KEYS.task, *[f"t{i}" for i in range(6)])
    dead = leases_for(client, "h:dead")
    dead.register()
    dead.claim(6)
    client.delete(KEYS.heartbeat("h:dead"))
    first, second = leases_for(client, "h:1"), leases_for(client, "h:2")
    first.register()
    second.register()
    assert first.reap() == 6
    client.delete(KEYS.reap_lock)
    assert second.reap() == 0
    assert sorted(client.lrange(KEYS.task, 0, -1)) == [f"t{i}" for i in range(6)]
    assert "h:dead" not in client.smembers(KEYS.workers)
    assert dead.finish([(STORED, "t0", 1)]) == 0, "an outcome of a reaped lease is not counted"
    assert counters(client) == (0, 0, 0)


def test_reap_leaves_live_workers_alone(redis_server):
    client = redis_server.client()
    client.lpush(KEYS.task, "x")
    alive = leases_for(client, "h:alive")
    alive.register()
    alive.claim(1)
    assert leases_for(client, "h:other").reap() == 0
    assert client.lrange(KEYS.lease("h:alive"), 0, -1) == ["x"]


def test_a_live_identity_is_refused(redis_server):
    client = redis_server.client()
    parent = psutil.Process(os.getppid())
    holder = Owner("h", parent.pid, parent.create_time())
    client.set(KEYS.heartbeat("h:0"), holder.token(), ex=30)
    with pytest.raises(IdentityInUse):
        leases_for(client).register()


def test_a_live_identity_on_another_host_is_refused(redis_server):
    client = redis_server.client()
    client.set(KEYS.heartbeat("h:0"), Owner("elsewhere", 1, 1.0).token(), ex=30)
    with pytest.raises(IdentityInUse):
        leases_for(client).register()


def test_a_dead_predecessor_is_taken_over_at_once(redis_server):
    client = redis_server.client()
    dead = Owner("h", 4_000_000, 12.0)
    client.set(KEYS.heartbeat("h:0"), dead.token(), ex=30)
    client.lpush(KEYS.lease("h:0"), "held1", "held2")
    leases = leases_for(client)
    assert leases.register() == 2
    assert sorted(client.lrange(KEYS.task, 0, -1)) == ["held1", "held2"]
    assert client.get(KEYS.heartbeat("h:0")) == leases.token


def test_a_taken_over_worker_notices(redis_server):
    client = redis_server.client()
    leases = leases_for(client)
    leases.register()
    client.set(KEYS.heartbeat("h:0"), "someone-else")
    with pytest.raises(IdentityLost):
        leases.heartbeat()
    with pytest.raises(IdentityLost):
        leases.claim(1)


def test_strays_are_leases_not_held_in_memory(redis_server):
    client = redis_server.client()
    client.lpush(KEYS.task, "a", "b", "b", "c")
    leases = leases_for(client)
    leases.register()
    leases.claim(4)
    assert sorted(leases.strays(["a", "b"])) == ["b", "c"]


def test_retire_returns_everything_and_gives_up_the_identity(redis_server):
    client = redis_server.client()
    client.lpush(KEYS.task, "a", "b")
    leases = leases_for(client)
    leases.register()
    leases.claim(2)
    assert leases.retire() == 2
    assert client.llen(KEYS.task) == 2
    assert not client.exists(KEYS.heartbeat("h:0"))
    assert client.smembers(KEYS.workers) == set()
