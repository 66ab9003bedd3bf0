"""Fenced ownership (issue 17, findings 6-8): a stale incarnation records nothing, a paused worker that comes back
after its replacement started writes nothing, two shard recoverers racing keep the books exact, a drain holds."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from laion5b import shards
from laion5b.control import EXIT_DRAINED
from laion5b.imaging import Processed
from laion5b.keys import Keys
from laion5b.leases import KEPT, NAMESPACE, STORED, IdentityInUse, IdentityLost, Leases, Owner
from laion5b.shards import ShardSink, recover, shard_field, shard_record
from laion5b.tasks import Task, decode
from tests.helpers import run_script, start_logged_worker, wait_until, webdataset_env
from tests.test_webdataset import assert_exact_books, finished_shards, queue, read_shard
from tools.image_server import image_bytes

KEYS = Keys()
HOST = "testhost"
TTL = 2


def counted(client) -> int:
    return int(client.get(KEYS.tongji_succ) or 0)


def test_an_exchange_from_a_stale_incarnation_records_nothing(redis_server) -> None:
    """The old process of an identity whose heartbeat expired comes back after a new one took the identity: its
    outcomes, kept samples and shard steps are refused before anything is recorded."""
    client = redis_server.client()
    client.lpush(KEYS.task, *[f"t{i}" for i in range(4)])
    old = Leases(client, KEYS, HOST, f"{HOST}:w", TTL)
    old.register()
    held = old.claim(4)
    client.delete(KEYS.heartbeat(old.worker))  # its heartbeat expired (the process was paused)
    new = Leases(client, KEYS, HOST, f"{HOST}:w", TTL)
    assert new.register() == 4, "the predecessor's leases return to the queue at once"
    assert sorted(new.claim(4)) == sorted(held), "the new process holds the very same tasks, in the same lease list"
    with pytest.raises(IdentityLost):
        old.finish([(STORED, held[0], 100), (KEPT, held[1], "sub/shard")])
    with pytest.raises(IdentityLost):
        old.prepare_shard("sub/shard", 1, shard_field(HOST, "sub/shard"), "{}")
    with pytest.raises(IdentityLost):
        old.commit_shard(shard_field(HOST, "sub/shard"), HOST, 100)
    with pytest.raises(IdentityLost):
        old.heartbeat()
    assert counted(client) == 0 and not client.keys(f"{KEYS.task}:kept:*") and not client.hgetall(KEYS.shards)
    assert sorted(client.lrange(KEYS.lease(new.worker), 0, -1)) == sorted(held)
    assert new.finish([(STORED, task, 1) for task in held]) == 4 and counted(client) == 4
    assert old.owner.incarnation != new.owner.incarnation and len(new.owner.incarnation) == 16


def test_register_takes_an_expired_identity_and_refuses_a_live_one_of_another_namespace(redis_server) -> None:
    """A live heartbeat whose PID is free here is not proof of death when it comes from another PID namespace (a
    container sharing the host_id); once it expires the identity is taken, and its holder is fenced out."""
    client = redis_server.client()
    elsewhere = Owner(HOST, 4_000_000, 12.0, "0badb007.4026530000", "f" * 16)
    client.set(KEYS.heartbeat(f"{HOST}:w"), elsewhere.token(), ex=TTL)
    client.lpush(KEYS.lease(f"{HOST}:w"), "held")
    with pytest.raises(IdentityInUse):
        Leases(client, KEYS, HOST, f"{HOST}:w", TTL).register()
    here = Owner(HOST, 4_000_000, 12.0, NAMESPACE, "e" * 16)
    client.set(KEYS.heartbeat(f"{HOST}:w"), here.token(), ex=TTL)
    assert Leases(client, KEYS, HOST, f"{HOST}:w", TTL).register() == 1, "a free PID of this namespace is dead"
    assert client.lrange(KEYS.task, 0, -1) == ["held"]
    client.delete(KEYS.heartbeat(f"{HOST}:w"), KEYS.task)
    client.lpush(KEYS.task, "t")
    stale = Leases(client, KEYS, HOST, f"{HOST}:w", TTL)
    stale.register()
    stale.claim(1)
    wait_until(lambda: not client.exists(KEYS.heartbeat(f"{HOST}:w")), TTL + 2)
    successor = Leases(client, KEYS, HOST, f"{HOST}:w", TTL)
    assert successor.register() == 1
    with pytest.raises(IdentityLost):
        stale.finish([(STORED, "t", 1)])
    assert counted(client) == 0 and client.lrange(KEYS.task, 0, -1) == ["t"]


def prepared_shard(client, store: Path) -> ShardSink:
    """A worker that prepared a shard of 5 samples in Redis and died before renaming it (its heartbeat gone)."""
    tasks = [Task(f"id{row}", f"http://127.0.0.1/{row}.jpg", "sub", "p", row, "text") for row in range(5)]
    client.lpush(KEYS.task, *[task.encode() for task in tasks])
    client.incrby(KEYS.tongji_all, len(tasks))
    dead = Leases(client, KEYS, HOST, f"{HOST}:dead", 30)
    dead.register()
    sink = ShardSink(store, HOST, "dead", dead.worker, 5, 600, dead.incarnation)
    sink.open()
    data = image_bytes("x", "jpg", 3000)
    image = Processed(data, "jpg", None, sha256=hashlib.sha256(data).hexdigest())
    dead.finish([sink.put(decode(raw), raw, image, None) for raw in dead.claim(10)])
    shard = sink.ready.get(timeout=10)
    field = shard_field(HOST, shard.id)
    assert dead.prepare_shard(shard.id, shard.samples, field, shard_record(shard, dead.owner, dead.worker))
    client.delete(KEYS.heartbeat(dead.worker))
    return sink


def test_two_recoverers_racing_on_one_shard(redis_server, tmp_path: Path, monkeypatch) -> None:
    """The first recoverer stalls inside its rename of the index until its lock expired; the second takes the lock
    and stalls inside its rename of the tar; then the first goes on, then the second. Never a tar without its
    index, and counted + queued = samples, each sample once."""
    client = redis_server.client()
    sink = prepared_shard(client, tmp_path / "store")
    monkeypatch.setattr(shards, "RECOVERY_LOCK_SECONDS", 1)
    rename = os.rename
    first_inside, second_inside, first_done = threading.Event(), threading.Event(), threading.Event()
    calls: dict[str, int] = {}

    def barrier_rename(source, target) -> None:
        name = threading.current_thread().name
        calls[name] = calls.get(name, 0) + 1
        if name == "first" and calls[name] == 1:
            first_inside.set()
            assert second_inside.wait(20)
        elif name == "second" and calls[name] == 2:
            second_inside.set()
            assert first_done.wait(20)
        rename(source, target)

    monkeypatch.setattr(os, "rename", barrier_rename)
    results: dict[str, int] = {}

    def run(name: str, wait: float) -> None:
        try:
            results[name] = recover(Leases(client, KEYS, HOST, f"{HOST}:{name}", 30), HOST, wait)
        finally:
            if name == "first":
                first_done.set()

    first = threading.Thread(target=run, args=("first", 0.0), name="first")
    first.start()
    assert first_inside.wait(10)
    time.sleep(1.5)  # the first recoverer's lock expires while it is stuck in the rename
    second = threading.Thread(target=run, args=("second", 10.0), name="second")
    second.start()
    first.join(30)
    second.join(30)
    monkeypatch.setattr(os, "rename", rename)
    assert not first.is_alive() and not second.is_alive() and second_inside.is_set()
    tars = finished_shards(tmp_path / "store")
    assert all(tar.with_suffix(".parquet").exists() for tar in tars), "a tar without its index"
    queued = client.llen(KEYS.task)
    in_shards = sum(len(read_shard(tar)) for tar in tars)
    assert counted(client) + queued == 5 and counted(client) == in_shards, (counted(client), queued, in_shards)
    assert not client.hgetall(KEYS.shards) and int(client.hget(KEYS.host_counters, f"{HOST}:open")) == 0
    assert sum(results.values()) == 1, results
    sink.close()


@pytest.fixture
def env(script_env: dict[str, str]) -> dict[str, str]:
    return webdataset_env(script_env, LAION_THREAD_NUM="6", LAION_HEARTBEAT_TTL=str(TTL), LAION_SHARD_SIZE="15")


def test_a_paused_worker_coming_back_after_its_replacement_writes_nothing(
    env, redis_server, image_server, tmp_path: Path
) -> None:
    """SIGSTOP a worker for longer than heartbeat_ttl, start its replacement under the same name, SIGCONT the old
    one: the old one exits without recording an outcome or finishing a shard; every sample is in one finished
    shard and counted once."""
    client = redis_server.client()
    urls = [image_server.url(f"/slow/0.3/p{row}.jpg") for row in range(150)]
    tasks = queue(client, urls + [image_server.url("/status/404")] * 10)
    store, old_log, new_log = tmp_path / "images", tmp_path / "old.log", tmp_path / "new.log"
    old = start_logged_worker(env, old_log)
    wait_until(lambda: counted(client) >= 15 and int(client.hget(KEYS.host_counters, f"{HOST}:open") or 0) > 0)
    old_owner = Owner.parse(client.get(KEYS.heartbeat(f"{HOST}:w")))
    assert old_owner is not None
    os.kill(old.pid, signal.SIGSTOP)
    stopped_at = old_log.stat().st_size
    finished_before = {tar.name for tar in finished_shards(store)}
    try:
        wait_until(lambda: not client.exists(KEYS.heartbeat(f"{HOST}:w")), TTL + 5)
        new = start_logged_worker(env, new_log, "w", "--until-empty")
        wait_until(lambda: client.get(KEYS.heartbeat(f"{HOST}:w")) not in (None, old_owner.token()), 30)
        wait_until(lambda: client.llen(KEYS.lease(f"{HOST}:w")) > 0, 30)
    finally:
        os.kill(old.pid, signal.SIGCONT)
    assert old.wait(30) != 0
    after = old_log.read_text()[stopped_at:]
    assert "worker_fenced" in after and "identity_lost" in after, after[-3000:]
    assert not re.search(r"shard_finished|shard_discarded|shards_unfinished|lease_lost", after), after[-3000:]
    assert new.wait(120) == 0, new_log.read_text()[-3000:]
    touched = re.findall(r"(?:lease_lost|shard_discarded) [^\n]*", new_log.read_text())
    assert not touched, f"the old process recorded outcomes of its successor's tasks: {touched}"
    stored = assert_exact_books(client, store, tasks)
    assert len(stored) == 150
    recovered = set(re.findall(r"shard_recovered shard=\S*/([^/\s]+\.tar)", new_log.read_text()))
    old_shards = {tar.name for tar in finished_shards(store) if old_owner.incarnation[:8] in tar.name}
    assert old_shards <= finished_before | recovered, "the old process finished no shard after the pause"


def test_a_drained_worker_restarted_exits_again_until_resume(script_env, redis_server) -> None:
    """systemd restarts a drained worker that crashed (Restart=always): it sees the drain and exits 3 again."""
    env = {**script_env, "LAION_HEARTBEAT_TTL": str(TTL)}
    drain = subprocess.run([*run_script("control.py"), "drain", "--worker", f"{HOST}:w"], env=env, capture_output=True)
    assert drain.returncode == 0
    for _ in range(2):
        result = subprocess.run(
            [*run_script("downloader.py"), "w"], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == EXIT_DRAINED, result.stderr[-3000:]
    assert subprocess.run([*run_script("control.py"), "resume", "--worker", f"{HOST}:w"], env=env).returncode == 0
    result = subprocess.run([*run_script("downloader.py"), "w", "--until-empty"], env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_shard_prepared_by_an_older_release_is_recovered(redis_server, tmp_path: Path) -> None:
    """A record written before records named their worker (a rolling upgrade) is recovered, not a crash."""
    client = redis_server.client()
    sink = prepared_shard(client, tmp_path / "store")
    [(field, text)] = client.hgetall(KEYS.shards).items()
    record = json.loads(text)
    del record["worker"]
    client.hset(KEYS.shards, field, json.dumps({**record, "owner": f"{HOST}|1@1.00"}))
    assert recover(Leases(client, KEYS, HOST, f"{HOST}:survivor", 30), HOST) == 1
    assert counted(client) == 5 and len(finished_shards(tmp_path / "store")) == 1 and not client.hgetall(KEYS.shards)
    sink.close()


def test_a_temporary_folder_claimed_by_a_live_heartbeat_is_kept(script_env, redis_server, tmp_path: Path) -> None:
    """A worker of another PID namespace (a container sharing host_id and store_dir) has a PID that looks free
    here: its temporary folder stays while its heartbeat lives; a dead worker's folder goes."""
    client = redis_server.client()
    root = tmp_path / "images" / ".tmp" / HOST
    for folder in ("elsewhere.4000000", "dead.4000001"):
        (root / folder).mkdir(parents=True)
        (root / folder / "open.tar").write_bytes(b"half")
    other = Owner(HOST, 4_000_000, 12.0, "0badb007.4026530000", "f" * 16)
    client.set(KEYS.heartbeat(f"{HOST}:elsewhere"), other.token(), ex=30)
    env = {**script_env, "LAION_OUTPUT_FORMAT": "webdataset"}
    result = subprocess.run([*run_script("downloader.py"), "w", "--until-empty"], env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in root.iterdir()) == ["elsewhere.4000000"]
