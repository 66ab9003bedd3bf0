"""The suite deployed on several machines, played by network namespaces on one box (issue 7, "Several hosts").

Subnet 10.200.0.0/24, made by the test and reachable from nowhere else: a bridge in a hub namespace and one
namespace per machine, each with ``lo`` up and one veth on the bridge (see tests/netns.py).

  redis    10.200.0.1   redis-server (password, AOF, noeviction); add_task.py and save_error_task.py (the producer)
  images   10.200.0.2   tools/image_server.py on port 8080
  dl-01    10.200.0.11  monitor_disk.py and two downloaders (LAION_HOST_ID=dl-01, a store folder of its own)
  dl-02    10.200.0.12  monitor_disk.py and one downloader (LAION_HOST_ID=dl-02, a store folder of its own)

The books must balance across the hosts, speed.py must show both hosts from any namespace, and the saved error
records must be the failures. Skipped where namespaces cannot be made (not root, no iproute2, a container that
refuses ``ip netns add``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT, write_wide
from tests.netns import Host, NetnsUnavailable, Network, list_namespaces
from tests.redis_server import REDIS_SERVER
from tools.image_server import image_bytes

SUBNET = "10.200.0.0/24"
ADDRESSES = {"redis": "10.200.0.1", "images": "10.200.0.2", "dl-01": "10.200.0.11", "dl-02": "10.200.0.12"}
REDIS_PORT, IMAGES_PORT = 6379, 8080
IMAGE_URL = f"http://{ADDRESSES['images']}:{IMAGES_PORT}"
WORKERS = {"dl-01": ["0", "1"], "dl-02": ["0"]}  # downloader NAMEs per download host: "0" on both, told apart by host
ROWS = 600
FAILING = frozenset(range(9, ROWS, 10))  # every tenth row is a 404
SLOW = 0.2  # seconds the image server waits before each image: the run lasts a few seconds, so every worker works
SUBSET, PART = "multihost", "00000"
PYTHON = sys.executable

READY = """
import sys, time, urllib.request
import setting
from laion5b import cli, redisconn
client = redisconn.connect(cli.load_settings(setting))
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.monotonic() + 20
while True:
    try:
        client.ping()
        opener.open(sys.argv[1], timeout=2).read()
        break
    except Exception as error:
        if time.monotonic() > deadline:
            sys.exit(f"not ready: {error!r}")
        time.sleep(0.05)
"""

STATE = """
import json
import setting
from laion5b import cli, redisconn
config = cli.load_settings(setting)
client, keys = redisconn.connect(config), config.keys
workers = sorted(client.smembers(keys.workers))
print(json.dumps({
    "added": int(client.get(keys.tongji_all) or 0),
    "succeeded": int(client.get(keys.tongji_succ) or 0),
    "failed": int(client.get(keys.tongji_error) or 0),
    "bytes": int(client.get(keys.tongji_bytes) or 0),
    "queued": client.llen(keys.task),
    "error_list": client.llen(keys.error),
    "hosts": client.hgetall(keys.host_counters),
    "disk": client.hgetall(keys.tongji_disk),
    "leased": {worker: client.llen(keys.lease(worker)) for worker in workers},
    "records": {host: client.hgetall(keys.host_record(host)) for host in ("dl-01", "dl-02")},
}))
"""


@dataclass
class Deployment:
    """The four machines, the environment of each, and ways to look at the shared Redis from any of them."""

    net: Network
    folder: Path
    password: str

    def host(self, role: str) -> Host:
        return self.net.hosts[role]

    def env(self, host_id: str = "") -> dict[str, str]:
        """The settings every machine shares; with ``host_id``, that machine's id, store folder and disk path."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("LAION_") and "proxy" not in key.lower() and key != "PYTHONPATH"
        }
        env.update(
            PYTHONPATH=str(ROOT),
            LAION_REDIS_IP=ADDRESSES["redis"],
            LAION_REDIS_PORT=str(REDIS_PORT),
            LAION_REDIS_PASS=self.password,
            LAION_LOG_DIR="",
            LAION_PARQUET_DIR=str(self.folder / "parquet"),
            LAION_DONE_PATH=str(self.folder / "done_part.txt"),
            LAION_STORE_ERROR_DIR=str(self.folder / "error_task"),
            LAION_ALLOWED_NETWORKS=SUBNET,
            LAION_MONITOR_INTERVAL="1",
            LAION_HEARTBEAT_TTL="5",
            LAION_THREAD_NUM="8",
            LAION_MAX_PER_HOST="0",
            LAION_CONNECT_TIMEOUT="2",
            LAION_READ_TIMEOUT="3",
            LAION_DOWNLOAD_TIMEOUT="5",
            LAION_MIN_FREE_GB="0",
        )
        if host_id:
            machine = self.folder / host_id
            (machine / "images").mkdir(parents=True, exist_ok=True)
            env.update(LAION_HOST_ID=host_id, LAION_STORE_DIR=str(self.store(host_id)), LAION_MONITOR_DISK=str(machine))
        return env

    def store(self, host_id: str) -> Path:
        return self.folder / host_id / "images"

    def start(self, role: str, name: str, argv: list[str], host_id: str = "") -> subprocess.Popen:
        return self.net.popen(self.host(role), name, argv, self.env(host_id), ROOT)

    def run(self, role: str, argv: list[str], host_id: str = "", **env: str) -> subprocess.CompletedProcess:
        return self.net.run(self.host(role), argv, {**self.env(host_id), **env}, ROOT, timeout=60)

    def speed(self, role: str) -> dict:
        """``speed.py --json`` run on that machine."""
        result = self.run(role, script("speed.py", "--json"))
        assert result.returncode == 0, f"speed.py on {role}: {result.stderr[-2000:]}"
        return json.loads(result.stdout)

    def state(self, role: str) -> dict:
        """The Redis keys the books are made of, read from that machine."""
        result = self.run(role, [PYTHON, "-c", STATE])
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    def log(self, role: str, name: str) -> str:
        return self.net.log_tail(self.host(role), name)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """The four machines on 10.200.0.0/24; every process and namespace is removed afterwards, pass or fail."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip(f"redis-server not found at {REDIS_SERVER}")
    net = Network(SUBNET, tmp_path / "logs")
    try:
        try:
            net.create()
            for role, address in ADDRESSES.items():
                net.add_host(role, address)
        except NetnsUnavailable as error:
            pytest.skip(f"network namespaces cannot be made here: {error}")
        yield Deployment(net, tmp_path, secrets.token_hex(16))
    finally:
        net.close()


def script(name: str, *args: str) -> list[str]:
    return [PYTHON, str(ROOT / name), *args]


def start_redis(deployment: Deployment) -> None:
    """redis-server bound to the Redis machine's address only, with a password, AOF and noeviction."""
    folder = deployment.folder / "redis"
    folder.mkdir()
    config = folder / "redis.conf"
    config.touch(mode=0o600)
    config.write_text(
        f"bind {ADDRESSES['redis']}\nport {REDIS_PORT}\nprotected-mode yes\nrequirepass {deployment.password}\n"
        f'dir {folder}\nappendonly yes\nappendfsync everysec\nsave ""\nmaxmemory-policy noeviction\ndaemonize no\n'
    )
    deployment.start("redis", "redis-server", [REDIS_SERVER, str(config)])


def wait_until(condition: Callable[[], bool], seconds: float, message: Callable[[], str]) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, message()
        time.sleep(0.2)


def stored_files(store_dir: Path) -> list[Path]:
    return [path for path in store_dir.rglob("*") if path.is_file() and ".tmp" not in path.relative_to(store_dir).parts]


def same_books(a: dict, b: dict) -> bool:
    """Two speed.py snapshots agree on everything but the clock and the figures derived from it."""
    fields = ("added", "succeeded", "failed", "queued", "in_flight", "error_queue", "bytes", "total")
    hosts_a, hosts_b = ([(h["host"], h["succeeded"], h["failed"], h["bytes"]) for h in s["hosts"]] for s in (a, b))
    return hosts_a == hosts_b and all(a[field] == b[field] for field in fields)


def test_two_download_hosts_balance_the_books(deployment: Deployment):
    d = deployment
    for role, host in d.net.hosts.items():
        routes = d.net.routes(host)
        assert routes and all(route.startswith(f"{SUBNET} dev eth0 ") for route in routes), (role, routes)

    start_redis(d)
    d.start("images", "image-server", script("tools/image_server.py", "--host", ADDRESSES["images"], "--port",
            str(IMAGES_PORT)))  # fmt: skip
    ready = d.run("dl-01", [PYTHON, "-c", READY, f"{IMAGE_URL}/img/ready.jpg"])
    assert ready.returncode == 0, (ready.stderr, d.log("redis", "redis-server"), d.log("images", "image-server"))
    refused = d.run("dl-02", script("speed.py", "--json"), LAION_REDIS_PASS="")
    assert refused.returncode == 2 and refused.stdout == "", f"Redis answered without the password: {refused}"
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

    # Each download host's monitor runs all along; the workers start once both have published a sample.
    monitors = {role: d.start(role, "monitor", script("monitor_disk.py"), host_id=role) for role in WORKERS}

    # The producer, on the Redis machine, queues a parquet file of images and 404s.
    paths = ["/status/404" if row in FAILING else f"/slow/{SLOW}/n{row}.jpg" for row in range(ROWS)]
    ids = [f"mh{row:05d}" for row in range(ROWS)]
    write_wide(d.folder / "parquet" / SUBSET / f"{PART}.parquet", [IMAGE_URL + path for path in paths], hashes=ids)
    added = d.run("redis", script("add_task.py"), host_id="producer")
    assert added.returncode == 0, added.stderr[-2000:]

    wait_until(
        lambda: {h["host"] for h in d.speed("redis")["hosts"] if h["disk_age_seconds"] is not None} == set(WORKERS),
        15,
        lambda: f"no sample of both monitors: {d.log('dl-01', 'monitor')} {d.log('dl-02', 'monitor')}",
    )
    workers = {
        (role, name): d.start(role, f"downloader-{name}", script("downloader.py", name, "--until-empty"), role)
        for role in WORKERS
        for name in WORKERS[role]
    }

    # While they run, speed.py on the image server's machine shows both hosts with their live workers, a fresh
    # sample of their own monitor counting them, and traffic on their own network interface.
    seen: dict = {}

    def both_hosts_working() -> bool:
        nonlocal seen
        figures = d.speed("images")
        seen = {h["host"]: h for h in figures["hosts"]}
        assert figures["queued"] or figures["in_flight"], f"the queue drained before both hosts were seen: {seen}"
        return set(seen) == set(WORKERS) and all(
            seen[role]["live_workers"] == seen[role]["downloaders"] == len(names)
            and seen[role]["state"] == "ok"
            and (seen[role]["net_in_bps"] or 0) > 0
            for role, names in WORKERS.items()
        )

    wait_until(both_hosts_working, 20, lambda: f"speed.py never showed both hosts working: {seen}")

    for (role, name), process in workers.items():
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"downloader {name} on {role} ended with {code}: {d.log(role, f'downloader-{name}')}"

    # Every machine's speed.py shows the same books: every task done, both hosts idle with a fresh monitor sample.
    snapshots = {role: d.speed(role) for role in ADDRESSES}
    figures = snapshots["redis"]
    assert all(same_books(snapshot, figures) for snapshot in snapshots.values()), snapshots
    state = d.state("dl-02")
    counters = {key: int(value) for key, value in state["hosts"].items()}
    assert (figures["added"], figures["total"], state["added"]) == (ROWS, ROWS, ROWS)
    assert (figures["succeeded"], figures["failed"]) == (state["succeeded"], state["failed"])
    assert figures["succeeded"] + figures["failed"] == ROWS
    assert (figures["succeeded"], figures["failed"]) == (ROWS - len(FAILING), len(FAILING))
    assert (figures["queued"], figures["in_flight"], state["queued"]) == (0, 0, 0)
    assert not any(state["leased"].values()), state["leased"]
    hosts = {host["host"]: host for host in figures["hosts"]}
    assert set(hosts) == set(WORKERS), hosts
    for role, host in hosts.items():
        assert host["state"] == "idle" and not host["dead"] and host["live_workers"] == 0, host
        assert host["disk_used_gb"] is not None and host["disk_age_seconds"] <= 3, host
        assert (host["succeeded"], host["failed"]) == (counters[f"{role}:succ"], counters.get(f"{role}:error", 0))
        assert role in state["disk"] and f"{role}:ts" in state["disk"] and state["records"][role], state
    assert sum(counters.get(f"{role}:succ", 0) for role in WORKERS) == figures["succeeded"], counters
    assert sum(counters.get(f"{role}:error", 0) for role in WORKERS) == figures["failed"], counters

    # Each host's folder holds exactly the images that host counted, each the server's bytes, none on both hosts.
    stored: dict[str, dict[str, Path]] = {}
    for role in WORKERS:
        files = stored_files(d.store(role))
        stored[role] = {path.stem: path for path in files}
        assert counters[f"{role}:succ"] > 0, f"{role} stored nothing: {counters}"
        assert len(files) == len(stored[role]) == counters[f"{role}:succ"], (role, len(files), counters)
        assert counters[f"{role}:bytes"] == sum(path.stat().st_size for path in files), (role, counters)
        assert {path.parent for path in files} == {d.store(role) / SUBSET / PART / "00000"}
        assert not [p for p in (d.store(role) / ".tmp").rglob("*") if p.is_file()], f"{role}: temporary files left"
    assert not stored["dl-01"].keys() & stored["dl-02"].keys(), "an image was stored on both hosts"
    everything = stored["dl-01"] | stored["dl-02"]
    assert set(everything) == {ids[row] for row in range(ROWS) if row not in FAILING}
    for row in set(range(ROWS)) - FAILING:
        assert everything[ids[row]].read_bytes() == image_bytes(f"n{row}", "jpg"), ids[row]
    assert state["bytes"] == figures["bytes"] == sum(path.stat().st_size for path in everything.values())

    for role, monitor in monitors.items():
        monitor.send_signal(signal.SIGTERM)
        assert monitor.wait(timeout=15) == 0, d.log(role, "monitor")

    # The producer saves the error records: exactly the failures, each once, credited to the host that failed it.
    saved = d.run("redis", script("save_error_task.py", "--until-empty"), host_id="producer")
    assert saved.returncode == 0, saved.stderr[-2000:]
    records = [
        json.loads(line)
        for file in sorted((d.folder / "error_task").glob("*.txt"))
        for line in file.read_text().splitlines()
        if line.strip()
    ]
    assert len(records) == figures["failed"] == len(FAILING)
    assert len({record["record_id"] for record in records}) == len(records)
    assert sorted(record["id"] for record in records) == sorted(ids[row] for row in FAILING)
    assert Counter(record["status"] for record in records) == {404: len(FAILING)}
    failed_by_host = Counter(record["worker"].rpartition(":")[0] for record in records)
    assert failed_by_host == {role: counters.get(f"{role}:error", 0) for role in WORKERS}, failed_by_host
    assert d.state("redis")["error_list"] == 0

    logs = [path.read_text(errors="replace") for path in d.net.logs.glob("*.log")]
    assert logs and not any(d.password in text for text in logs), "the Redis password was printed or logged"


def test_no_namespace_of_this_run_is_left():
    """Runs after the test above, in the same process: its namespaces are gone from ``ip netns list``."""
    prefix = f"l5b{os.getpid()}-"
    assert not [name for name in list_namespaces() if name.startswith(prefix)]
