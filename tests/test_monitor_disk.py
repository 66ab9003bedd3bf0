"""monitor_disk.py against a real Redis: what it publishes, its expiry, its errors, and riding out a Redis restart."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from laion5b.disk import measure, published_used
from laion5b.keys import Keys
from laion5b.leases import Leases
from laion5b.monitor import HostSample
from tests.helpers import run_script
from tests.redis_server import free_port

KEYS = Keys()


def run_monitor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*run_script("monitor_disk.py"), *args], env=env, capture_output=True, text=True, timeout=60)


def test_once_publishes_the_disk_and_the_host_record(redis_server, script_env):
    client = redis_server.client()
    for host, worker in (("testhost", "testhost:0"), ("testhost", "testhost:1"), ("otherhost", "otherhost:0")):
        Leases(client, KEYS, host, worker, 30).register()
    Leases(client, KEYS, "testhost", "testhost:dead", 30).register()
    client.delete(KEYS.heartbeat("testhost:dead"))
    before = time.time()
    result = run_monitor(script_env, "--once")
    assert result.returncode == 0, result.stderr
    local = measure(script_env["LAION_MONITOR_DISK"])
    used = client.hget(KEYS.tongji_disk, "testhost")
    assert used.isdigit() and abs(int(used) - local.used_gb) <= 1, "used GB as an integer, as the original wrote it"
    assert published_used(client, KEYS, "testhost", max_age=60) == int(used)
    assert before <= float(client.hget(KEYS.tongji_disk, "testhost:ts")) <= time.time()
    sample = HostSample.parse(client.hgetall(KEYS.host_record("testhost")))
    assert sample is not None
    assert abs(sample.total_gb - local.total_gb) < 0.01 and abs(sample.free_gb - local.free_gb) < 1
    assert 0 <= sample.percent <= 100 and 0 <= sample.cpu_percent <= 100 and 0 < sample.memory_percent <= 100
    assert sample.net_in_bps >= 0 and sample.net_out_bps >= 0
    assert sample.downloaders == 2, "live heartbeats of this host only"
    assert 0 < client.ttl(KEYS.host_record("testhost")) <= 3 * 60


def test_the_host_record_expires_but_the_disk_value_stays(redis_server, script_env):
    client = redis_server.client()
    assert run_monitor({**script_env, "LAION_MONITOR_INTERVAL": "1"}, "--once").returncode == 0
    assert 0 < client.ttl(KEYS.host_record("testhost")) <= 3
    deadline = time.monotonic() + 10
    while client.exists(KEYS.host_record("testhost")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not client.exists(KEYS.host_record("testhost"))
    assert client.hget(KEYS.tongji_disk, "testhost") is not None
    assert published_used(client, KEYS, "testhost", max_age=2) is None, "an old value reads as missing"


def test_a_missing_path_is_one_clear_line(redis_server, script_env, tmp_path: Path):
    result = run_monitor({**script_env, "LAION_MONITOR_DISK": str(tmp_path / "nowhere")}, "--once")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "monitor_disk_missing" in lines[0] and "nowhere" in lines[0]
    assert not redis_server.client().exists(KEYS.tongji_disk)


def test_once_with_redis_unreachable_exits_1(script_env):
    result = run_monitor({**script_env, "LAION_REDIS_PORT": str(free_port())}, "--once")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "redis_unreachable" in lines[0]


def test_the_loop_keeps_publishing_through_a_redis_restart(redis_server, script_env):
    env = {**script_env, "LAION_MONITOR_INTERVAL": "1"}
    process = subprocess.Popen(run_script("monitor_disk.py"), env=env, stderr=subprocess.PIPE, text=True)
    client = redis_server.client()

    def stamp() -> float:
        return float(client.hget(KEYS.tongji_disk, "testhost:ts") or 0)

    deadline = time.monotonic() + 20
    while stamp() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    first = stamp()
    assert first > 0
    redis_server.stop()
    time.sleep(2.5)
    redis_server.start()
    client = redis_server.client()
    restarted = time.time()
    deadline = time.monotonic() + 20
    while stamp() < restarted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stamp() >= restarted, "a fresh sample after Redis came back"
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert "redis_unavailable" in process.stderr.read()


def test_counts_the_live_downloaders_of_this_host(redis_server, script_env):
    client = redis_server.client()
    workers = [
        subprocess.Popen([*run_script("downloader.py"), name], env=script_env, stderr=subprocess.DEVNULL)
        for name in ("0", "1")
    ]
    deadline = time.monotonic() + 30
    while client.scard(KEYS.workers) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run_monitor(script_env, "--once").returncode == 0
    assert HostSample.parse(client.hgetall(KEYS.host_record("testhost"))).downloaders == 2
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    assert [worker.wait(timeout=30) for worker in workers] == [0, 0]
    assert run_monitor(script_env, "--once").returncode == 0
    assert HostSample.parse(client.hgetall(KEYS.host_record("testhost"))).downloaders == 0
