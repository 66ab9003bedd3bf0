"""Webdataset output to object storage (an S3 server of the test's own on loopback, signatures checked): shards read
back from the bucket with the webdataset library, exact books after kill -9 during an upload and across a frozen
store, and a bucket that refuses writes stopping the worker at start with one line."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import subprocess
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset

import setting
from laion5b.config import ConfigError, load
from laion5b.imaging import Processed
from laion5b.inputs import Spec, columns_of, count_rows, find_files, read_rows
from laion5b.keys import Keys
from laion5b.leases import Leases
from laion5b.metrics import exposition
from laion5b.objectstore import READ_AHEAD, Bucket, Endpoint, Location, split_url
from laion5b.shards import ShardSink, recover, shard_field, shard_record
from laion5b.stats import read_snapshot
from laion5b.tasks import Task, decode
from tests.helpers import engine_env, kill_add_task_midway, run_script, wait_until, webdataset_env, write_wide
from tests.s3_server import REGION, S3Server
from tests.test_downloader import start_worker
from tools.image_server import image_bytes

KEYS = Keys()
HOST = "testhost"
PREFIX = "run"


@pytest.fixture
def env(script_env: dict[str, str], s3_server: S3Server, tmp_path: Path) -> dict[str, str]:
    staging = tmp_path / "staging"
    return webdataset_env(script_env, **s3_server.environ(PREFIX), LAION_STAGING_DIR=str(staging),
                          LAION_MONITOR_DISK=str(tmp_path))  # fmt: skip


def queue(client, urls: list[str]) -> list[Task]:
    tasks = [Task(f"id{row}", url, "sub", "part.0.parquet", row, f"caption {row}") for row, url in enumerate(urls)]
    client.lpush(KEYS.task, *[task.encode() for task in tasks])
    client.incrby(KEYS.tongji_all, len(tasks))
    return tasks


def bucket_shards(server: S3Server, folder: Path) -> dict[str, dict[str, bytes]]:
    """Every finished shard in the bucket, fetched into ``folder``, read back with the webdataset library: key -> its
    samples (its index, an object beside it, must list exactly its members)."""
    client = server.client()
    folder.mkdir(exist_ok=True)
    objects = server.objects(f"{PREFIX}/")
    tars = sorted(key for key in objects if key.endswith(".tar"))
    assert sorted(key for key in objects if key.endswith(".parquet")) == [tar[:-4] + ".parquet" for tar in tars]
    shards = {}
    for tar in tars:
        local = folder / tar.replace("/", "_")
        client.download_file(server.bucket, tar, str(local))
        samples = list(webdataset.WebDataset([str(local)], shardshuffle=False))
        index = pq.read_table(io.BytesIO(client.get_object(Bucket=server.bucket, Key=tar[:-4] + ".parquet")["Body"]
                                          .read())).to_pylist()  # fmt: skip
        assert sorted(row["key"] for row in index) == sorted(sample["__key__"] for sample in samples)
        shards[tar] = {sample["__key__"]: sample for sample in samples}
    return shards


def assert_exact_books(client, server: S3Server, tasks: list[Task], staging: Path) -> dict[str, str]:
    """Every task ended once: stored ones in exactly one shard in the bucket, the others as one error record; no
    unfinished multipart upload, nothing left in Redis or on the staging disk. Return sample id -> its shard."""
    where: dict[str, str] = {}
    for tar, samples in bucket_shards(server, staging.parent / "fetched").items():
        for sample in samples.values():
            sample_id = json.loads(sample["json"])["id"]
            assert sample_id not in where, f"{sample_id} is in {where.get(sample_id)} and {tar}"
            where[sample_id] = tar
    errors = Counter(json.loads(line)["id"] for line in client.lrange(KEYS.error, 0, -1))
    succeeded, failed = int(client.get(KEYS.tongji_succ) or 0), int(client.get(KEYS.tongji_error) or 0)
    assert succeeded == len(where) and failed == sum(errors.values()) and max(errors.values(), default=1) == 1
    assert succeeded + failed == len(tasks) == int(client.get(KEYS.tongji_all))
    assert not set(where) & set(errors)
    assert int(client.hget(KEYS.host_counters, f"{HOST}:open") or 0) == 0
    assert not client.hgetall(KEYS.shards) and not client.keys(f"{KEYS.task}:kept:*")
    assert server.unfinished_uploads() == []
    assert not [path for path in staging.rglob("*") if path.is_file()]
    return where


def run_until_empty(env: dict[str, str], name: str = "w", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*run_script("downloader.py"), name, "--until-empty"], env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.mark.parametrize("engine", ["threads", "async"])
def test_shards_go_to_the_bucket_and_read_back(env, redis_server, s3_server, image_server, tmp_path, engine) -> None:
    """Shards are uploaded (index and tar objects), read back with webdataset, each sample in one; books exact."""
    client = redis_server.client()
    urls = [image_server.url(f"/img/a{row}.jpg") for row in range(13)] + [image_server.url("/status/404")] * 2
    tasks = queue(client, urls)
    env.update(**engine_env(engine), LAION_SHARD_SIZE="5")
    result = run_until_empty(env)
    assert result.returncode == 0, result.stderr[-3000:]
    where = assert_exact_books(client, s3_server, tasks, tmp_path / "staging")
    assert len(where) == 13 and len(set(where.values())) == 3
    assert all(tar.startswith(f"{PREFIX}/sub/{HOST}-w-") for tar in where.values())


def test_report_reads_the_shard_indexes_from_the_bucket(env, redis_server, s3_server, image_server, tmp_path) -> None:
    """report.py finds each stored row's shard and member through the indexes in the bucket."""
    urls = [image_server.url(f"/img/q{row}.jpg") for row in range(5)] + [image_server.url("/status/404")]
    write_wide(Path(env["LAION_PARQUET_DIR"]) / "s" / "q.parquet", urls)
    env.update(LAION_SHARD_SIZE="2", LAION_STATUS_DIR=str(tmp_path / "status"))
    for script, *args in (("add_task.py",), ("downloader.py", "w", "--until-empty"), ("save_error_task.py",
                          "--until-empty"), ("report.py",)):  # fmt: skip
        result = subprocess.run([*run_script(script), *args], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
    rows = pq.read_table(tmp_path / "status" / "s" / "q.parquet").to_pylist()
    assert [row["status"] for row in rows] == ["success"] * 5 + ["404"]
    shards = bucket_shards(s3_server, tmp_path / "fetched")
    for row in rows[:5]:
        assert row["shard"].startswith(f"s3://{s3_server.bucket}/{PREFIX}/s/") and row["member"] in shards[
            row["shard"].removeprefix(f"s3://{s3_server.bucket}/")]  # fmt: skip
    assert "success 5 (83.3%)" in result.stdout


def test_a_bucket_that_refuses_writes_stops_the_worker_at_start(env, redis_server, s3_server) -> None:
    """A wrong secret: exit 2 at start with one error line naming store_dir, nothing claimed."""
    client = redis_server.client()
    queue(client, ["http://127.0.0.1:9/a.jpg"])
    env["AWS_SECRET_ACCESS_KEY"] = "wrong" + s3_server.secret[5:]
    result = run_until_empty(env, timeout=60)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "ERROR" in line or "error" in line.lower()]
    assert len(lines) == 1 and "store_dir (LAION_STORE_DIR)" in lines[0] and "SignatureDoesNotMatch" in lines[0]
    assert client.llen(KEYS.task) == 1


def test_a_staging_dir_in_a_bucket_is_refused_with_one_line() -> None:
    with pytest.raises(ConfigError, match=r"staging_dir \(LAION_STAGING_DIR\) must be a local folder"):
        load(setting, {"LAION_STORE_DIR": "s3://bucket/run", "LAION_OUTPUT_FORMAT": "webdataset",
                       "LAION_STAGING_DIR": "s3://bucket/staging"})  # fmt: skip


WINDOWS = (
    "prepared",
    "multipart started",
    "index uploaded",
    "both uploaded",
    "gone, index uploaded",
    "multipart started, listing forbidden",
)


@pytest.mark.parametrize("window", WINDOWS)
def test_a_shard_left_half_uploaded_is_recovered_once(
    redis_server, s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: str
) -> None:
    """A worker that dies between preparing a shard in Redis and counting it leaves it to its host's workers: they
    abort its unfinished uploads, upload it from its local files and count it; when those are gone, they count it
    only if both objects are whole in the bucket, else remove what is there and queue its tasks again."""
    client = redis_server.client()
    tasks = [Task(f"id{row}", f"http://127.0.0.1/{row}.jpg", "sub", "p", row, "text") for row in range(4)]
    client.lpush(KEYS.task, *[task.encode() for task in tasks])
    dead = Leases(client, KEYS, HOST, f"{HOST}:dead", 30)
    dead.register()
    claimed = dead.claim(10)
    env = s3_server.environ(PREFIX)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, env[name])
    bucket = Bucket(Location.parse(env["LAION_STORE_DIR"]), Endpoint(s3_server.endpoint, REGION, "path", 5))
    sink = ShardSink(env["LAION_STORE_DIR"], HOST, "dead", f"{HOST}:dead", 4, 600, dead.incarnation,
                     tmp_path / "staging", bucket)  # fmt: skip
    sink.open()
    data = image_bytes("x", "jpg", 3000)
    image = Processed(data, "jpg", None, sha256=hashlib.sha256(data).hexdigest())
    dead.finish([sink.put(decode(raw), raw, image, None) for raw in claimed])
    shard = sink.ready.get(timeout=10)
    field = shard_field(HOST, shard.id)
    assert dead.prepare_shard(shard.id, shard.samples, field, shard_record(shard, dead.owner, dead.worker))
    client.delete(KEYS.heartbeat(dead.worker))  # the worker is dead: its heartbeat expired
    paths = shard.paths()
    if window.startswith("multipart started"):
        bucket.client.create_multipart_upload(Bucket=s3_server.bucket, Key=split_url(paths["tar"])[1])
    if window.endswith("listing forbidden"):  # the key may not list uploads: the shard is counted all the same
        s3_server.deny("s3:ListBucketMultipartUploads")
    if window in ("index uploaded", "gone, index uploaded", "both uploaded", "gone, both"):
        bucket.upload(paths["temp_index"], paths["index"])
    if window in ("both uploaded", "gone, both"):
        bucket.upload(paths["temp_tar"], paths["tar"])
    if window.startswith("gone"):
        Path(paths["temp_tar"]).unlink()
    survivor = Leases(client, KEYS, HOST, f"{HOST}:survivor", 30)
    assert recover(survivor, HOST, bucket=bucket) == 1
    assert recover(survivor, HOST, bucket=bucket) == 0
    counted, queued = int(client.get(KEYS.tongji_succ) or 0), client.llen(KEYS.task)
    objects = sorted(s3_server.objects(f"{PREFIX}/"))
    if window == "gone, index uploaded":
        assert (counted, queued, objects) == (0, 4, [])
    else:
        assert (counted, queued) == (4, 0)
        assert objects == [split_url(paths["index"])[1], split_url(paths["tar"])[1]]
        assert len(bucket_shards(s3_server, tmp_path / "fetched")[objects[1]]) == 4
    left = 1 if window.endswith("listing forbidden") else 0  # left to the lifecycle rule
    assert len(s3_server.unfinished_uploads()) == left
    assert not Path(paths["temp_tar"]).exists() and not Path(paths["temp_index"]).exists()
    assert int(client.hget(KEYS.host_counters, f"{HOST}:open")) == 0 and not client.hgetall(KEYS.shards)
    sink.close()


def test_a_worker_killed_during_a_multipart_upload_leaves_exact_books(
    env, redis_server, s3_server, image_server, tmp_path: Path
) -> None:
    """kill -9 while a shard's multipart upload is under way (the store frozen, so it cannot end): the host's next
    worker aborts it, uploads the shard and counts it once; nothing counted twice or missing, no upload left."""
    client = redis_server.client()
    tasks = queue(client, [image_server.url(f"/huge/2?n={row}") for row in range(12)])  # 4 shards: 4 chances
    env.update(LAION_SHARD_SIZE="3", LAION_S3_PART_MB="5", LAION_THREAD_NUM="2", LAION_MAX_PER_HOST="0")
    worker = start_worker(env, "w")
    wait_until(lambda: s3_server.unfinished_uploads(), timeout=60, interval=0.005)
    s3_server.freeze()
    worker.kill()
    worker.wait()
    s3_server.thaw()
    assert s3_server.unfinished_uploads() and int(client.get(KEYS.tongji_succ) or 0) == 0
    result = run_until_empty(env, "w")  # as systemd restarts it: the dead worker's staging folder is removed at start
    assert result.returncode == 0, result.stderr[-3000:]
    assert "multipart_aborted" in result.stderr and "shard_recovered" in result.stderr
    where = assert_exact_books(client, s3_server, tasks, tmp_path / "staging")
    assert len(where) == 12


def test_a_frozen_store_loses_nothing(env, redis_server, s3_server, image_server, tmp_path: Path) -> None:
    """The store frozen for 6 s mid-run (SIGSTOP; an outage of 30 s behaves the same, only longer): uploads wait,
    claiming stops once 2 shards wait for theirs (the queue is left alone, the staging area stays small), and the
    run finishes with exact books once the store is back."""
    client = redis_server.client()
    tasks = queue(client, [image_server.url(f"/slow/0.2/z{row}.jpg") for row in range(30)])
    env.update(LAION_SHARD_SIZE="2", LAION_THREAD_NUM="2")
    worker = start_worker(env, "w", "--until-empty")
    wait_until(lambda: int(client.get(KEYS.tongji_succ) or 0) > 0)
    s3_server.freeze()
    time.sleep(3)
    queued, in_shards = client.llen(KEYS.task), int(client.hget(KEYS.host_counters, f"{HOST}:open") or 0)
    time.sleep(3)
    assert client.llen(KEYS.task) == queued > 0, "claiming stopped: 2 x 10 downloads a second would have emptied it"
    assert in_shards <= (2 + 1) * 2 + 2 * 2, "2 shards waiting, 1 uploading, and the tasks held when claiming stopped"
    s3_server.thaw()
    assert worker.wait(timeout=90) == 0, worker.stderr.read()[-3000:]
    assert len(assert_exact_books(client, s3_server, tasks, tmp_path / "staging")) == 30


def test_a_store_that_refuses_uploads_is_shown_and_retried(
    env, redis_server, s3_server, image_server, tmp_path
) -> None:
    """Permissions taken away mid-run: uploads fail (AccessDenied), the host shows upload_failing, no image is
    counted as failed; once they are given back, the run finishes with exact books."""
    client = redis_server.client()
    tasks = queue(client, [image_server.url(f"/slow/1/r{row}.jpg") for row in range(6)])
    env.update(LAION_SHARD_SIZE="2", LAION_THREAD_NUM="6")
    worker = start_worker(env, "w", "--until-empty")
    wait_until(lambda: client.exists(KEYS.heartbeat(f"{HOST}:w")))  # past its check of the bucket
    s3_server.revoke()
    snapshot = lambda: read_snapshot(client, KEYS, 3, 60)  # noqa: E731
    wait_until(lambda: [host.state for host in snapshot().hosts] == ["upload_failing"], timeout=30)
    assert snapshot().hosts[0].store_errno == "AccessDenied"
    assert b'laion5b_host_upload_failing{error="AccessDenied",host="testhost"} 1.0' in exposition(snapshot())
    assert int(client.get(KEYS.tongji_error) or 0) == 0 and int(client.get(KEYS.tongji_succ) or 0) == 0
    s3_server.grant()
    assert worker.wait(timeout=90) == 0, worker.stderr.read()[-3000:]
    assert len(assert_exact_books(client, s3_server, tasks, tmp_path / "staging")) == 6


def test_add_task_streams_a_url_list_from_the_bucket_and_resumes_exactly_after_kill_9(
    redis_server, script_env, s3_server, tmp_path: Path
) -> None:
    """parquet_dir = s3://...: add_task.py killed mid-file, run again, queues every row exactly once."""
    rows = 200_000
    local = write_wide(tmp_path / "big.parquet", [f"http://h/{i}.jpg" for i in range(rows)], row_group_size=7_000)
    s3_server.client().upload_file(str(local), s3_server.bucket, "urls/s/big.parquet")
    env = {**script_env, **s3_server.environ(PREFIX), "LAION_PARQUET_DIR": f"s3://{s3_server.bucket}/urls",
           "LAION_ADDTASK_BATCH": "1000"}  # fmt: skip
    env["LAION_STORE_DIR"] = script_env["LAION_STORE_DIR"]
    client = redis_server.client()
    kill_add_task_midway(env, client, rows, "s/big.parquet")
    result = subprocess.run(run_script("add_task.py"), env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = Counter(decode(raw).row for raw in client.lrange(KEYS.task, 0, -1))
    assert len(counts) == rows and set(counts.values()) == {1}
    assert int(client.hget(KEYS.positions, "s/big.parquet")) == rows == int(client.get(KEYS.tongji_all))


def test_a_url_list_in_the_bucket_is_read_in_ranges_never_whole(s3_server, tmp_path: Path, monkeypatch) -> None:
    """The producer's reader fetches a parquet in the bucket by ranges (its footer, then row group by row group):
    no GET larger than a read-ahead of 8 MB, and each byte about once, so memory stays flat whatever the size."""
    rows = 300_000
    urls = [f"http://h/{secrets.token_hex(24)}.jpg" for _ in range(rows)]
    local = write_wide(tmp_path / "big.parquet", urls, row_group_size=20_000)
    s3_server.client().upload_file(str(local), s3_server.bucket, "urls/big.parquet")
    env = s3_server.environ(PREFIX)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, env[name])
    bucket = Bucket(Location.parse(f"s3://{s3_server.bucket}/urls"), Endpoint(s3_server.endpoint, REGION, "path", 5))
    fetched: list[int] = []
    bucket.client.meta.events.register("after-call.s3.GetObject",
                                       lambda parsed, **_: fetched.append(parsed["ContentLength"]))  # fmt: skip
    [source] = find_files(f"s3://{s3_server.bucket}/urls", "auto", bucket)
    assert (source.key, source.subset, source.part) == ("big.parquet", "default", "big")
    picked = columns_of(source, Spec())
    read = [row.url for rows_read in read_rows(source, Spec(), picked, 0, 10_000) for row in rows_read]
    size = local.stat().st_size
    assert read == urls and count_rows(source, Spec()) == rows
    assert size > 2 * READ_AHEAD and max(fetched) <= READ_AHEAD and sum(fetched) < 1.5 * size


def test_files_output_puts_each_image_and_its_sidecars_as_objects(env, redis_server, s3_server, image_server) -> None:
    """output_format files to a bucket: every stored image is an object with its caption and metadata beside it,
    under the keys the files have on disk; books exact; a store that refuses pauses the worker (store_failing EIO)
    and fails no image."""
    client = redis_server.client()
    tasks = queue(client, [image_server.url(f"/slow/0.3/f{row}.jpg") for row in range(8)] + [image_server.url("/x")])
    env.update(LAION_OUTPUT_FORMAT="files", LAION_SAVE_CAPTION="1", LAION_SAVE_METADATA="1", LAION_THREAD_NUM="2")
    worker = start_worker(env, "w", "--until-empty")
    wait_until(lambda: int(client.get(KEYS.tongji_succ) or 0) >= 1)
    s3_server.revoke()
    snapshot = lambda: read_snapshot(client, KEYS, 3, 60)  # noqa: E731
    wait_until(lambda: [(host.state, host.store_errno) for host in snapshot().hosts] == [("store_failing", "EIO")])
    assert int(client.get(KEYS.tongji_error) or 0) == 0
    s3_server.grant()
    assert worker.wait(timeout=90) == 0, worker.stderr.read()[-3000:]
    objects = s3_server.objects(f"{PREFIX}/")
    stored = {key.rpartition("/")[2].partition(".")[0] for key in objects if key.endswith(".jpg")}
    assert stored == {task.id for task in tasks[:8]} and int(client.get(KEYS.tongji_succ)) == 8
    for task in tasks[:8]:
        folder = f"{PREFIX}/sub/part.0.parquet/00000/{task.id}"
        assert {f"{folder}.jpg", f"{folder}.txt", f"{folder}.json"} <= set(objects)
    assert int(client.get(KEYS.tongji_error)) == 1 and not [key for key in objects if "/.probe/" in key]
