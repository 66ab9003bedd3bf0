"""speed.py against a real Redis: JSON figures after a real run, live and dead workers, empty Redis, the views."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import time
from pathlib import Path

from laion5b import stats
from laion5b.hostledger import HostLedger, HostReport
from laion5b.keys import Keys
from laion5b.leases import FAILED, STORED, Leases, retry_outcome
from laion5b.tasks import Task, decode
from tests.helpers import run_script, write_wide
from tests.redis_server import free_port

KEYS = Keys()


def speed(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*run_script("speed.py"), *args], env=env, capture_output=True, text=True, timeout=60)


def speed_json(env: dict[str, str]) -> dict:
    result = speed(env, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def balanced(figures: dict) -> bool:
    accounted = figures["succeeded"] + figures["failed"] + figures["queued"] + figures["delayed"] + figures["in_flight"]
    return figures["added"] == accounted


def test_empty_redis_reads_as_zero(redis_server, script_env):
    figures = speed_json(script_env)
    for key in ("added", "succeeded", "failed", "queued", "delayed", "in_flight", "error_queue", "bytes"):
        assert figures[key] == 0, key
    assert figures["hosts"] == [] and figures["total"] is None and figures["eta_seconds"] is None
    result = speed(script_env, "--once")
    assert result.returncode == 0, result.stderr
    assert (
        "queued 0 | delayed 0 | added 0 | succeeded 0 | failed 0 | held by workers 0 | error queue 0" in result.stdout
    )


def test_unreachable_redis_is_one_line_and_exit_2(script_env):
    started = time.monotonic()
    result = speed({**script_env, "LAION_REDIS_PORT": str(free_port())}, "--json")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "redis_unreachable" in lines[0]
    assert time.monotonic() - started < 10, "no retry loop"


def test_json_figures_of_a_real_run(redis_server, script_env, image_server):
    paths = [f"/img/ok{i}.jpg?size={1000 * (i + 1)}" for i in range(12)] + ["/status/404"] * 3 + ["/notimage"] * 2
    write_wide(Path(script_env["LAION_PARQUET_DIR"]) / "s" / "a.parquet", [image_server.url(p) for p in paths])
    env = {**script_env, "LAION_ALLOWED_NETWORKS": "127.0.0.0/8", "LAION_HEARTBEAT_TTL": "3"}
    assert subprocess.run(run_script("add_task.py"), env=env, capture_output=True, timeout=60).returncode == 0
    queued = speed_json(env)
    assert (queued["added"], queued["queued"], queued["total"], queued["succeeded"]) == (17, 17, 17, 0)
    assert queued["eta_seconds"] is None, "nothing done yet: no pace to extrapolate"
    for command in (["downloader.py", "0", "--until-empty"], ["monitor_disk.py", "--once"]):
        result = subprocess.run([*run_script(command[0]), *command[1:]], env=env, capture_output=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
    figures = speed_json(env)
    stored = [p for p in Path(env["LAION_STORE_DIR"]).rglob("*.jpg") if ".tmp" not in p.parts]
    assert (figures["added"], figures["succeeded"], figures["failed"]) == (17, 12, 5)
    assert (figures["queued"], figures["delayed"], figures["in_flight"], figures["error_queue"]) == (0, 0, 0, 5)
    assert figures["bytes"] == sum(p.stat().st_size for p in stored) > 12 * 1000
    assert figures["total"] == 17 and figures["eta_seconds"] == 0 and balanced(figures)
    assert figures["images_per_s"] > 0 and figures["success_ratio"] == round(12 / 17, 4)
    [host] = figures["hosts"]
    assert (host["host"], host["succeeded"], host["failed"], host["bytes"]) == ("testhost", 12, 5, figures["bytes"])
    assert host["live_workers"] == 0 and host["stale_workers"] == 0 and host["state"] == "idle" and not host["dead"]
    assert host["disk_used_gb"] > 0 and host["disk_free_gb"] > 0 and host["downloaders"] == 0
    once = speed(env, "--once").stdout
    assert "succeeded 12 | failed 5" in once and "ETA 00:00:00 for 0 tasks left" in once
    assert "testhost" in once and "idle" in once


def test_the_most_throttled_web_hosts_of_a_real_run(redis_server, script_env, image_server):
    paths = ["/status/429?retry_after=1", "/status/503"] + [f"/img/t{i}.jpg" for i in range(6)]
    write_wide(Path(script_env["LAION_PARQUET_DIR"]) / "s" / "a.parquet", [image_server.url(p) for p in paths])
    env = {**script_env, "LAION_ALLOWED_NETWORKS": "127.0.0.0/8", "LAION_MAX_PER_HOST": "4", "LAION_MAX_ATTEMPTS": "2"}
    assert subprocess.run(run_script("add_task.py"), env=env, capture_output=True, timeout=60).returncode == 0
    result = subprocess.run([*run_script("downloader.py"), "0", "--until-empty"], env=env, capture_output=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    HostLedger(redis_server.client(), KEYS, "h9:0", 4, 16, 3).sync([HostReport("calm.test", throttles=1)])
    throttled = speed_json(env)["throttled_hosts"]
    assert [host["host"] for host in throttled] == ["127.0.0.1", "calm.test"]  # the most throttled first
    loopback = throttled[0]
    assert loopback["throttles"] >= 3 and loopback["limit"] < 4 and loopback["held"] == 0
    once = speed(env, "--once").stdout
    assert "most throttled web hosts" in once and "calm.test" in once


def test_held_tasks_and_dead_workers(redis_server, script_env):
    client = redis_server.client()
    tasks = [Task(f"t{i}", f"http://img.test/{i}.jpg", "s", "p", i) for i in range(20)]
    client.lpush(KEYS.task, *[task.encode() for task in tasks])
    client.set(KEYS.tongji_all, 20)
    client.set(KEYS.tongji_total, 100)
    client.set(KEYS.started, f"{time.time() - 100:.3f}")
    alive = Leases(client, KEYS, "h1", "h1:0", 30)
    alive.register()
    done = alive.claim(5)
    record = decode(done[4]).error_record(404, "HTTP 404", alive.worker)
    alive.finish([*[(STORED, raw, 1000) for raw in done[:4]], (FAILED, done[4], record)])
    retried = alive.claim(6)
    alive.finish([retry_outcome(raw, raw, 600) for raw in retried[:2]])
    dead = Leases(client, KEYS, "h2", "h2:0", 30)
    dead.register()
    dead.claim(2)
    client.delete(KEYS.heartbeat("h2:0"))
    figures = speed_json(script_env)
    assert (figures["succeeded"], figures["failed"], figures["queued"], figures["in_flight"]) == (4, 1, 7, 6)
    assert figures["delayed"] == 2
    assert figures["bytes"] == 4000 and figures["error_queue"] == 1 and balanced(figures)
    assert abs(figures["eta_seconds"] - 95 / (5 / 100)) < 30, "tasks left at the pace since start"
    hosts = {host["host"]: host for host in figures["hosts"]}
    assert set(hosts) == {"h1", "h2"}
    assert hosts["h1"]["live_workers"] == 1 and hosts["h1"]["heartbeat_age_seconds"] <= 2
    assert hosts["h1"]["state"] == "no monitor" and not hosts["h1"]["dead"]
    assert hosts["h1"]["rate"] == round(4 / 100, 2)
    assert hosts["h2"]["dead"] and hosts["h2"]["stale_workers"] == 1 and hosts["h2"]["heartbeat_age_seconds"] is None
    text = speed(script_env, "--once").stdout
    assert "DEAD" in text and "0 (+1 dead)" in text
    assert "queued 7 | delayed 2 | added 20 of 100 expected | succeeded 4 | failed 1 | held by workers 6" in text


def read_blocks(process: subprocess.Popen, blocks: int) -> str:
    """Read ``process``'s output until it has begun ``blocks`` more progress blocks; return what was read."""
    assert process.stdout is not None
    lines = []
    while blocks:
        line = process.stdout.readline()
        assert line, "speed.py ended early"
        lines.append(line)
        blocks -= line.startswith("laion5b progress at")
    return "".join(lines)


def test_live_view_prints_plain_blocks_when_not_a_terminal(redis_server, script_env):
    process = subprocess.Popen(
        [*run_script("speed.py"), "--interval", "0.3"], env=script_env, stdout=subprocess.PIPE, text=True
    )
    client = redis_server.client()
    seen = read_blocks(process, 2)  # counted by the blocks printed, not by the clock: the start may take seconds
    client.set(KEYS.tongji_succ, 5)
    client.set(KEYS.tongji_error, 15)
    seen += read_blocks(process, 3)
    process.send_signal(signal.SIGINT)
    output = seen + process.communicate(timeout=10)[0]
    assert process.returncode == 0
    assert output.count("laion5b progress at") >= 5 and "\x1b[" not in output
    assert re.search(r"last 0\.\d s: +0\.0 img/s", output)
    assert re.search(r"!! success ratio 25% over the last 0\.\d s is under 50%", output)


def test_live_view_redraws_in_place_on_a_terminal(redis_server, script_env):
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [*run_script("speed.py"), "--interval", "0.2"], env=script_env, stdout=follower, stderr=subprocess.DEVNULL
    )
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 20
    while output.count(b"\x1b[H\x1b[2J") < 2 and time.monotonic() < deadline:
        output += os.read(leader, 65536)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=10) == 0
    os.close(leader)
    assert output.count(b"\x1b[H\x1b[2J") >= 2 and b"laion5b progress at" in output


def test_rates_between_two_snapshots():
    before = stats.Snapshot(1000.0, 100, 50, 10, 40, 0, 0, 0, 50 * 1024 * 1024, 1000, 900.0, [])
    after = stats.Snapshot(1010.0, 100, 54, 26, 20, 0, 0, 0, 60 * 1024 * 1024, 1000, 900.0, [])
    rates = stats.between(before, after)
    assert (rates.images_per_s, rates.tasks_per_s, rates.mb_per_s, rates.success_ratio) == (0.4, 2.0, 1.0, 0.2)
    assert stats.eta_seconds(after, rates) == (1000 - 80) / 2.0
    view = stats.render(after, before, 0.5)
    assert "!! success ratio 20% over the last 10 s is under 50%" in view
    assert "ETA 00:07:40 for 920 tasks left" in view
    assert "!!" not in stats.render(after, before, 0.1)
