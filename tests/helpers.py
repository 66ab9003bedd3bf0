"""Helpers for tests: paths, script command lines, and LAION-shaped parquet files written with pyarrow."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from laion5b.eventloop import loop_factory
from laion5b.keys import Keys
from laion5b.leases import Leases
from laion5b.tasks import Task

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "laion_sample_10000.parquet"
ASYNC_LOOPS = {"async": "uvloop", "async-asyncio": "asyncio"}
"""Ids of the async engine in tests, and the event loop (engine_loop) each runs on: "async" on uvloop."""
ENGINE_IDS = ["threads", *ASYNC_LOOPS]
"""Every engine a worker test runs on: the threads engine, the async engine on each loop."""
Result = TypeVar("Result")


def engine_env(engine: str) -> dict[str, str]:
    """The ``LAION_*`` variables that run a worker on ``engine``, one of ENGINE_IDS."""
    if engine in ASYNC_LOOPS:
        return {"LAION_ENGINE": "async", "LAION_ENGINE_LOOP": ASYNC_LOOPS[engine]}
    return {"LAION_ENGINE": engine}


def run_on_loop(engine: str, main: Coroutine[Any, Any, Result]) -> Result:
    """Run ``main`` to its end on a new event loop of ``engine`` (an async id of ENGINE_IDS), as asyncio.run does."""
    with asyncio.Runner(loop_factory=loop_factory(ASYNC_LOOPS[engine])[1]) as runner:
        return runner.run(main)


def webdataset_env(script_env: dict[str, str], **settings: str) -> dict[str, str]:
    """The scripts' environment for a quick webdataset run on loopback, with ``settings`` (``LAION_*``) on top."""
    return {
        **script_env,
        "LAION_OUTPUT_FORMAT": "webdataset",
        "LAION_ALLOWED_NETWORKS": "127.0.0.0/8",
        "LAION_THREAD_NUM": "8",
        "LAION_CONCURRENCY": "8",
        "LAION_HEARTBEAT_TTL": "3",
        "LAION_DOWNLOAD_TIMEOUT": "5",
        **settings,
    }


def run_script(name: str) -> list[str]:
    """The command line that runs one of the suite's scripts with this interpreter."""
    return [sys.executable, str(ROOT / name)]


def start_logged_worker(env: dict[str, str], log: Path, name: str = "w", *args: str) -> subprocess.Popen:
    """``downloader.py name *args`` whose log goes to the file ``log`` (read while it runs)."""
    with log.open("a") as stderr:
        return subprocess.Popen([*run_script("downloader.py"), name, *args], env=env, stderr=stderr)


def write_original(path: Path, urls: list, texts: list | None = None, sample_ids: list | None = None, **kw) -> Path:
    """A parquet file with the original LAION columns (URL, TEXT, SAMPLE_ID, WIDTH, HEIGHT, ...)."""
    n = len(urls)
    columns = {
        "SAMPLE_ID": sample_ids if sample_ids is not None else [float(1000 + i) for i in range(n)],
        "URL": urls,
        "TEXT": texts if texts is not None else [f"caption {i}" for i in range(n)],
        "HEIGHT": [256] * n,
        "WIDTH": [256] * n,
        "LICENSE": ["?"] * n,
        "NSFW": ["UNLIKELY"] * n,
        "similarity": [0.3] * n,
    }
    return _write(path, columns, **kw)


def write_wide(path: Path, urls: list, hashes: list | None = None, **kw) -> Path:
    """A parquet file of the merged wide table (url, hash, image_suffix, ...)."""
    n = len(urls)
    columns = {
        "url": urls,
        "hash": hashes if hashes is not None else [f"{i:032x}" for i in range(n)],
        "image_suffix": ["jpg"] * n,
        "caption": [f"wide caption {i}" for i in range(n)],
    }
    return _write(path, columns, **kw)


def _write(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def wait_until(condition: Callable[[], object], timeout: float = 60.0, interval: float = 0.02) -> None:
    """Poll ``condition`` until it is true; fail the test when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {timeout} s"
        time.sleep(interval)


def kill_add_task_midway(env: dict[str, str], client, rows: int, file_key: str) -> int:
    """Start add_task.py, SIGKILL it once a quarter of ``rows`` is queued; return the file's recorded position (the
    rows queued, all of them in the queue)."""
    process = subprocess.Popen(run_script("add_task.py"), env=env, stderr=subprocess.DEVNULL)
    wait_until(lambda: client.llen("laion5b_task") >= rows // 4, interval=0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    position = int(client.hget("laion5b_task:position", file_key))
    assert 0 < position < rows, "the kill must land in the middle of the file"
    assert client.llen("laion5b_task") == position
    return position


def claimed_by_a_dead_worker(client, keys: Keys, host: str, rows: int) -> tuple[Leases, list[str]]:
    """``rows`` tasks queued, then claimed by the worker ``<host>:dead``, which will never record them: what a test
    of recovery starts from. Returns its leases and the tasks as claimed."""
    tasks = [Task(f"id{row}", f"http://127.0.0.1/{row}.jpg", "sub", "p", row, "text") for row in range(rows)]
    client.lpush(keys.task, *[task.encode() for task in tasks])
    dead = Leases(client, keys, host, f"{host}:dead", 30)
    dead.register()
    return dead, dead.claim(rows)
