"""reconcile.py on real runs (real Redis, loopback image server, real parquet, both output formats): check finds
planted problems, repair makes the books exact, rebuild restores a wiped Redis without fetching stored images."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import redis
import webdataset
from hypothesis import given, settings
from hypothesis import strategies as st

import setting
from laion5b import errorfiles, inputs
from laion5b.config import load
from laion5b.inputs import Spec
from laion5b.reconciler import read_books, reconcile
from laion5b.tasks import Task
from tests.helpers import run_script, start_logged_worker, wait_until, write_wide
from tests.redis_server import RedisServer
from tools.image_server import ImageServer

FORMATS = ["files", "webdataset"]
CHECK_AOF = shutil.which("redis-check-aof") or "/usr/bin/redis-check-aof"
WIPE = """
local held = 0
for _, pattern in ipairs({'laion5b_task:lease:*', 'laion5b_task:kept:*:*'}) do
  for _, key in ipairs(redis.call('KEYS', pattern)) do
    if redis.call('TYPE', key).ok == 'list' then held = held + redis.call('LLEN', key) end
  end
end
redis.call('FLUSHALL')
return held
"""
"""Wipes Redis; returns the tasks the workers held (in flight, or in open shards) at that moment."""


def run(name: str, env: dict[str, str], *args: str, code: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([*run_script(name), *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stdout + result.stderr
    return result


def environment(script_env: dict[str, str], output: str) -> dict[str, str]:
    return {**script_env, "LAION_ALLOWED_NETWORKS": "127.0.0.0/8", "LAION_OUTPUT_FORMAT": output,
            "LAION_SHARD_SIZE": "3", "LAION_THREAD_NUM": "4", "LAION_CONCURRENCY": "4"}  # fmt: skip


def in_process(env: dict[str, str], command: str) -> tuple[int, str]:
    """What ``reconcile.py command`` exits with and prints, run in this process (a second quicker than the script)."""
    config = load(setting, env)
    client = redis.Redis(host="127.0.0.1", port=config.redis_port, decode_responses=True)
    return reconcile(client, config, command, inputs.find_files(Path(config.parquet_dir)), whole_run=True)


def download(env: dict[str, str]) -> None:
    run("downloader.py", env, "0", "--until-empty")
    run("save_error_task.py", env, "--until-empty")


def books(env: dict[str, str]) -> Counter[tuple[str, int]]:
    """How often each (part, row) is stored (a sample of a finished shard, or an image file) or recorded as failed.
    The shards are read back as their users read them (the webdataset library): exactly their indexes' samples."""
    found: Counter[tuple[str, int]] = Counter()
    store = Path(env["LAION_STORE_DIR"]) / "s"
    tars, keys = sorted(store.glob("*.tar")), []
    for tar in tars:
        index = pq.read_table(tar.with_suffix(".parquet"))
        found.update(zip(index["part"].to_pylist(), index["row"].to_pylist(), strict=True))
        keys += index["key"].to_pylist()
    read = list(webdataset.WebDataset([str(tar) for tar in tars], shardshuffle=False)) if tars else []
    assert sorted(sample["__key__"] for sample in read) == sorted(keys)
    assert all({"jpg", "txt", "json"} <= set(sample) for sample in read)
    for image in store.glob("*/*/*.jpg"):
        found[image.parent.parent.name, int(image.stem, 16)] += 1
    failed = set()
    for path in errorfiles.error_files(Path(env["LAION_STORE_ERROR_DIR"])):
        for _, _, line in errorfiles.lines_from(path):
            record = errorfiles.parse(line)
            failed.add((record["part"], record["row"]))
    found.update(failed)
    return found


def fetches(server: ImageServer) -> Counter[str]:
    """The requests the image server received, by path."""
    return Counter(urlsplit(path).path for path in server.paths)


def task_of(row: int) -> str:
    """The task of a row of part r (its URL unreachable: the task must never be fetched)."""
    return Task(f"{row:032x}", f"http://127.0.0.1:1/img/r{row}.jpg", "s", "r", row).encode()


def copy_first_sample(shard: Path, copy: Path) -> str:
    """Write a shard holding only the first sample of ``shard`` (tar and index); return its key."""
    index = pq.read_table(shard.with_suffix(".parquet"))
    key = index["key"][0].as_py()
    with tarfile.open(shard) as source, tarfile.open(copy, "w") as target:
        for member in source:
            if member.name.startswith(f"{key}."):
                target.addfile(member, source.extractfile(member))
    pq.write_table(index.filter(pc.equal(index["key"], key)), copy.with_suffix(".parquet"))
    return key


@pytest.mark.parametrize("output", FORMATS)
def test_check_finds_planted_problems_and_repair_makes_the_books_exact(output, redis_server, script_env,
                                                                        image_server):  # fmt: skip
    env = environment(script_env, output)
    inputs = Path(env["LAION_PARQUET_DIR"]) / "s"
    write_wide(inputs / "r.parquet", [image_server.url(f"/img/r{i}.jpg") for i in range(8)]
               + [image_server.url("/status/404")] * 2)  # fmt: skip
    run("add_task.py", env)
    download(env)
    assert "books exact" in in_process(env, "check")[1]

    client = redis_server.client()
    store = Path(env["LAION_STORE_DIR"]) / "s"
    if output == "webdataset":
        first = sorted(store.glob("*.tar"))[-1]
        copied = copy_first_sample(first, store / "0-copy.tar")  # a sample in two shards; the copy sorts first
    else:
        image = store / "r" / "00000" / f"{0:032x}.jpg"
        shutil.copy(image, image.with_suffix(".png"))  # a row stored twice, as two files
        (store / "r" / "00000" / f"{1:032x}.jpg").unlink()  # a row counted but no longer stored
    client.lpush("laion5b_task", task_of(2))  # a stored row queued again (a Redis that lost writes)
    error_file = errorfiles.error_files(Path(env["LAION_STORE_ERROR_DIR"]))[0]
    lines = [line for line in error_file.read_text().splitlines() if errorfiles.parse(line)["row"] != 8]
    error_file.write_text("\n".join(lines) + "\n")  # row 8 failed but its record is gone: counted, in no record
    client.hset("laion5b_task:position", "s/r.parquet", 9)  # the producer would queue row 9 (failed) again
    write_wide(inputs / "p.parquet", [image_server.url("/img/p0.jpg")])
    with Path(env["LAION_DONE_PATH"]).open("a") as done:
        done.write("s/p.parquet\n")  # marked done, never queued: its row is in no state
    result = run("reconcile.py", env, "check", code=1)
    assert "stored_twice 1:" in result.stdout and "lost " in result.stdout and "no_state 1:" in result.stdout
    assert "redundant 1:" in result.stdout and "ahead 1:" in result.stdout
    if output == "webdataset":
        assert f"0-copy.tar#{copied}" in result.stdout

    before = fetches(image_server)
    client.set("laion5b_task:producer", 1)
    assert "run_alive processes=add_task.py" in run("reconcile.py", env, "repair", code=2).stderr
    client.delete("laion5b_task:producer")
    in_process(env, "repair")
    download(env)
    code, text = in_process(env, "check")
    assert code == 0 and "books exact" in text, text
    counts = books(env)
    assert set(counts) == {("r", row) for row in range(10)} | {("p", 0)}
    assert set(counts.values()) == {1}
    fetched = fetches(image_server) - before
    lost = {"files": {"/img/r1.jpg"}, "webdataset": set()}[output]
    assert set(fetched) <= lost | {"/img/p0.jpg", "/status/404"}, fetched
    assert int(client.get("laion5b_tongji_succ")) == 9 and int(client.get("laion5b_tongji_error")) == 2


@pytest.mark.parametrize("output", FORMATS)
def test_a_wiped_redis_is_rebuilt_and_no_stored_image_is_fetched_again(output, redis_server, script_env, tmp_path,
                                                                       image_server):  # fmt: skip
    env = {**environment(script_env, output), "LAION_THREAD_NUM": "2", "LAION_CONCURRENCY": "2"}
    paths = ["/status/404", "/status/500"] + [f"/slow/0.3/{output}{i}.jpg" for i in range(30)]  # the server is shared
    write_wide(Path(env["LAION_PARQUET_DIR"]) / "s" / "r.parquet", [image_server.url(path) for path in paths])
    run("add_task.py", env)
    client = redis_server.client()
    worker = start_logged_worker(env, tmp_path / "worker.log", "0", "--until-empty")
    wait_until(lambda: int(client.get("laion5b_tongji_error") or 0) == 2)  # a 404, and a 500 tried three times
    run("save_error_task.py", env, "--until-empty")
    wait_until(lambda: int(client.get("laion5b_tongji_succ") or 0) >= 3)
    held = client.eval(WIPE, 0)  # Redis loses everything, and restarts without its AOF
    redis_server.stop(signal.SIGKILL)
    shutil.rmtree(redis_server.folder / "appendonlydir")
    redis_server.start()
    assert worker.wait(timeout=60) in (0, 1)  # 1: a shard step found its heartbeat gone first (fenced out)
    at_wipe = {paths[row] for part, row in books(env) if row >= 2}  # stored before the wipe or in flight then
    fetched_before = fetches(image_server)
    assert {record["status"] for record in saved_records(Path(env["LAION_STORE_ERROR_DIR"]))} == {404, 500}

    code, text = in_process(env, "rebuild")
    assert code == 0 and "books exact" in text, text
    assert "rows_to_queue=0" in run("add_task.py", env).stderr  # the producer's positions are back
    download(env)
    assert "books exact" in in_process(env, "check")[1]
    assert set(books(env)) == {("r", row) for row in range(len(paths))} and set(books(env).values()) == {1}
    fetched = fetches(image_server) - fetched_before
    assert not set(fetched) & at_wipe, "a stored image was fetched again"
    assert fetched["/status/404"] == 0 and fetched["/status/500"] == 3  # the transient failure is tried again
    again = {path for path in fetched if path.startswith("/slow/") and fetched_before[path]}
    print(f"{output}: held by the worker at the wipe {held}, fetched again {len(again)}, stored {len(at_wipe)}")
    assert len(again) <= held
    assert len(at_wipe) < len(paths) - 2, "the wipe came after the last download"


def saved_records(folder: Path) -> list[dict]:
    return [errorfiles.parse(line) for path in errorfiles.error_files(folder) for _, _, line in
            errorfiles.lines_from(path)]  # fmt: skip


def test_repair_after_a_failover_at_any_point_of_the_run_makes_exact_books(redis_server, script_env, tmp_path,
                                                                           image_server):  # fmt: skip
    """A failover to a replica that missed the last writes is Redis at a prefix of its write history: the AOF
    (appendfsync always) of a whole run, cut anywhere and fixed with redis-check-aof, then repair."""
    env = {**environment(script_env, "webdataset"), "LAION_THREAD_NUM": "2", "LAION_CONCURRENCY": "2"}
    paths = ["/status/404", "/status/500"] + [f"/img/prefix{i}.jpg" for i in range(10)]
    write_wide(Path(env["LAION_PARQUET_DIR"]) / "s" / "r.parquet", [image_server.url(path) for path in paths])
    run("add_task.py", env)
    download(env)
    redis_server.stop()
    history = redis_server.folder / "appendonlydir"
    writes = next(history.glob("*.incr.aof"))
    config = load(setting, env)
    sources = inputs.find_files(Path(config.parquet_dir))

    @settings(max_examples=12, deadline=None)
    @given(cut=st.integers(0, writes.stat().st_size))
    def failover_at(cut: int) -> None:
        folder = Path(tempfile.mkdtemp(dir=tmp_path))
        shutil.copytree(history, folder / "appendonlydir")
        replica_writes = folder / "appendonlydir" / writes.name
        os.truncate(replica_writes, cut)
        subprocess.run([CHECK_AOF, "--fix", str(replica_writes)], input="y\n", capture_output=True, text=True,
                       check=True)  # fmt: skip
        replica = RedisServer(folder)
        replica.start()
        try:
            here = replace(config, redis_port=replica.port)
            client = replica.client()
            code, text = reconcile(client, here, "repair", sources, whole_run=True)
            assert code == 0, text
            states = read_books(client, here, Spec.of(here), sources).total("states")
            assert states == Counter(stored=10, failed=2), text
            assert client.llen("laion5b_task") == client.zcard("laion5b_task:delayed") == 0
        finally:
            replica.stop()

    failover_at()
