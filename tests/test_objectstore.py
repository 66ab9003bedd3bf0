"""Webdataset output to object storage (an S3 server of the test's own on loopback, signatures checked): shards read
back from the bucket with the webdataset library, exact books after kill -9 during an upload and across a frozen
store, and a bucket that refuses writes stopping the worker at start with one line."""

from __future__ import annotations

import io
import json
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset

from laion5b.keys import Keys
from laion5b.tasks import Task
from tests.helpers import ENGINE_IDS, engine_env, run_script, webdataset_env
from tests.s3_server import S3Server

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


@pytest.mark.parametrize("engine", ENGINE_IDS)
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


def test_files_output_to_a_bucket_is_refused_with_one_line(env, redis_server) -> None:
    env["LAION_OUTPUT_FORMAT"] = "files"
    result = run_until_empty(env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "output_format (LAION_OUTPUT_FORMAT)" in result.stderr
