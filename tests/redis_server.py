"""A real redis-server started on a free loopback port in a temporary folder, stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """One private redis-server process with AOF persistence; restartable on the same port and data."""

    def __init__(self, folder: Path, *extra: str, password: str = "") -> None:
        self.folder = folder
        self.port = free_port()
        self.password = password
        self.extra = (*extra, "--requirepass", password, "--masterauth", password) if password else extra
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.folder),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.folder / "redis.log"),
            *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self, **options) -> redis.Redis:
        options.setdefault("password", self.password or None)
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, **options)

    def environ(self) -> dict[str, str]:
        """Environment overrides that point the suite's scripts at this server."""
        return {"LAION_REDIS_IP": "127.0.0.1", "LAION_REDIS_PORT": str(self.port), "LAION_REDIS_DB": "0"}
