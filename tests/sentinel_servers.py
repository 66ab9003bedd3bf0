"""A master, its replicas and three sentinels (``redis-server --sentinel``) on loopback ports, in a temporary folder,
each stopped by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import redis

from tests.redis_server import REDIS_SERVER, RedisServer, free_port

MASTER_NAME = "laion5b"
DOWN_AFTER_MS = 2000
"""The sentinels' down-after-milliseconds: a master that does not answer this long is failed over. At 1000 ms a
loaded machine saw sentinels fail over the just promoted replica again (not pinged within 1 s of the switch)."""
FAILOVER_TIMEOUT_MS = 5000


class SentinelServer:
    """One sentinel process with a generated configuration file (the sentinel rewrites it as it learns)."""

    def __init__(self, folder: Path, master_port: int, quorum: int, password: str = "") -> None:
        self.folder = folder
        self.port = free_port()
        self.password = password
        self.config = folder / "sentinel.conf"
        secured = f"requirepass {password}\nsentinel auth-pass {MASTER_NAME} {password}\n" if password else ""
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {folder}\nlogfile {folder / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n{secured}"
        )
        self.process = subprocess.Popen(
            [REDIS_SERVER, str(self.config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=2,
                           password=self.password or None)  # fmt: skip

    def master(self) -> dict:
        """What this sentinel knows of the master ({} until it answers)."""
        try:
            return self.client().sentinel_master(MASTER_NAME)
        except (redis.ConnectionError, redis.ResponseError):
            return {}

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)


class SentinelSet:
    """A master with ``replicas`` replicas, all with AOF, watched by three sentinels (quorum 2); with ``password``
    every one of them (sentinels included) asks for it."""

    def __init__(self, folder: Path, replicas: int = 1, password: str = "") -> None:
        self.password = password
        self.servers: list[RedisServer] = []
        self.sentinels: list[SentinelServer] = []
        master = self._server(folder / "master")
        master.start()
        for number in range(replicas):
            replica = self._server(folder / f"replica{number}", "--replicaof", "127.0.0.1", str(master.port))
            replica.start()
        for number in range(3):
            sentinel_folder = folder / f"sentinel{number}"
            sentinel_folder.mkdir()
            self.sentinels.append(SentinelServer(sentinel_folder, master.port, quorum=2, password=password))
        self.wait_until(
            lambda: self._ready(master.port, replicas), 30, "the sentinels to see each other and the replicas"
        )

    def _server(self, folder: Path, *extra: str) -> RedisServer:
        folder.mkdir()
        # without the delay a first sync waits 5 s
        server = RedisServer(folder, "--repl-diskless-sync-delay", "0", *extra, password=self.password)
        self.servers.append(server)
        return server

    def _ready(self, master_port: int, replicas: int) -> bool:
        states = [sentinel.master() for sentinel in self.sentinels]
        return all(
            state.get("port") == master_port
            and state.get("num-other-sentinels") == 2
            and state.get("num-slaves") == replicas
            and not state.get("is_sdown")
            for state in states
        )

    def master_port(self) -> int | None:
        """The master's port as the sentinels agree on it (None while they disagree or know none)."""
        ports = {state.get("port") for state in (sentinel.master() for sentinel in self.sentinels)}
        return ports.pop() if len(ports) == 1 else None

    def server(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def master(self) -> RedisServer:
        port = self.master_port()
        assert port is not None
        return self.server(port)

    def replicas_in_sync(self) -> bool:
        """Whether every replica of the current master has its whole replication stream."""
        info = self.master().client().info("replication")
        offset = info["master_repl_offset"]
        found = [info[name] for name in info if name.startswith("slave") and isinstance(info[name], dict)]
        return bool(found) and all(replica["offset"] == offset for replica in found)

    def addresses(self) -> str:
        """The sentinels as the redis_sentinels setting lists them."""
        return ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)

    def environ(self) -> dict[str, str]:
        """Environment overrides that point the suite's scripts at this set through its sentinels."""
        return {
            "LAION_REDIS_SENTINELS": self.addresses(),
            "LAION_REDIS_MASTER_NAME": MASTER_NAME,
            "LAION_REDIS_IP": "127.0.0.1",
            "LAION_REDIS_PORT": "1",  # never used: the sentinels name the master
            "LAION_REDIS_DB": "0",
        }

    @staticmethod
    def wait_until(condition, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {seconds} s for {what}")
            time.sleep(0.05)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                sentinel.stop()
        for server in self.servers:
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                server.stop()
