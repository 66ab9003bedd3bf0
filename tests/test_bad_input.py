"""Bad input of every kind: junk parquet files, hostile URLs, bad settings, a Redis that refuses or is full."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion5b.keys import Keys
from laion5b.tasks import Task, decode
from tests.helpers import (
    ENGINE_IDS,
    engine_env,
    run_script,
    start_logged_worker,
    wait_until,
    write_original,
    write_wide,
)
from tests.redis_server import free_port

KEYS = Keys()
SCRIPTS = ("add_task.py", "downloader.py", "monitor_disk.py", "save_error_task.py", "speed.py")


@pytest.fixture
def env(script_env: dict[str, str]) -> dict[str, str]:
    return {**script_env, "LAION_ALLOWED_NETWORKS": "127.0.0.0/8", "LAION_THREAD_NUM": "4"}


def run(script: str, env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*run_script(script), *args], env=env, capture_output=True, text=True, timeout=timeout)


def script_args(script: str) -> tuple[str, ...]:
    return {"downloader.py": ("0", "--until-empty"), "monitor_disk.py": ("--once",), "speed.py": ("--json",)}.get(
        script, ("--until-empty",) if script == "save_error_task.py" else ()
    )


def test_a_folder_of_mixed_junk(redis_server, env):
    folder = Path(env["LAION_PARQUET_DIR"]) / "junk"
    write_wide(folder / "good.parquet", ["http://h/a.jpg", "http://h/b.jpg"])
    pq.write_table(pa.table({"url": pa.array([], pa.string())}), folder / "zero_rows.parquet")
    (folder / "empty.parquet").write_bytes(b"")
    (folder / "notes.parquet").write_text("this is text, not parquet")
    truncated = write_original(folder / "truncated.parquet", [f"http://h/{i}" for i in range(500)])
    truncated.write_bytes(truncated.read_bytes()[:700])
    (folder / "dir.parquet").mkdir()
    (folder / "_SUCCESS").write_text("")
    (folder / ".good.parquet.crc").write_bytes(b"\x00\x01")
    (folder / "readme.txt").write_text("hello")
    result = run("add_task.py", env)
    assert result.returncode == 1
    failed = sorted(
        line.split("file_failed ")[1].split(":")[0] for line in result.stderr.splitlines() if "file_failed" in line
    )
    assert [Path(name).name for name in failed] == ["empty.parquet", "notes.parquet", "truncated.parquet"]
    assert redis_server.client().llen(KEYS.task) == 2
    assert Path(env["LAION_DONE_PATH"]).read_text().splitlines() == ["junk/good.parquet", "junk/zero_rows.parquet"]


def test_wrong_types_nulls_and_non_utf8_text(redis_server, env):
    folder = Path(env["LAION_PARQUET_DIR"]) / "types"
    pq.write_table(
        pa.table({"URL": pa.array([1, 2, None], pa.int64()), "TEXT": ["a", "b", "c"]}),
        folder.mkdir(parents=True) or folder / "ints.parquet",
    )
    pq.write_table(
        pa.table({"url": ["http://h/x.jpg", None], "caption": pa.array([b"caf\xe9 \xff", None], pa.binary())}),
        folder / "binary.parquet",
    )
    assert run("add_task.py", env).returncode == 0
    client = redis_server.client()
    tasks = [decode(raw) for raw in client.lrange(KEYS.task, 0, -1)]
    assert [(t.url, t.text) for t in tasks] == [("http://h/x.jpg", "caf\ufffd \ufffd")]
    records = [json.loads(raw) for raw in client.lrange(KEYS.error, 0, -1)]
    assert sorted(r["status"] for r in records) == ["bad_url"] * 4
    assert int(client.get(KEYS.tongji_all)) == 5 and int(client.get(KEYS.tongji_error)) == 4


def test_duplicate_ids_inside_and_across_files_are_each_counted_once(redis_server, env, image_server):
    folder = Path(env["LAION_PARQUET_DIR"]) / "dups"
    same = image_server.url("/img/dup.jpg")
    write_wide(folder / "one.parquet", [same, same, image_server.url("/img/other.jpg")], hashes=["d", "d", "e"])
    write_wide(folder / "two.parquet", [same], hashes=["d"])
    assert run("add_task.py", env).returncode == 0
    assert run("downloader.py", env, "0", "--until-empty").returncode == 0
    client = redis_server.client()
    assert int(client.get(KEYS.tongji_succ)) == 4 and int(client.get(KEYS.tongji_all)) == 4
    store = Path(env["LAION_STORE_DIR"]) / "dups"
    files = sorted(p.relative_to(store).as_posix() for p in store.rglob("*.jpg"))
    assert files == ["one/00000/d.jpg", "one/00000/e.jpg", "two/00000/d.jpg"]


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_hostile_urls_never_crash_a_worker_or_escape_the_store(redis_server, env, image_server, engine):
    port = image_server.port
    urls = {
        "credentials": (f"http://user:s3cretpw@127.0.0.1:{port}/img/cred.jpg", None),
        "percent": (f"http://127.0.0.1:{port}/img/a%20b%2Fc.jpg", None),
        "space": (f"http://127.0.0.1:{port}/img/with space.jpg", None),
        "file": ("file:///etc/passwd", "bad_url"),
        "ftp": ("ftp://127.0.0.1/x.jpg", "bad_url"),
        "data": ("data:image/png;base64,iVBORw0KGgo=", "bad_url"),
        "javascript": ("javascript:alert(1)", "bad_url"),
        "ipv6": (f"http://[::1]:{port}/img/v6.jpg", "blocked_address"),
        "long": (f"http://127.0.0.1:{port}/img/" + "a" * 9000 + ".jpg", "bad_url"),
        "traversal": (f"http://127.0.0.1:{port}/img/../../etc/passwd.jpg", 404),
        "no host": ("http:///img/x.jpg", "bad_url"),
        "credentials 404": (f"http://user:s3cretpw@127.0.0.1:{port}/status/404", 404),
    }
    client = redis_server.client()
    tasks = [Task(id=f"u{i}", url=url, subset="s", part="p", row=i) for i, (url, _) in enumerate(urls.values())]
    client.lpush(KEYS.task, *[t.encode() for t in tasks])
    client.incrby(KEYS.tongji_all, len(tasks))
    result = run("downloader.py", {**env, **engine_env(engine)}, "0", "--until-empty", "--debug")
    assert result.returncode == 0, result.stderr[-2000:]
    records = {r["id"]: r for r in map(json.loads, client.lrange(KEYS.error, 0, -1))}
    for task, (name, (url, status)) in zip(tasks, urls.items(), strict=True):
        if status is None:
            assert task.id not in records, f"{name}: {records.get(task.id)}"
        else:
            assert records[task.id]["status"] == status, f"{name}: {records[task.id]}"
            assert records[task.id]["url"] == url, "error records keep the URL as given"
    store = Path(env["LAION_STORE_DIR"])
    stored = [p for p in store.rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to(store.resolve()) for p in stored)
    assert len(stored) == int(client.get(KEYS.tongji_succ)) == 3
    assert "s3cretpw" not in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    ("variable", "value"),
    [("LAION_THREAD_NUM", "0"), ("LAION_REDIS_PORT", "port"), ("LAION_ALLOWED_NETWORKS", "10.0.0.0/33")],
)
def test_bad_settings_stop_every_script_before_it_starts(script_env, script, variable, value):
    result = run(script, {**script_env, variable: value}, *script_args(script), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bad setting:") and variable in lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_wrong_password_is_one_clear_error(redis_server, script_env, script):
    Path(script_env["LAION_PARQUET_DIR"]).mkdir(exist_ok=True)
    redis_server.client().config_set("requirepass", "the-right-one")
    result = run(script, {**script_env, "LAION_REDIS_PASS": "a-wrong-one"}, *script_args(script), timeout=60)
    assert result.returncode != 0
    assert "auth" in result.stderr.lower()
    assert "a-wrong-one" not in result.stderr + result.stdout and "the-right-one" not in result.stderr


def test_worker_waits_for_a_redis_that_is_down_at_start(tmp_path, env, image_server):
    from tests.redis_server import RedisServer

    folder = tmp_path / "late-redis"
    folder.mkdir()
    late = RedisServer(folder)
    late_env = {**env, **late.environ()}
    log = tmp_path / "worker.log"
    worker = start_logged_worker(late_env, log, "0", "--until-empty")
    wait_until(lambda: "redis_unavailable" in log.read_text(), timeout=30)
    assert worker.poll() is None, "a worker must wait for Redis, not exit"
    late.start()
    try:
        client = late.client()
        client.lpush(
            KEYS.task, Task(id="a", url=image_server.url("/img/late.jpg"), subset="s", part="p", row=0).encode()
        )
        client.incr(KEYS.tongji_all)
        assert worker.wait(timeout=60) == 0
        assert int(client.get(KEYS.tongji_succ)) == 1
    finally:
        late.stop()


def test_producer_waits_while_redis_is_full_and_loses_nothing(redis_server, env):
    rows = 30_000
    write_wide(Path(env["LAION_PARQUET_DIR"]) / "s" / "full.parquet", [f"http://h/{i}.jpg" for i in range(rows)])
    client = redis_server.client()
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", str(used + 2 * 1024 * 1024))
    producer = subprocess.Popen(
        [*run_script("add_task.py")], env={**env, "LAION_ADDTASK_BATCH": "500"}, stderr=subprocess.PIPE, text=True
    )
    wait_until(lambda: client.llen(KEYS.task) > 0, interval=0.05)
    time.sleep(2)
    assert producer.poll() is None, "the producer must wait while Redis is full"
    client.config_set("maxmemory", "0")
    assert producer.wait(timeout=60) == 0
    assert "maxmemory" in producer.stderr.read()
    rows_queued = sorted(decode(raw).row for raw in client.lrange(KEYS.task, 0, -1))
    assert rows_queued == list(range(rows))


def test_unused_port_for_speed_is_exit_2(script_env):
    result = run("speed.py", {**script_env, "LAION_REDIS_PORT": str(free_port())}, "--json", timeout=30)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
