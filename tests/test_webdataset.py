"""Webdataset output: shards read back by the webdataset library and by tarfile, shards closed on pause and stop,
killed workers, and every crash window of a shard's finish recovered with exact books."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import re
import signal
import subprocess
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset

from laion5b.imaging import Processed
from laion5b.keys import Keys
from laion5b.leases import FAILED, KEPT, Leases, Owner
from laion5b.shards import (
    TAR_END,
    ShardSink,
    move_into_place,
    recover,
    shard_field,
    shard_record,
    tar_header,
    tar_member,
)
from laion5b.tasks import Task, decode
from tests.helpers import ENGINE_IDS, engine_env, run_script, wait_until, webdataset_env
from tests.test_downloader import start_worker
from tools.image_server import image_bytes

KEYS = Keys()
HOST = "testhost"


@pytest.fixture
def env(script_env: dict[str, str]) -> dict[str, str]:
    return webdataset_env(script_env)


def queue(client, urls: list[str], first_row: int = 0) -> list[Task]:
    """Queue one task per URL with a caption and a saved column, as add_task.py would."""
    tasks = [
        Task(f"id{row}", url, "sub", "part.0.parquet", row, f"caption {row} été", meta={"similarity": row / 100})
        for row, url in enumerate(urls, first_row)
    ]
    client.lpush(KEYS.task, *[task.encode() for task in tasks])
    client.incrby(KEYS.tongji_all, len(tasks))
    return tasks


def finished_shards(store: Path) -> list[Path]:
    return sorted(path for path in store.glob("*/*.tar"))


def read_shard(tar: Path) -> dict[str, dict[str, bytes]]:
    """The samples of a finished shard by key, read with tarfile; its index must list exactly its members."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as archive:
        for member in archive.getmembers():
            key, _, extension = member.name.partition(".")
            file = archive.extractfile(member)
            assert file is not None
            samples.setdefault(key, {})[extension] = file.read()
    index = pq.read_table(tar.with_suffix(".parquet")).to_pylist()
    assert {row["key"]: sorted(row["members"]) for row in index} == {
        key: sorted(f"{key}.{extension}" for extension in files) for key, files in samples.items()
    }
    return samples


def assert_exact_books(client, store: Path, tasks: list[Task]) -> dict[str, dict[str, bytes]]:
    """Every task ended once: stored ones in exactly one finished shard, the others as one error record."""
    stored: dict[str, dict[str, bytes]] = {}
    for tar in finished_shards(store):
        for key, files in read_shard(tar).items():
            assert key not in stored, f"{key} is in two shards"
            stored[key] = files
    errors = Counter(json.loads(line)["id"] for line in client.lrange(KEYS.error, 0, -1))
    succeeded, failed = int(client.get(KEYS.tongji_succ) or 0), int(client.get(KEYS.tongji_error) or 0)
    assert succeeded == len(stored) and failed == sum(errors.values())
    assert succeeded + failed == len(tasks) == int(client.get(KEYS.tongji_all))
    stored_ids = {json.loads(files["json"])["id"] for files in stored.values()}
    assert not stored_ids & set(errors) and max(errors.values(), default=1) == 1
    assert int(client.hget(KEYS.host_counters, f"{HOST}:open") or 0) == 0
    assert not client.hgetall(KEYS.shards) and not client.keys(f"{KEYS.task}:kept:*")
    assert not [path for path in (store / ".tmp").rglob("*") if path.is_file()]
    return stored


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_shards_read_back_with_webdataset(env, redis_server, image_server, tmp_path: Path, engine: str) -> None:
    """Images (some resized), captions and metadata land in shards of shard_size that webdataset reads back."""
    client = redis_server.client()
    urls = [image_server.url(f"/img/a{row}.{'png' if row % 4 else 'jpg'}") for row in range(18)]
    urls += [image_server.url("/photo/300x200.jpg")] * 4 + [image_server.url("/status/404")] * 4
    urls += [image_server.url("/photo/40x10.jpg")] * 2
    tasks = queue(client, urls)
    env.update(**engine_env(engine), LAION_SHARD_SIZE="10", LAION_RESIZE_MODE="center_crop", LAION_IMAGE_SIZE="8")
    env["LAION_MAX_ASPECT_RATIO"] = "3"
    result = subprocess.run([*run_script("downloader.py"), "w", "--until-empty"], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    store = tmp_path / "images"
    stored = assert_exact_books(client, store, tasks)
    shards = finished_shards(store)
    incarnation = r"-[0-9a-f]{8}\.tar"
    names = [re.sub(incarnation, ".tar", path.name) for path in shards]
    assert names == [f"{HOST}-w-{seq:06d}.tar" for seq in range(3)]
    assert len({re.search(incarnation, path.name)[0] for path in shards}) == 1, "one process: one incarnation"
    read = list(webdataset.WebDataset([str(path) for path in shards], shardshuffle=False))
    assert len(read) == len(stored) == 22
    statuses = Counter(json.loads(line)["status"] for line in client.lrange(KEYS.error, 0, -1))
    assert statuses == {404: 4, "bad_aspect": 2}
    for sample in read:
        metadata = json.loads(sample["json"])
        task = tasks[int(metadata["id"][2:])]
        image = sample[metadata["ext"]]
        assert sample["__key__"] == metadata["key"] == f"part_0_parquet-{task.row:09d}"
        assert sample["txt"].decode() == task.text == metadata["caption"]
        assert metadata["sha256"] == hashlib.sha256(image).hexdigest() and metadata["bytes"] == len(image)
        assert (metadata["url"], metadata["similarity"], metadata["attempts"]) == (task.url, task.row / 100, 1)
        assert (metadata["width"], metadata["height"]) == (8, 8)
        if "photo" in task.url:
            assert (metadata["original_width"], metadata["original_height"]) == (300, 200)


def test_stop_and_pause_close_the_open_shard(env, redis_server, image_server, tmp_path: Path) -> None:
    """A shard far from full is finished when the worker is paused and when it stops, slow downloads in flight."""
    client = redis_server.client()
    fast = [image_server.url(f"/img/f{row}.jpg") for row in range(6)]
    tasks = queue(client, fast + [image_server.url(f"/slow/2/s{row}.jpg") for row in range(6)])
    env.update(LAION_SHARD_SIZE="1000", LAION_THREAD_NUM="4")
    worker = start_worker(env, "w")
    open_samples = lambda: int(client.hget(KEYS.host_counters, f"{HOST}:open") or 0)  # noqa: E731
    wait_until(lambda: open_samples() >= 4)
    assert int(client.get(KEYS.tongji_succ) or 0) == 0  # stored, not counted until its shard is finished
    subprocess.run([*run_script("control.py"), "pause"], env=env, check=True, capture_output=True)
    wait_until(lambda: json.loads(client.hget(KEYS.control_acks, f"{HOST}:w") or "{}").get("state") == "paused")
    paused_count = int(client.get(KEYS.tongji_succ))
    assert paused_count >= 4 and open_samples() == 0 and len(finished_shards(tmp_path / "images")) == 1
    subprocess.run([*run_script("control.py"), "resume"], env=env, check=True, capture_output=True)
    wait_until(lambda: int(client.get(KEYS.tongji_succ)) + open_samples() > paused_count)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    queued = client.llen(KEYS.task)
    assert open_samples() == 0 and int(client.get(KEYS.tongji_succ)) + queued == len(tasks)
    assert len(finished_shards(tmp_path / "images")) == 2
    subprocess.run([*run_script("downloader.py"), "w", "--until-empty"], env=env, check=True, capture_output=True)
    assert len(assert_exact_books(client, tmp_path / "images", tasks)) == len(tasks)


def test_killed_worker_loses_its_open_shard_not_its_tasks(env, redis_server, image_server, tmp_path: Path) -> None:
    client = redis_server.client()
    tasks = queue(client, [image_server.url(f"/img/k{row}.jpg") for row in range(8)])
    tasks += queue(client, [image_server.url(f"/slow/4/k{row}.jpg") for row in range(8, 10)], first_row=8)
    env["LAION_SHARD_SIZE"] = "1000"
    worker = start_worker(env, "w")
    wait_until(lambda: int(client.hget(KEYS.host_counters, f"{HOST}:open") or 0) == 8)
    worker.kill()
    worker.wait()
    assert not finished_shards(tmp_path / "images") and int(client.get(KEYS.tongji_succ) or 0) == 0
    result = subprocess.run([*run_script("downloader.py"), "w", "--until-empty"], env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "returned_from_predecessor=10" in result.stderr
    assert len(assert_exact_books(client, tmp_path / "images", tasks)) == 10


WINDOWS = ("prepared", "index renamed", "tar renamed", "files gone")


@pytest.mark.parametrize("window", WINDOWS)
def test_a_shard_left_half_finished_is_recovered(redis_server, tmp_path: Path, window: str) -> None:
    """A worker that dies between preparing a shard in Redis and counting it leaves it to its host's workers: they
    rename what is left and count it, or queue its tasks again when its files are gone."""
    client = redis_server.client()
    tasks = [Task(f"id{row}", f"http://127.0.0.1/{row}.jpg", "sub", "p", row, "text") for row in range(5)]
    client.lpush(KEYS.task, *[task.encode() for task in tasks])
    dead = Leases(client, KEYS, HOST, f"{HOST}:dead", 30)
    dead.register()
    claimed = dead.claim(10)
    sink = ShardSink(tmp_path / "store", HOST, "dead", f"{HOST}:dead", 5, 600, dead.incarnation)
    sink.open()
    data = image_bytes("x", "jpg", 3000)
    image = Processed(data, "jpg", None, sha256=hashlib.sha256(data).hexdigest())
    dead.finish([sink.put(decode(raw), raw, image, None) for raw in claimed])
    shard = sink.ready.get(timeout=10)
    assert shard.error is None and shard.samples == 5
    field = shard_field(HOST, shard.id)
    assert dead.prepare_shard(shard.id, shard.samples, field, shard_record(shard, dead.owner, dead.worker))
    client.delete(KEYS.heartbeat(dead.worker))  # the worker is dead: its heartbeat expired
    paths = shard.paths()
    if window == "index renamed":
        Path(paths["temp_index"]).rename(paths["index"])
    elif window == "tar renamed":
        move_into_place(paths)
    elif window == "files gone":
        Path(paths["temp_index"]).rename(paths["index"])
        Path(paths["temp_tar"]).unlink()
    assert int(client.get(KEYS.tongji_succ) or 0) == 0 and client.llen(KEYS.task) == 0
    survivor = Leases(client, KEYS, HOST, f"{HOST}:survivor", 30)
    assert recover(survivor, HOST) == 1
    assert recover(survivor, HOST) == 0
    counted, queued = int(client.get(KEYS.tongji_succ) or 0), client.llen(KEYS.task)
    tars = finished_shards(tmp_path / "store")
    if window == "files gone":
        assert (counted, queued, tars) == (0, 5, [])
        assert not Path(paths["index"]).exists()
    else:
        assert (counted, queued, [path.name for path in tars]) == (5, 0, [Path(paths["tar"]).name])
        assert len(read_shard(tars[0])) == 5
    assert int(client.hget(KEYS.host_counters, f"{HOST}:open")) == 0 and not client.hgetall(KEYS.shards)
    sink.close()


def test_speed_counts_samples_in_open_shards(redis_server, script_env) -> None:
    """Samples waiting in an open shard show in speed.py and count in its rates, before their shard is finished."""
    client = redis_server.client()
    queue(client, [f"http://127.0.0.1/{row}.jpg" for row in range(10)])
    client.set(KEYS.started, time.time() - 10)
    leases = Leases(client, KEYS, HOST, f"{HOST}:w", 30)
    leases.register()
    claimed = leases.claim(8)
    leases.finish([(KEPT, raw, "sub/w-000000") for raw in claimed[:6]] + [(FAILED, claimed[6], "404|{}")])
    result = subprocess.run([*run_script("speed.py"), "--json"], env=script_env, capture_output=True, text=True)
    figures = json.loads(result.stdout)
    assert (figures["succeeded"], figures["failed"], figures["in_shards"], figures["in_flight"]) == (0, 1, 6, 1)
    assert figures["added"] == 10 == sum(figures[key] for key in ("succeeded", "failed", "in_shards", "in_flight",
                                                                    "queued", "delayed"))  # fmt: skip
    assert figures["images_per_s"] > 0 and figures["hosts"][0]["in_shards"] == 6
    text = subprocess.run([*run_script("speed.py"), "--once"], env=script_env, capture_output=True, text=True).stdout
    assert "in open shards 6" in text and "0 (+6 in shards)" in text


def test_shards_of_two_subsets_never_share_a_file(tmp_path: Path) -> None:
    """One worker's shards of two subsets have the same names: their temporary files must still be apart."""
    sink = ShardSink(tmp_path / "store", HOST, "w", f"{HOST}:w", 3, 600, "0123456789abcdef")
    sink.open()
    data = image_bytes("x", "jpg", 3000)
    image = Processed(data, "jpg", None, sha256=hashlib.sha256(data).hexdigest())
    for row in range(4):
        for subset in ("a", "b"):
            sink.put(
                Task(f"{subset}{row}", "http://127.0.0.1/x.jpg", subset, f"part-{subset}", row), "raw", image, None
            )
    sink.seal_all()
    shards = [sink.ready.get(timeout=10) for _ in range(4)]
    names = [f"{subset}/testhost-w-{seq:06d}-01234567" for subset in "ab" for seq in range(2)]
    assert sorted(shard.id for shard in shards) == names
    for shard in shards:
        with tarfile.open(shard.paths()["temp_tar"]) as archive:
            keys = sorted({name.partition(".")[0] for name in archive.getnames()})
        assert shard.error is None and keys == sorted(row["key"] for row in shard.rows)
        assert {json.loads(row["id"][1:]) for row in shard.rows} <= set(range(4))
        assert all(row["id"][0] == shard.subset for row in shard.rows)
    sink.close()


def test_tar_headers_are_tarfiles_own() -> None:
    """The ustar header built directly is byte for byte tarfile's; a name too long for it gets a pax header."""
    info = tarfile.TarInfo("part_0-000000001.jpg")
    info.size, info.mtime, info.mode = 12345, 1_700_000_000, 0o644
    assert tar_header(info.name, info.size, info.mtime) == info.tobuf(tarfile.USTAR_FORMAT)
    long_name = "é" * 60 + "-000000001.json"
    with tarfile.open(fileobj=io.BytesIO(b"".join(tar_member(long_name, b"{}", 1)) + TAR_END)) as archive:
        assert [(member.name, member.size) for member in archive.getmembers()] == [(long_name, 2)]


def test_a_shard_that_cannot_be_renamed_is_finished_after_the_worker_exits(
    env, redis_server, image_server, tmp_path: Path
) -> None:
    """When a shard's final name is taken, the stopping worker does not hang: it exits, its shard stays prepared,
    and the next worker of the host renames it once the name is free and counts it."""
    client = redis_server.client()
    tasks = queue(client, [image_server.url(f"/img/n{row}.jpg") for row in range(5)])
    tasks += queue(client, [image_server.url(f"/slow/2/n{row}.jpg") for row in range(5, 7)], first_row=5)
    env["LAION_SHARD_SIZE"] = "1000"
    worker = start_worker(env, "w")
    wait_until(lambda: int(client.hget(KEYS.host_counters, f"{HOST}:open") or 0) >= 5)
    owner = Owner.parse(client.get(KEYS.heartbeat(f"{HOST}:w")))
    assert owner is not None
    squatter = tmp_path / "images" / "sub" / f"{HOST}-w-000000-{owner.incarnation[:8]}.tar"
    squatter.write_bytes(b"not ours")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert "shards_unfinished" in worker.stderr.read()
    assert int(client.get(KEYS.tongji_succ) or 0) == 0 and len(client.hgetall(KEYS.shards)) == 1
    squatter.unlink()
    result = subprocess.run([*run_script("downloader.py"), "w", "--until-empty"], env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shard_recovered" in result.stderr, result.stderr
    assert len(assert_exact_books(client, tmp_path / "images", tasks)) == 7


@pytest.mark.skipif(importlib.util.find_spec("pandas") is None, reason="pandas is not installed: nothing to keep out")
def test_a_worker_keeps_pandas_out_where_it_is_installed(env, redis_server, image_server, tmp_path: Path) -> None:
    """pyarrow imports pandas, when installed, to build a shard's index: 45 MB a worker; the worker refuses it."""
    client = redis_server.client()
    queue(client, [image_server.url(f"/img/p{row}.jpg") for row in range(2)])
    env["LAION_SHARD_SIZE"] = "2"
    worker = start_worker(env, "w")  # it waits for more tasks until SIGTERM
    try:
        wait_until(lambda: int(client.get(KEYS.tongji_succ) or 0) == 2)  # a shard and its index are written
        assert "/pandas/" not in Path(f"/proc/{worker.pid}/maps").read_text()
        (tar,) = finished_shards(tmp_path / "images")
        assert pq.read_schema(tar.with_suffix(".parquet")).field("key").type == "string"  # pyarrow took it as absent
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
