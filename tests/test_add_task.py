"""add_task.py against a real Redis: exactly-once queueing, bad rows, threshold, done file, crash resume."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from laion5b.tasks import decode
from tests.helpers import SAMPLE, kill_add_task_midway, run_script, wait_until, write_original, write_wide


def run_add_task(env: dict[str, str], **overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        run_script("add_task.py"), env={**env, **overrides}, capture_output=True, text=True, timeout=120
    )


def queued(client) -> list:
    return [decode(raw) for raw in client.lrange("laion5b_task", 0, -1)]


def errors(client) -> list[dict]:
    return [json.loads(raw) for raw in client.lrange("laion5b_task_error", 0, -1)]


def drain_while_running(process: subprocess.Popen, client, at_most: int | None = None) -> list[str]:
    """Take tasks off the queue, as workers would, until add_task.py exits; check the queue never holds more than
    ``at_most``. Return what was taken."""
    deadline = time.monotonic() + 60
    drained: list[str] = []
    while process.poll() is None:
        assert time.monotonic() < deadline, "add_task.py did not finish"
        if at_most is not None:
            assert client.llen("laion5b_task") <= at_most
        drained += client.rpop("laion5b_task", 500) or []
        time.sleep(0.02)
    return drained


def test_real_sample_is_queued_once_with_bad_rows_as_errors(redis_server, script_env):
    parquet_dir = Path(script_env["LAION_PARQUET_DIR"])
    (parquet_dir / "laion400m").mkdir(parents=True)
    (parquet_dir / "laion400m" / "laion_sample_10000.parquet").write_bytes(SAMPLE.read_bytes())
    result = run_add_task(script_env)
    assert result.returncode == 0, result.stderr
    client = redis_server.client()
    tasks, bad = queued(client), errors(client)
    assert len(tasks) + len(bad) == 10_000
    assert [record["url"] for record in bad] == ["UNLIKELY"]
    assert bad[0]["status"] == "bad_url" and bad[0]["row"] == 4674 and "not http" in bad[0]["error_msg"]
    assert client.hgetall("laion5b_task:failures") == {"bad_url": "1"}, "counted by status"
    assert sorted(t.row for t in tasks) == [r for r in range(10_000) if r != 4674]
    assert {(t.subset, t.part) for t in tasks} == {("laion400m", "laion_sample_10000")}
    assert all(t.id == str(t.row) for t in tasks)
    assert sum(1 for t in tasks if t.text and not t.text.isascii()) >= 590
    assert int(client.get("laion5b_tongji_all")) == 10_000
    assert int(client.get("laion5b_tongji_error")) == 1
    assert int(client.get("laion5b_task:total")) == 10_000
    assert Path(script_env["LAION_DONE_PATH"]).read_text() == "laion400m/laion_sample_10000.parquet\n"
    again = run_add_task(script_env)
    assert again.returncode == 0
    assert client.llen("laion5b_task") == 9_999 and int(client.get("laion5b_tongji_all")) == 10_000


def test_both_schemas_ids_and_bad_rows(redis_server, script_env):
    parquet_dir = Path(script_env["LAION_PARQUET_DIR"])
    write_original(
        parquet_dir / "orig" / "a.parquet",
        ["http://h/0.jpg", "", None, "ftp://h/3", " https://h/4.jpg ", "http://h/" + "x" * 5000],
        sample_ids=[10.0, 11.0, 12.0, 13.0, None, 15.0],
    )
    write_wide(parquet_dir / "wide" / "b.parquet", ["http://h/a", "http://h/b"], hashes=["abc", "../../etc/passwd"])
    assert run_add_task(script_env).returncode == 0
    client = redis_server.client()
    tasks = {(t.subset, t.row): t for t in queued(client)}
    assert tasks["orig", 0].id == "10" and tasks["orig", 0].text == "caption 0"
    assert tasks["orig", 4].id == "4" and tasks["orig", 4].url == "https://h/4.jpg"
    assert tasks["wide", 0].id == "abc" and tasks["wide", 0].text == "wide caption 0"
    assert tasks["wide", 1].id.startswith("sha1-")
    bad = {record["row"]: record for record in errors(client)}
    assert sorted(bad) == [1, 2, 3, 5]
    assert all(record["status"] == "bad_url" and record["subset"] == "orig" for record in bad.values())
    assert int(client.get("laion5b_tongji_all")) == 8
    assert int(client.get("laion5b_tongji_error")) == 4


def test_corrupt_file_is_reported_and_others_go_on(redis_server, script_env):
    parquet_dir = Path(script_env["LAION_PARQUET_DIR"])
    write_wide(parquet_dir / "s" / "good.parquet", ["http://h/a", "http://h/b"])
    (parquet_dir / "s" / "broken.parquet").write_bytes(b"PAR1 this is not really parquet")
    (parquet_dir / "s" / "_SUCCESS").write_text("")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"TEXT": ["no url here"]}), parquet_dir / "s" / "nourl.parquet")
    result = run_add_task(script_env)
    assert result.returncode == 1
    failed = [line for line in result.stderr.splitlines() if "file_failed" in line]
    assert len(failed) == 2 and any("broken.parquet" in line for line in failed)
    assert any("no URL column" in line for line in failed)
    assert redis_server.client().llen("laion5b_task") == 2
    assert Path(script_env["LAION_DONE_PATH"]).read_text() == "s/good.parquet\n"


def test_waits_while_the_queue_is_at_the_threshold(redis_server, script_env):
    write_wide(Path(script_env["LAION_PARQUET_DIR"]) / "s" / "t.parquet", [f"http://h/{i}" for i in range(5000)])
    env = {**script_env, "LAION_ADDTASK_THRESHOLD": "2000", "LAION_ADDTASK_BATCH": "500"}
    process = subprocess.Popen(run_script("add_task.py"), env=env, stderr=subprocess.PIPE, text=True)
    client = redis_server.client()
    wait_until(lambda: client.llen("laion5b_task") >= 2000, interval=0.05)
    time.sleep(1.5)
    assert client.llen("laion5b_task") == 2000
    assert process.poll() is None
    drained = drain_while_running(process, client, at_most=2000 + 500 - 1)
    assert process.wait(timeout=30) == 0
    assert "queue_full" in process.stderr.read()
    assert len(drained) + client.llen("laion5b_task") == 5000


def test_kill_9_mid_file_resumes_exactly_once(redis_server, script_env):
    rows = 200_000
    write_wide(
        Path(script_env["LAION_PARQUET_DIR"]) / "s" / "big.parquet",
        [f"http://h/{i}.jpg" for i in range(rows)],
        row_group_size=7_000,
    )
    env = {**script_env, "LAION_ADDTASK_BATCH": "1000"}
    client = redis_server.client()
    kill_add_task_midway(env, client, rows, "s/big.parquet")
    assert run_add_task(env).returncode == 0
    counts = Counter(t.row for t in queued(client))
    assert len(counts) == rows and set(counts.values()) == {1}
    assert int(client.get("laion5b_tongji_all")) == rows
    assert int(client.hget("laion5b_task:position", "s/big.parquet")) == rows


def test_redis_restart_during_a_run_loses_and_doubles_nothing(redis_server, script_env):
    rows = 60_000
    write_wide(Path(script_env["LAION_PARQUET_DIR"]) / "s" / "r.parquet", [f"http://h/{i}" for i in range(rows)])
    env = {**script_env, "LAION_ADDTASK_BATCH": "500", "LAION_ADDTASK_THRESHOLD": "20000"}
    client = redis_server.client()
    process = subprocess.Popen(run_script("add_task.py"), env=env, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: client.llen("laion5b_task") >= 20_000, interval=0.01)
    redis_server.stop()
    time.sleep(2.5)
    redis_server.start()
    client = redis_server.client()
    drained = drain_while_running(process, client)
    assert process.wait(timeout=60) == 0
    drained += client.lrange("laion5b_task", 0, -1)
    counts = Counter(decode(raw).row for raw in drained)
    assert len(counts) == rows and set(counts.values()) == {1}
    assert "redis_unavailable" in process.stderr.read()


@pytest.mark.parametrize("password_env", ["LAION_REDIS_PASS"])
def test_wrong_password_is_a_clear_error(redis_server, script_env, password_env):
    Path(script_env["LAION_PARQUET_DIR"]).mkdir()
    redis_server.client().config_set("requirepass", "right-one")
    result = run_add_task(script_env, **{password_env: "wrong-one"})
    assert result.returncode == 2
    assert "redis_auth_failed" in result.stderr
    assert "wrong-one" not in result.stderr and "right-one" not in result.stderr


def test_batches_a_crashed_redis_lost_are_queued_again(redis_server, script_env):
    """A Redis crash keeps a prefix of the writes: the queue, the counter and the position roll back together."""
    rows = 5000
    write_wide(Path(script_env["LAION_PARQUET_DIR"]) / "s" / "lost.parquet", [f"http://h/{i}" for i in range(rows)])
    env = {**script_env, "LAION_ADDTASK_THRESHOLD": "2000", "LAION_ADDTASK_BATCH": "500"}
    client = redis_server.client()
    process = subprocess.Popen(run_script("add_task.py"), env=env, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: client.llen("laion5b_task") >= 2000)
    pipe = client.pipeline()
    pipe.ltrim("laion5b_task", -1000, -1)
    pipe.set("laion5b_tongji_all", 1000)
    pipe.hset("laion5b_task:position", "s/lost.parquet", 1000)
    pipe.execute()
    drained = drain_while_running(process, client)
    assert process.wait(timeout=30) == 0
    assert "redis_lost_writes" in process.stderr.read()
    drained += client.lrange("laion5b_task", 0, -1)
    counts = Counter(decode(raw).row for raw in drained)
    assert len(counts) == rows and set(counts.values()) == {1}
    assert int(client.get("laion5b_tongji_all")) == rows


def test_a_done_file_whose_last_batches_redis_lost_is_finished_at_the_next_start(redis_server, script_env):
    rows = 3000
    write_wide(Path(script_env["LAION_PARQUET_DIR"]) / "s" / "tail.parquet", [f"http://h/{i}" for i in range(rows)])
    env = {**script_env, "LAION_ADDTASK_BATCH": "500"}
    assert run_add_task(env).returncode == 0
    client = redis_server.client()
    pipe = client.pipeline()
    pipe.ltrim("laion5b_task", -2000, -1)
    pipe.set("laion5b_tongji_all", 2000)
    pipe.hset("laion5b_task:position", "s/tail.parquet", 2000)
    pipe.execute()
    again = run_add_task(env)
    assert again.returncode == 0
    assert "redis_lost_writes" in again.stderr
    counts = Counter(t.row for t in queued(client))
    assert len(counts) == rows and set(counts.values()) == {1}
    assert run_add_task(env).returncode == 0 and client.llen("laion5b_task") == rows
