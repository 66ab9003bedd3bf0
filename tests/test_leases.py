"""The reliable queue's scripts against a real Redis."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from laion5b.keys import Keys
from laion5b.leases import (
    FAILED,
    NAMESPACE,
    PROMOTE_BATCH,
    RETURN,
    STORED,
    IdentityInUse,
    IdentityLost,
    Leases,
    Owner,
    retry_outcome,
)

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
    outcomes = [
        (STORED, "a", 100),
        (FAILED, "b", '{"status":404}'),
        retry_outcome("c", "c-again", 60),
        (RETURN, "d", ""),
    ]
    assert leases.finish(outcomes) == 4
    assert counters(client) == (1, 1, 100)
    assert client.lrange(KEYS.error, 0, -1) == ['{"status":404}']
    assert client.lrange(KEYS.task, 0, -1) == ["d"]
    assert [member.partition("|")[2] for member in client.zrange(KEYS.delayed, 0, -1)] == ["c-again"]
    assert client.llen(KEYS.lease("h:0")) == 0
    assert client.hgetall(KEYS.host_counters) == {"h:succ": "1", "h:bytes": "100", "h:error": "1"}
    assert leases.finish(outcomes) == 0, "a second recording of the same outcomes must change nothing"
    assert counters(client) == (1, 1, 100)
    assert client.zcard(KEYS.delayed) == 1


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
    dead = Owner("h", 4_000_000, 12.0, NAMESPACE, "0" * 16)
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


def redis_now(client) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def delayed_tasks(client) -> list[tuple[str, float]]:
    """(task, due) of every member of the delayed set, its nonce stripped."""
    return [(member.partition("|")[2], due) for member, due in client.zrange(KEYS.delayed, 0, -1, withscores=True)]


def test_a_retry_waits_in_the_delayed_set_due_by_the_redis_clock(redis_server):
    client = redis_server.client()
    client.lpush(KEYS.task, "a")
    leases = leases_for(client)
    leases.register()
    leases.claim(1)
    before = redis_now(client)
    assert leases.finish([retry_outcome("a", "a-again", 30)]) == 1
    after = redis_now(client)
    [(task, due)] = delayed_tasks(client)
    assert task == "a-again" and before + 30 <= due + 1e-3 and due <= after + 30 + 1e-3
    assert client.llen(KEYS.task) == 0 and client.llen(KEYS.lease("h:0")) == 0
    assert leases.claim(5) == [], "not due yet"
    leases.heartbeat()
    assert client.llen(KEYS.task) == 0 and client.zcard(KEYS.delayed) == 1


def test_a_due_retry_is_claimed_next_without_its_nonce(redis_server):
    client = redis_server.client()
    client.lpush(KEYS.task, "a", "b", "c")
    leases = leases_for(client)
    leases.register()
    assert leases.claim(1) == ["a"]
    leases.finish([retry_outcome("a", "a-again", 0.3)])
    assert leases.claim(1) == ["b"], "the retry waits"
    time.sleep(0.35)
    assert leases.claim(1) == ["a-again"], "a due retry is taken before the rest of the queue"
    assert leases.claim(5) == ["c"]
    assert client.zcard(KEYS.delayed) == 0


def test_the_longest_overdue_retry_comes_first(redis_server):
    client = redis_server.client()
    client.lpush(KEYS.task, "x", "y")
    leases = leases_for(client)
    leases.register()
    leases.claim(2)
    leases.finish([retry_outcome("x", "x-again", 0.2), retry_outcome("y", "y-again", 0.1)])
    time.sleep(0.25)
    assert leases.claim(5) == ["y-again", "x-again"]


def test_equal_tasks_stay_apart_in_the_delayed_set(redis_server):
    client = redis_server.client()
    client.lpush(KEYS.task, "same", "same")
    leases = leases_for(client)
    leases.register()
    leases.claim(2)
    assert leases.finish([retry_outcome("same", "same|again", 0), retry_outcome("same", "same|again", 0)]) == 2
    assert leases.claim(5) == ["same|again", "same|again"], "two members, each stripped of its nonce only"


def test_a_retry_sent_twice_is_recorded_once(redis_server):
    """A lost reply makes the worker send its batch again: the second recording must not add a second retry."""
    client = redis_server.client()
    client.lpush(KEYS.task, "a")
    leases = leases_for(client)
    leases.register()
    leases.claim(1)
    outcome = retry_outcome("a", "a-again", 60)
    assert leases.finish([outcome]) == 1
    assert leases.finish([outcome]) == 0
    assert leases.finish([retry_outcome("a", "a-again", 60)]) == 0
    assert client.zcard(KEYS.delayed) == 1


def test_due_retries_move_on_a_heartbeat_in_bounded_batches(redis_server):
    client = redis_server.client()
    client.zadd(KEYS.delayed, {f"{i:04x}|t{i}": 1.0 for i in range(PROMOTE_BATCH + 5)})
    client.zadd(KEYS.delayed, {"later|t-later": redis_now(client) + 60})
    leases = leases_for(client)
    leases.register()
    leases.heartbeat()
    assert client.llen(KEYS.task) == PROMOTE_BATCH and client.zcard(KEYS.delayed) == 6
    leases.heartbeat()
    assert client.llen(KEYS.task) == PROMOTE_BATCH + 5
    assert [task for task, _ in delayed_tasks(client)] == ["t-later"]
    assert sorted(client.lrange(KEYS.task, 0, -1)) == sorted(f"t{i}" for i in range(PROMOTE_BATCH + 5))


def test_a_worker_dying_after_its_retry_loses_nothing(redis_server):
    client = redis_server.client()
    client.lpush(KEYS.task, "a", "b")
    doomed = leases_for(client, "h:doomed")
    doomed.register()
    doomed.claim(2)
    doomed.finish([retry_outcome("a", "a-again", 0.1)])
    client.delete(KEYS.heartbeat("h:doomed"))
    survivor = leases_for(client, "h:survivor")
    survivor.register()
    assert survivor.reap() == 1
    time.sleep(0.15)
    assert sorted(survivor.claim(5)) == ["a-again", "b"]
    assert client.zcard(KEYS.delayed) == 0 and client.llen(KEYS.task) == 0
    assert doomed.finish([(STORED, "b", 1)]) == 0, "the dead worker's late outcome is not counted"
