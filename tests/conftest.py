"""Fixtures: a real redis-server per test, environments for the scripts, and the loopback image server."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT
from tests.http_fixtures import image_server  # noqa: F401
from tests.redis_server import RedisServer
from tests.s3_server import S3Server

SESSION_SERVICES: set[int] = set()
"""PIDs of the servers that live for the whole run (the S3 server), spared by ``no_leftover_processes``."""


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Kill whatever a test started and left running (a failed assertion must not leave workers behind)."""
    yield
    for child in psutil.Process().children(recursive=True):
        if child.pid in SESSION_SERVICES:
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server of this test's own, stopped by PID afterwards."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One S3 server (moto) for the whole run, started on first use (2-4 s), stopped by PID at the end."""
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    assert server.process is not None
    SESSION_SERVICES.add(server.process.pid)
    yield server
    server.stop()


@pytest.fixture
def s3_server(s3_service: S3Server) -> Iterator[S3Server]:
    """The S3 server with a fresh bucket of this test's own; thawed and its user's permission given back after."""
    server = s3_service.with_new_bucket()
    yield server
    server.thaw()
    if server.revoked:
        server.grant()


@pytest.fixture
def script_env(redis_server: RedisServer, tmp_path: Path) -> dict[str, str]:
    """Environment for running the suite's scripts against this test's Redis and folders."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LAION_")}
    env.update(redis_server.environ())
    env.update(
        LAION_PARQUET_DIR=str(tmp_path / "parquet"),
        LAION_DONE_PATH=str(tmp_path / "done_part.txt"),
        LAION_STORE_DIR=str(tmp_path / "images"),
        LAION_STORE_ERROR_DIR=str(tmp_path / "error_task"),
        LAION_LOG_DIR="",
        LAION_MONITOR_DISK=str(tmp_path),
        LAION_HOST_ID="testhost",
        LAION_MIN_FREE_GB="0",
        LAION_MAX_PER_HOST="0",
        LAION_RETRY_BACKOFF="0.1",
        PYTHONPATH=str(ROOT),
    )
    return env
