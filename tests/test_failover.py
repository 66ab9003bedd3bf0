"""Sentinel failover mid-run: a master, its replicas and three sentinels; the master is SIGKILLed while the producer
and a webdataset worker run, and both go on with the promoted replica without a restart.

The books are checked twice: by the counters and the shards read back, and by ``reconcile.py check`` (after
``repair`` where duplicates may happen).
"""

from __future__ import annotations

import json
import signal
import subprocess
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laion5b.keys import Keys
from laion5b.tasks import Task
from tests.helpers import engine_env, run_script, wait_until, webdataset_env, write_original
from tests.sentinel_servers import DOWN_AFTER_MS, SentinelSet

KEYS = Keys()
HOST = "testhost"
ROWS = 240
"""Rows of the input file: 1 in 12 fails (404), the others are stored."""
KILL_AFTER = 60
"""Rows ended (stored in a shard or failed) on the first master before it is killed."""
RESUME_TARGET = 2 * DOWN_AFTER_MS / 1000 + 5
"""The issue's target for the time from the kill to the first outcome recorded on the promoted replica."""


@pytest.fixture
def sentinel_set(request, tmp_path: Path) -> Iterator[SentinelSet]:
    """A master with ``request.param`` replicas (1 without a parameter) and three sentinels, stopped by PID."""
    folder = tmp_path / "sentinels"
    folder.mkdir()
    servers = SentinelSet(folder, replicas=getattr(request, "param", 1))
    yield servers
    servers.stop()


def ended(client) -> int:
    """Rows recorded as ended: counted, failed, or stored in a shard not finished yet."""
    values = [*client.mget(KEYS.tongji_succ, KEYS.tongji_error), client.hget(KEYS.host_counters, f"{HOST}:open")]
    return sum(int(value or 0) for value in values)


def shard_samples(store: Path) -> Counter[str]:
    """How many finished shards hold each sample key; each shard's index lists exactly its samples."""
    found: Counter[str] = Counter()
    for tar in sorted(store.glob("*/*.tar")):
        with tarfile.open(tar) as archive:
            keys = {member.name.partition(".")[0] for member in archive.getmembers()}
        assert keys == set(pq.read_table(tar.with_suffix(".parquet")).column("key").to_pylist())
        found.update(keys)
    return found


def reconcile(env: dict[str, str], command: str) -> subprocess.CompletedProcess:
    return subprocess.run([*run_script("reconcile.py"), command], env=env, capture_output=True, text=True, timeout=120)


def check_with_reconcile(env: dict[str, str], duplicates_allowed: bool) -> None:
    """``reconcile.py check`` finds every row exactly one stored sample or one error record; where the set-up allows
    duplicates and check finds problems, ``repair`` makes it so."""
    check = reconcile(env, "check")
    if check.returncode == 1 and duplicates_allowed:
        repair = reconcile(env, "repair")
        assert repair.returncode == 0, repair.stdout + repair.stderr
        check = reconcile(env, "check")
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(
    ("engine", "sentinel_set"),
    [("threads", 1), ("async", 1), ("threads", 2), ("async", 2)],
    ids=["threads-replicas0", "async-replicas0", "threads-replicas1", "async-replicas1"],
    indirect=["sentinel_set"],
)
def test_run_goes_on_after_the_master_is_killed(
    sentinel_set: SentinelSet, script_env, image_server, tmp_path: Path, engine: str
) -> None:
    """Producer and worker follow the failover without a restart; every row ends once; with redis_min_replicas 1
    (two replicas, so that the promoted one still has one) no sample is in two shards."""
    min_replicas = len(sentinel_set.servers) - 2  # 1 replica: 0 (nothing waited for); 2 replicas: 1
    urls = [image_server.url("/status/404" if row % 12 == 5 else f"/slow/0.05/f{row}.jpg") for row in range(ROWS)]
    write_original(tmp_path / "parquet" / "sub" / "part.0.parquet", urls, sample_ids=[f"s{row}" for row in range(ROWS)])
    env = webdataset_env(script_env, **engine_env(engine), **sentinel_set.environ())
    env.update(LAION_SHARD_SIZE="20", LAION_SHARD_MAX_SECONDS="1", LAION_ADDTASK_BATCH="10")
    env.update(LAION_ADDTASK_THRESHOLD="30", LAION_REDIS_MIN_REPLICAS=str(min_replicas))
    env["LAION_HEARTBEAT_TTL"] = "15"  # longer than a failover, as docs/deploy.md asks: else a shard step is fenced
    logs = tmp_path / "logs"
    logs.mkdir()
    producer = subprocess.Popen(run_script("add_task.py"), env=env, stderr=(logs / "add_task.log").open("w"))
    old = sentinel_set.master()
    wait_until(lambda: old.client().llen(KEYS.task) > 0, timeout=60)  # else --until-empty may find nothing to do
    worker = subprocess.Popen([*run_script("downloader.py"), "w", "--until-empty"], env=env,
                              stderr=(logs / "worker.log").open("w"))  # fmt: skip
    wait_until(lambda: ended(old.client()) >= KILL_AFTER, timeout=60)
    killed = time.monotonic()
    old.stop(signal.SIGKILL)
    wait_until(lambda: sentinel_set.master_port() not in (None, old.port), timeout=30)
    switched = time.monotonic() - killed
    new = sentinel_set.master().client()
    at_switch = ended(new)
    wait_until(lambda: ended(new) > at_switch, timeout=30, interval=0.01)
    resumed = time.monotonic() - killed
    print(f"failover engine={engine} min_replicas={min_replicas} switch={switched:.2f}s resume={resumed:.2f}s")
    assert resumed <= RESUME_TARGET, f"outcomes resumed {resumed:.1f} s after the kill"
    assert worker.wait(timeout=90) == 0, (logs / "worker.log").read_text()[-3000:]
    assert producer.wait(timeout=30) == 0, (logs / "add_task.log").read_text()[-3000:]
    assert "redis_unavailable" in (logs / "worker.log").read_text()

    counters = (KEYS.tongji_succ, KEYS.tongji_error, KEYS.tongji_all)
    succeeded, failed, added = (int(value or 0) for value in new.mget(*counters))
    assert succeeded + failed == added == ROWS
    samples = shard_samples(tmp_path / "images")
    errors = Counter(json.loads(record)["row"] for record in new.lrange(KEYS.error, 0, -1))
    stored_rows = {int(key.rpartition("-")[2]) for key in samples}
    assert len(samples) == succeeded and sum(errors.values()) == failed
    assert stored_rows | set(errors) == set(range(ROWS)) and not stored_rows & set(errors), "a row lost or ended twice"
    assert max(errors.values()) == 1
    duplicates = {key: count for key, count in samples.items() if count > 1}
    if min_replicas:
        assert not duplicates, f"samples in two shards: {duplicates}"
    print(f"duplicates={len(duplicates)}")
    assert not new.hgetall(KEYS.shards) and not new.keys(f"{KEYS.task}:kept:*")
    check_with_reconcile(env, duplicates_allowed=not min_replicas)


def test_every_script_finds_the_promoted_master(sentinel_set: SentinelSet, script_env, tmp_path: Path) -> None:
    """After a failover the other scripts (monitor, saver, speed, control, report) reach the promoted replica: their
    environment names only the sentinels."""
    record = json.dumps({"id": "s0", "url": "http://127.0.0.1/x", "subset": "sub", "part": "p", "row": 0,
                         "status": 404, "error_msg": "404", "worker": "w", "ts": 1.0, "record_id": "r0"})  # fmt: skip
    old = sentinel_set.master()
    old.client().lpush(KEYS.error, record)
    wait_until(sentinel_set.replicas_in_sync, timeout=10)
    old.stop(signal.SIGKILL)
    wait_until(lambda: sentinel_set.master_port() not in (None, old.port), timeout=30)
    write_original(tmp_path / "parquet" / "sub" / "p.parquet", ["http://127.0.0.1/x"])  # what report.py reports on
    env = {**script_env, **sentinel_set.environ(), "LAION_STATUS_DIR": str(tmp_path / "status")}
    commands = {
        "monitor_disk": [*run_script("monitor_disk.py"), "--once"],
        "save_error_task": [*run_script("save_error_task.py"), "--until-empty"],
        "speed": [*run_script("speed.py"), "--json"],
        "control": [*run_script("control.py"), "status", "--json"],
        "report": run_script("report.py"),
    }
    running = {name: subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, command in commands.items()}  # fmt: skip
    results = {name: process.communicate(timeout=60) for name, process in running.items()}
    for name, process in running.items():
        assert process.returncode == 0, f"{name}: {results[name][1][-2000:]}"
    new = sentinel_set.master().client()
    assert new.hget(KEYS.tongji_disk, HOST) is not None and new.llen(KEYS.error) == 0
    saved = [line for path in (tmp_path / "error_task").rglob("*") if path.is_file() for line in path.open()]
    assert [json.loads(line)["record_id"] for line in saved] == ["r0"]


def test_an_open_shard_the_worker_does_not_know_is_returned_and_done(redis_server, script_env, image_server) -> None:
    """What a failover that lost a shard's prepare leaves behind: the worker's open shard in Redis, with its kept task,
    that the worker already finished (or never opened). It is returned to the queue and the task is done again."""
    client = redis_server.client()
    worker_id = f"{HOST}:w"
    busy = Task("busy", image_server.url("/slow/3/busy.jpg"), "sub", "p", 0)
    stray = Task("stray", image_server.url("/img/stray.jpg"), "sub", "p", 1)
    client.lpush(KEYS.task, busy.encode())
    client.incrby(KEYS.tongji_all, 2)
    env = webdataset_env(script_env, LAION_HEARTBEAT_TTL="2")
    worker = subprocess.Popen([*run_script("downloader.py"), "w", "--until-empty"], env=env, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    wait_until(lambda: client.llen(KEYS.lease(worker_id)) > 0, timeout=30)
    client.rpush(KEYS.kept_tasks(worker_id, "sub/lost-shard"), stray.encode())
    client.hset(KEYS.kept(worker_id), "sub/lost-shard", HOST)
    client.hincrby(KEYS.host_counters, f"{HOST}:open", 1)
    assert worker.wait(timeout=60) == 0
    assert "stray_shard_returned" in worker.stderr.read()
    assert client.get(KEYS.tongji_succ) == "2" and int(client.hget(KEYS.host_counters, f"{HOST}:open")) == 0
    assert not client.keys(f"{KEYS.task}:kept:*")


def test_a_renamed_shard_whose_commit_was_lost_is_counted_by_its_worker(
    redis_server, script_env, image_server, tmp_path: Path
) -> None:
    """What a failover that lost a shard's commit (not its prepare) leaves behind: a shard of this running worker, its
    files under their final names, still being finished in Redis. The worker counts it; it does not wait to exit."""
    client = redis_server.client()
    worker_id = f"{HOST}:w"
    client.lpush(KEYS.task, Task("busy", image_server.url("/slow/3/busy.jpg"), "sub", "p", 0).encode())
    client.incrby(KEYS.tongji_all, 2)
    env = webdataset_env(script_env, LAION_HEARTBEAT_TTL="2")
    worker = subprocess.Popen([*run_script("downloader.py"), "w", "--until-empty"], env=env, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    wait_until(lambda: client.llen(KEYS.lease(worker_id)) > 0, timeout=30)
    final, temp = tmp_path / "images" / "sub", tmp_path / "images" / ".tmp" / "gone"
    final.mkdir(parents=True, exist_ok=True)
    for suffix in ("tar", "parquet"):
        (final / f"{HOST}-w-000099-0000.{suffix}").write_bytes(b"a shard")
    paths = {"tar": f"{final}/{HOST}-w-000099-0000.tar", "index": f"{final}/{HOST}-w-000099-0000.parquet",
             "temp_tar": f"{temp}/x.tar", "temp_index": f"{temp}/x.parquet"}  # fmt: skip
    token = client.get(KEYS.heartbeat(worker_id))
    record = {"owner": token, "worker": worker_id, "samples": 1, "bytes": 7, **paths}
    field = f"{HOST}|sub/{HOST}-w-000099-0000"
    client.rpush(KEYS.shard_tasks(field), Task("lost", "http://127.0.0.1/x.jpg", "sub", "p", 1).encode())
    client.hset(KEYS.shards, field, json.dumps(record))
    client.hincrby(KEYS.host_counters, f"{HOST}:open", 1)
    assert worker.wait(timeout=60) == 0
    assert "shard_commit_redone" in worker.stderr.read()
    assert client.get(KEYS.tongji_succ) == "2" and int(client.hget(KEYS.host_counters, f"{HOST}:open")) == 0
    assert not client.hgetall(KEYS.shards)


def test_the_password_applies_to_the_sentinels_too(script_env, tmp_path: Path) -> None:
    """Master, replica and sentinels all ask for redis_pass: the scripts authenticate to each."""
    folder = tmp_path / "sentinels"
    folder.mkdir()
    servers = SentinelSet(folder, password="s3cret")
    try:
        env = {**script_env, **servers.environ(), "LAION_REDIS_PASS": "s3cret"}
        result = subprocess.run([*run_script("monitor_disk.py"), "--once"], env=env, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert servers.master().client().hget(KEYS.tongji_disk, HOST) is not None
    finally:
        servers.stop()
