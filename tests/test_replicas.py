"""redis_min_replicas: a count, a shard step or a producer batch returns only once a replica holds it; a write the
replica has not confirmed is sent again, and counted once."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from laion5b.keys import Keys
from laion5b.leases import KEPT, STORED, Leases
from laion5b.redisconn import retrying
from laion5b.replicas import WAIT_MS, NotReplicated
from tests.helpers import wait_until
from tests.redis_server import RedisServer

KEYS = Keys()


@pytest.fixture
def replica(redis_server: RedisServer, tmp_path: Path) -> Iterator[RedisServer]:
    """A replica of the test's redis-server, in sync when the test starts."""
    redis_server.client().config_set("repl-diskless-sync-delay", 0)  # else the first sync waits 5 s
    folder = tmp_path / "replica"
    folder.mkdir()
    server = RedisServer(folder, "--replicaof", "127.0.0.1", str(redis_server.port))
    server.start()
    wait_until(lambda: server.client().info("replication")["master_link_status"] == "up", timeout=10)
    yield server
    server.stop(signal.SIGKILL)  # also when the test left it stopped (SIGSTOP)


def worker_leases(redis_server: RedisServer, min_replicas: int) -> Leases:
    leases = Leases(redis_server.client(), KEYS, "h", "h:w", 60, min_replicas)
    leases.register()
    return leases


@contextlib.contextmanager
def stopped(replica: RedisServer, leases: Leases) -> Iterator[None]:
    """The replica stopped (SIGSTOP) meanwhile; the leases wait 300 ms for it instead of 2 s."""
    assert replica.process is not None
    os.kill(replica.process.pid, signal.SIGSTOP)
    leases.replicas.wait_ms = 300
    try:
        yield
    finally:
        os.kill(replica.process.pid, signal.SIGCONT)
        leases.replicas.wait_ms = WAIT_MS


def test_an_outcome_returns_only_once_the_replica_holds_it(redis_server, replica) -> None:
    leases = worker_leases(redis_server, 1)
    redis_server.client().lpush(KEYS.task, "t1", "t2")
    assert leases.claim(2) == ["t1", "t2"]
    with stopped(replica, leases), pytest.raises(NotReplicated):
        leases.finish([(STORED, "t1", 10)])
    assert redis_server.client().get(KEYS.tongji_succ) == "1"  # on the master, but its caller was not told
    assert leases.finish([(STORED, "t1", 10)]) == 0  # sent again: found done, counted once
    assert leases.finish([(STORED, "t2", 10)]) == 1
    assert replica.client().get(KEYS.tongji_succ) == "2"  # every call that returned is on the replica already


def test_without_min_replicas_nothing_waits_for_the_replica(redis_server, replica) -> None:
    leases = worker_leases(redis_server, 0)
    redis_server.client().lpush(KEYS.task, "t1")
    assert leases.claim(1) == ["t1"]
    with stopped(replica, leases):
        assert leases.finish([(STORED, "t1", 10)]) == 1


def test_a_shard_is_not_prepared_for_its_rename_before_the_replica_holds_it(redis_server, replica) -> None:
    """ShardSink.finish renames a shard's files only once prepare_shard returned: never on an unconfirmed prepare."""
    leases = worker_leases(redis_server, 1)
    redis_server.client().lpush(KEYS.task, "t1")
    leases.claim(1)
    leases.finish([(KEPT, "t1", "sub/s0")])
    with stopped(replica, leases), pytest.raises(NotReplicated):
        leases.prepare_shard("sub/s0", 1, "h|sub/s0", "{}")
    assert leases.prepare_shard("sub/s0", 1, "h|sub/s0", "{}")  # sent again: found prepared with this record
    assert leases.commit_shard("h|sub/s0", "h", 10) == 1
    assert replica.client().get(KEYS.tongji_succ) == "1"


def test_a_master_refusing_writes_for_want_of_replicas_is_waited_for(redis_server, replica) -> None:
    """min-replicas-to-write on the master (docs/deploy.md): a write refused with NOREPLICAS is tried again until
    the replica is back, as when Redis is unreachable."""
    master = redis_server.client()
    master.config_set("min-replicas-to-write", 1)
    master.config_set("min-replicas-max-lag", 1)
    wait_until(lambda: master.info("replication")["min_slaves_good_slaves"] == 1, timeout=10)
    leases = worker_leases(redis_server, 0)
    master.lpush(KEYS.task, "t1")
    leases.claim(1)
    assert replica.process is not None
    os.kill(replica.process.pid, signal.SIGSTOP)
    wait_until(lambda: master.info("replication")["min_slaves_good_slaves"] == 0, timeout=10)
    threading.Timer(1.0, os.kill, (replica.process.pid, signal.SIGCONT)).start()
    started = time.monotonic()
    assert retrying(lambda: leases.finish([(STORED, "t1", 10)]), "finish") == 1
    assert time.monotonic() - started >= 0.9 and master.get(KEYS.tongji_succ) == "1"
