"""save_error_task.py against a real Redis: saving exactly once through kill -9, summary, requeue balancing books."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from laion5b import errorfiles
from laion5b.keys import Keys
from laion5b.leases import FAILED, STORED, Leases
from laion5b.tasks import Status, Task, decode
from tests.helpers import run_script, write_wide

KEYS = Keys()


def record_outcomes(client, host: str, outcomes: list[Status | None], subset: str = "s", start: int = 0) -> None:
    """Queue one task per outcome and record it through a worker of ``host`` as downloader.py does, in batches.

    None stores the task (100 bytes); a status fails it with that status.
    """
    leases = Leases(client, KEYS, host, f"{host}:0", 30)
    leases.register()
    for first in range(0, len(outcomes), 1000):
        batch = outcomes[first : first + 1000]
        rows = range(start + first, start + first + len(batch))
        tasks = [
            Task(id=f"{host}-{row}", url=f"http://img.test/{row}.jpg", subset=subset, part="p", row=row) for row in rows
        ]
        client.lpush(KEYS.task, *[task.encode() for task in tasks])
        client.incrby(KEYS.tongji_all, len(tasks))
        status_of = {task.id: status for task, status in zip(tasks, batch, strict=True)}
        finished = []
        for raw in leases.claim(len(tasks)):
            task = decode(raw)
            status = status_of[task.id]
            if status is None:
                finished.append((STORED, raw, 100))
            else:
                task.attempts += 1
                finished.append((FAILED, raw, task.error_record(status, f"failed with {status}", leases.worker)))
        assert leases.finish(finished) == len(tasks)
    leases.retire()


def run_saver(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*run_script("save_error_task.py"), *args], env=env, capture_output=True, text=True, timeout=120
    )


def saved_records(folder: Path) -> list[dict]:
    records = []
    for path in errorfiles.error_files(folder):
        records += [r for _, _, line in errorfiles.lines_from(path) if (r := errorfiles.parse(line))]
    return records


def books(client) -> tuple[int, int]:
    """(added, succeeded + failed + queued + in flight): equal whenever the books balance."""
    in_flight = sum(client.llen(KEYS.lease(worker)) for worker in client.smembers(KEYS.workers))
    done = int(client.get(KEYS.tongji_succ) or 0) + int(client.get(KEYS.tongji_error) or 0)
    return int(client.get(KEYS.tongji_all) or 0), done + client.llen(KEYS.task) + in_flight


def test_until_empty_saves_every_record_to_the_current_file(redis_server, script_env):
    client = redis_server.client()
    before = errorfiles.file_name(time.time())
    record_outcomes(client, "h1", [404, "timeout", None, "not_image"] * 50)
    result = run_saver(script_env, "--until-empty", "--batch", "7")
    assert result.returncode == 0, result.stderr
    folder = Path(script_env["LAION_STORE_ERROR_DIR"])
    names = [path.name for path in folder.iterdir()]
    assert len(names) == 1 and names[0] in (before, errorfiles.file_name(time.time()))
    now = datetime.now(UTC)
    assert names[0] in {f"{t:%Y%m%d}_{t.hour // 4}.txt" for t in (now, now - timedelta(minutes=1))}
    records = saved_records(folder)
    assert len(records) == 150 and len({r["record_id"] for r in records}) == 150
    assert Counter(r["status"] for r in records) == {404: 50, "timeout": 50, "not_image": 50}
    assert client.llen(KEYS.error) == 0 and client.llen(KEYS.error_processing("testhost")) == 0
    assert client.get(KEYS.error_saver("testhost")) is None, "the name is released on exit"
    assert run_saver(script_env, "--until-empty").returncode == 0


@pytest.mark.parametrize("same_file", [True, False], ids=["current-file", "earlier-file"])
def test_a_held_over_batch_is_finished_without_duplicates(redis_server, script_env, same_file):
    """A saver killed in the middle of writing a batch, in this four-hour file or the previous one."""
    client = redis_server.client()
    record_outcomes(client, "h1", [500] * 10)
    held = client.lrange(KEYS.error, 0, -1)
    client.delete(KEYS.error)
    client.rpush(KEYS.error_processing("testhost"), *held)
    folder = Path(script_env["LAION_STORE_ERROR_DIR"])
    folder.mkdir()
    partial = folder / (errorfiles.file_name(time.time()) if same_file else "20000101_5.txt")
    partial.write_text("".join(line + "\n" for line in held[:4]) + held[4][:40])
    record_outcomes(client, "h1", [404] * 3, start=100)
    expected = [json.loads(raw)["record_id"] for raw in held + client.lrange(KEYS.error, 0, -1)]
    result = run_saver(script_env, "--until-empty")
    assert result.returncode == 0, result.stderr
    assert "held_over_batch name=testhost records=10 already_saved=4" in result.stderr
    assert sorted(r["record_id"] for r in saved_records(folder)) == sorted(expected)
    lines = [line for path in errorfiles.error_files(folder) for line in path.read_text().splitlines()]
    assert len(lines) == 14 and lines[4] == held[4][:40], "the torn line stays alone, no record is glued to it"


def test_kill_9_at_any_moment_loses_and_doubles_nothing(redis_server, script_env):
    client = redis_server.client()
    for host in ("h1", "h2"):
        record_outcomes(client, host, [random.choice([404, 500, "timeout", "dns"]) for _ in range(15_000)])
    expected = Counter(json.loads(raw)["record_id"] for raw in client.lrange(KEYS.error, 0, -1))
    assert len(expected) == 30_000
    held_over = 0
    for _ in range(6):
        process = subprocess.Popen(
            [*run_script("save_error_task.py"), "--batch", "20"], env=script_env, stderr=subprocess.DEVNULL
        )
        remaining = client.llen(KEYS.error)
        deadline = time.monotonic() + 30
        while client.llen(KEYS.error) == remaining and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(random.uniform(0, 0.1))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        held_over += client.llen(KEYS.error_processing("testhost")) > 0
    assert 0 < client.llen(KEYS.error) < 30_000, "the kills must land in the middle of the work"
    assert held_over > 0, "at least one kill must land inside a batch"
    result = run_saver(script_env, "--until-empty", "--batch", "20")
    assert result.returncode == 0, result.stderr
    saved = Counter(r["record_id"] for r in saved_records(Path(script_env["LAION_STORE_ERROR_DIR"])))
    in_redis = Counter(
        json.loads(raw)["record_id"]
        for key in (KEYS.error, KEYS.error_processing("testhost"))
        for raw in client.lrange(key, 0, -1)
    )
    assert saved + in_redis == expected, "every record exactly once across the files and the Redis lists"
    assert not in_redis


def test_two_savers_share_the_work(redis_server, script_env):
    client = redis_server.client()
    record_outcomes(client, "h1", [404] * 20_000)
    expected = {json.loads(raw)["record_id"] for raw in client.lrange(KEYS.error, 0, -1)}
    command = [*run_script("save_error_task.py"), "--until-empty", "--batch", "10"]
    savers = [
        subprocess.Popen([*command, "--name", name], env=script_env, stderr=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    outputs = [saver.communicate(timeout=120)[1] for saver in savers]
    assert [saver.returncode for saver in savers] == [0, 0], outputs
    saved = Counter(r["record_id"] for r in saved_records(Path(script_env["LAION_STORE_ERROR_DIR"])))
    assert set(saved) == expected and set(saved.values()) == {1}
    shares = [int(re.search(r" saved=(\d+)", output).group(1)) for output in outputs]
    assert sum(shares) == 20_000 and min(shares) > 0, f"both savers must have taken part: {shares}"


def test_a_name_owned_by_a_live_process_is_refused(redis_server, script_env):
    client = redis_server.client()
    running = subprocess.Popen(run_script("save_error_task.py"), env=script_env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while client.get(KEYS.error_saver("testhost")) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    duplicate = run_saver(script_env, "--until-empty")
    assert duplicate.returncode == 2
    assert "name_in_use" in duplicate.stderr and "--name" in duplicate.stderr
    assert run_saver(script_env, "--until-empty", "--name", "second").returncode == 0
    running.send_signal(signal.SIGTERM)
    assert running.wait(timeout=30) == 0
    client.set(KEYS.error_saver("testhost"), "otherhost|123@1.00", ex=60)
    assert run_saver(script_env, "--until-empty").returncode == 2, "an owner on another host cannot be checked"


def test_summary_counts_by_status_reason_and_subset(redis_server, script_env):
    client = redis_server.client()
    record_outcomes(client, "h1", [404] * 6 + ["timeout"] * 3 + [503, None], subset="laion2B-en")
    record_outcomes(client, "h2", ["dns"] * 2 + [404], subset="laion1B-nolang", start=100)
    assert run_saver(script_env, "--until-empty").returncode == 0
    folder = Path(script_env["LAION_STORE_ERROR_DIR"])
    with errorfiles.error_files(folder)[0].open("a") as file:
        file.write('{"torn": \n')
    result = run_saver(script_env, "--summary")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "13 error records in 1 files (1 unreadable lines skipped)"
    rows = {line.split()[0]: line.split()[1:] for line in lines if line and not line.startswith("-")}
    assert rows["404"] == ["7", "53.8%", "no"]
    assert rows["timeout"] == ["3", "23.1%", "yes"]
    assert rows["503"][-1] == "yes" and rows["dns"][-1] == "yes"
    assert "      7  failed with 404" in lines
    assert rows["laion2B-en"][:4] == ["10", "404", "6,", "timeout"]
    assert rows["laion1B-nolang"][0] == "3"


def test_requeue_balances_the_books_and_never_repeats(redis_server, script_env):
    client = redis_server.client()
    record_outcomes(client, "h1", ["timeout", 503, 404, None, None, 404, "not_image"])
    record_outcomes(client, "h2", ["dns", 429, 404, None], start=100)
    assert run_saver(script_env, "--until-empty").returncode == 0
    assert books(client) == (11, 11) and int(client.get(KEYS.tongji_error)) == 8
    counted = {"timeout": "1", "503": "1", "404": "3", "not_image": "1", "dns": "1", "429": "1"}
    assert client.hgetall(KEYS.failures) == counted, "the outcome script counts failures by status"
    result = run_saver(script_env, "--requeue")
    assert result.returncode == 0, result.stderr
    assert "requeued=4 " in result.stderr
    requeued = [decode(raw) for raw in client.lrange(KEYS.task, 0, -1)]
    assert sorted(task.id for task in requeued) == ["h1-0", "h1-1", "h2-100", "h2-101"]
    assert all(task.attempts == 0 for task in requeued)
    assert int(client.get(KEYS.tongji_error)) == 4 and books(client) == (11, 11)
    assert client.hget(KEYS.host_counters, "h1:error") == "3" and client.hget(KEYS.host_counters, "h2:error") == "1"
    assert client.hgetall(KEYS.failures) == {"404": "3", "not_image": "1"} and client.get(KEYS.requeued_total) == "4"
    assert run_saver(script_env, "--requeue").returncode == 0
    assert client.llen(KEYS.task) == 4, "a second run requeues nothing"
    assert run_saver(script_env, "--requeue", "--status", "404").returncode == 0
    assert client.llen(KEYS.task) == 7 and int(client.get(KEYS.tongji_error)) == 1 and books(client) == (11, 11)
    assert client.hgetall(KEYS.failures) == {"not_image": "1"} and client.get(KEYS.requeued_total) == "7"
    assert run_saver(script_env, "--requeue", "--status", "404", "--status", "timeout").returncode == 0
    assert run_saver(script_env, "--requeue").returncode == 0
    assert client.llen(KEYS.task) == 7
    folder = Path(script_env["LAION_STORE_ERROR_DIR"])
    files = errorfiles.error_files(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([files[0].name, files[0].name + ".requeued"])


def test_requeue_marks_in_redis_and_in_the_file_each_prevent_a_repeat(redis_server, script_env):
    """A crash between the Lua script and the mark file, or a Redis that lost its marks, requeues nothing twice."""
    client = redis_server.client()
    record_outcomes(client, "h1", ["timeout"] * 2500 + [404] * 10)
    assert run_saver(script_env, "--until-empty").returncode == 0
    assert run_saver(script_env, "--requeue").returncode == 0
    assert client.llen(KEYS.task) == 2500
    folder = Path(script_env["LAION_STORE_ERROR_DIR"])
    mark = errorfiles.mark_path(errorfiles.error_files(folder)[0])
    saved_mark = mark.read_bytes()
    mark.unlink()
    assert run_saver(script_env, "--requeue").returncode == 0
    assert client.llen(KEYS.task) == 2500, "the Redis marks alone prevent a repeat"
    mark.write_bytes(saved_mark)
    client.delete(KEYS.requeued)
    assert run_saver(script_env, "--requeue").returncode == 0
    assert client.llen(KEYS.task) == 2500, "the mark file alone prevents a repeat"
    assert books(client) == (2510, 2510)


def test_kill_9_during_requeue_requeues_each_record_once(redis_server, script_env):
    client = redis_server.client()
    record_outcomes(client, "h1", ["timeout"] * 20_000 + [404] * 100)
    assert run_saver(script_env, "--until-empty", "--batch", "5000").returncode == 0
    for _ in range(3):
        process = subprocess.Popen(
            [*run_script("save_error_task.py"), "--requeue"], env=script_env, stderr=subprocess.DEVNULL
        )
        queued = client.llen(KEYS.task)
        deadline = time.monotonic() + 30
        while client.llen(KEYS.task) == queued and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert 0 < client.llen(KEYS.task) < 20_000, "the kills must land in the middle of the requeue"
    assert run_saver(script_env, "--requeue").returncode == 0
    counts = Counter(decode(raw).id for raw in client.lrange(KEYS.task, 0, -1))
    assert len(counts) == 20_000 and set(counts.values()) == {1}
    assert int(client.get(KEYS.tongji_error)) == 100 and books(client) == (20_100, 20_100)


def test_real_downloader_failures_are_saved_summarized_and_requeued(redis_server, script_env, image_server):
    paths = [f"/img/r{i}.jpg" for i in range(6)] + ["/status/404"] * 3 + ["/status/500"] * 2 + ["/notimage"]
    write_wide(Path(script_env["LAION_PARQUET_DIR"]) / "s" / "r.parquet", [image_server.url(p) for p in paths])
    env = {**script_env, "LAION_ALLOWED_NETWORKS": "127.0.0.0/8"}
    downloader = [*run_script("downloader.py"), "0", "--until-empty"]
    assert subprocess.run(run_script("add_task.py"), env=env, capture_output=True, timeout=60).returncode == 0
    assert subprocess.run(downloader, env=env, capture_output=True, timeout=120).returncode == 0
    client = redis_server.client()
    assert run_saver(env, "--until-empty").returncode == 0
    folder = Path(env["LAION_STORE_ERROR_DIR"])
    first = saved_records(folder)
    assert Counter(r["status"] for r in first) == {404: 3, 500: 2, "not_image": 1}
    assert all(r["worker"] == "testhost:0" for r in first) and {r["attempts"] for r in first if r["status"] == 500} == {
        3
    }
    summary = run_saver(env, "--summary").stdout
    assert "6 error records in 1 files" in summary and "not_image" in summary
    result = run_saver(env, "--requeue")
    assert "requeued=2 " in result.stderr, result.stderr
    assert [decode(raw).attempts for raw in client.lrange(KEYS.task, 0, -1)] == [0, 0]
    assert books(client) == (12, 12) and client.hget(KEYS.host_counters, "testhost:error") == "4"
    assert subprocess.run(downloader, env=env, capture_output=True, timeout=120).returncode == 0
    assert run_saver(env, "--until-empty").returncode == 0
    assert int(client.get(KEYS.tongji_error)) == 6 and books(client) == (12, 12)
    again = run_saver(env, "--requeue")
    assert "requeued=2 " in again.stderr, "only the two new failures; the first two are never requeued again"
    assert len(saved_records(folder)) == 8 and books(client) == (12, 12)
