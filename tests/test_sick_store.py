"""A sick store as users meet it: a full disk the disk guard does not watch (a tiny tmpfs), a store remounted
read-only, and a store whose write never returns (a FIFO with no reader where the worker's shard goes). The worker
pauses instead of downloading the same images again and again, says why (speed.py, /metrics, its log), resumes by
itself once the store takes writes again, stops within its bound, and the books stay exact."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from laion5b import metrics, stats
from laion5b.fetchpolicy import Fetched
from laion5b.keys import Keys
from laion5b.leases import FAILED, RETURN, Owner
from laion5b.pipeline import Pipeline
from laion5b.shards import INCARNATION_CHARS, ShardSink
from laion5b.store import Store
from laion5b.storehealth import STORE_FAILING, StoreHealth, StoreProblem
from laion5b.tasks import Task
from tests.helpers import ASYNC_LOOPS, engine_env, run_script, start_logged_worker, wait_until
from tests.test_speed import speed_json
from tests.test_webdataset import assert_exact_books, queue
from tools.image_server import image_bytes

KEYS = Keys()
HOST = "testhost"
IN_FLIGHT = 8


@pytest.fixture
def env(script_env: dict[str, str]) -> dict[str, str]:
    return {
        **script_env,
        "LAION_ENGINE": "async",
        "LAION_CONCURRENCY": str(IN_FLIGHT),
        "LAION_THREAD_NUM": str(IN_FLIGHT),
        "LAION_ALLOWED_NETWORKS": "127.0.0.0/8",
        "LAION_HEARTBEAT_TTL": "3",
        "LAION_DOWNLOAD_TIMEOUT": "5",
        "LAION_SAVE_METADATA": "1",
    }


@pytest.fixture
def tiny_store(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs for store_dir; the disk guard watches tmp_path (script_env's monitor_disk), not it."""
    folder = tmp_path / "store"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True,
                             text=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def remount(folder: Path, options: str, timeout: float = 30) -> None:
    """Remount ``folder`` with ``options``, again while it is busy (a file open for writing blocks ``ro``)."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], capture_output=True).returncode:
        assert time.monotonic() < deadline, f"cannot remount {folder} {options}"
        time.sleep(0.01)


def host_store(env: dict[str, str]) -> tuple[str, str | None]:
    """The host's state and store errno as speed.py --json shows them."""
    host = next((host for host in speed_json(env)["hosts"] if host["host"] == HOST), None)
    return (host["state"], host["store_errno"]) if host else ("", None)


def exposition(redis_server) -> str:
    snapshot = stats.read_snapshot(redis_server.client(), KEYS, 3, 60)
    return metrics.exposition(snapshot).decode()


def assert_files_exact(client, store: Path, tasks: list[Task]) -> None:
    """Files output: every task stored once (image and metadata), none failed, no attempt used up."""
    images = [path for path in store.rglob("*.jpg") if ".tmp" not in path.parts]
    assert Counter(path.stem for path in images) == Counter(task.id for task in tasks)
    for image in images:
        assert json.loads(image.with_suffix(".json").read_text())["attempts"] == 1
    assert int(client.get(KEYS.tongji_succ)) == len(tasks) == int(client.get(KEYS.tongji_all))
    assert not client.get(KEYS.tongji_error) and not client.llen(KEYS.error)
    assert not [path for path in (store / ".tmp").rglob("*") if path.is_file()]


@pytest.mark.parametrize("output", ["webdataset", "files"])
def test_a_full_store_the_guard_does_not_see_pauses_and_resumes(
    tiny_store: Path, env, redis_server, image_server, tmp_path: Path, output: str
) -> None:
    """About 90 of 200 images fit: the worker pauses (no download loop), says store_failing ENOSPC, keeps what it
    stored, and finishes once the tmpfs grows; the full disk costs no attempt and at most 2 x in flight downloads."""
    client = redis_server.client()
    rows = 200
    tasks = queue(client, [image_server.url(f"/img/full-{output}-{row}.jpg") for row in range(rows)])
    log = tmp_path / "worker.log"
    asked = image_server.requests
    worker = start_logged_worker({**env, "LAION_OUTPUT_FORMAT": output, "LAION_STORE_DIR": str(tiny_store)}, log, "w",
                   "--until-empty")  # fmt: skip
    wait_until(lambda: "store_pause" in log.read_text(), timeout=60)
    assert "reason=store_failing errno=ENOSPC" in log.read_text()
    wait_until(lambda: host_store(env) == ("store_failing", "ENOSPC"), timeout=30)
    worker_problem = speed_json(env)["control"]["stores"][f"{HOST}:w"]
    assert worker_problem["store"] == "store_failing" and worker_problem["errno"] == "ENOSPC"
    view = subprocess.run([*run_script("speed.py"), "--once"], env=env, capture_output=True, text=True, timeout=30)
    assert "store_failing ENOSPC" in view.stdout and "1 store_failing" in view.stdout
    assert f'laion5b_host_store_failing{{errno="ENOSPC",host="{HOST}"}} 1.0' in exposition(redis_server)
    time.sleep(3)  # probes fail meanwhile: nothing is downloaded again
    fetched_while_full = image_server.requests - asked
    assert fetched_while_full < rows + 2 * IN_FLIGHT
    remount(tiny_store, "size=64m")
    assert worker.wait(timeout=90) == 0
    text = log.read_text()
    assert "store_resume" in text and "store_probe_failed" in text
    assert image_server.requests - asked < rows + 2 * IN_FLIGHT, "the full disk cost more than 2 x in flight"
    if output == "webdataset":
        stored = assert_exact_books(client, tiny_store, tasks)
        assert len(stored) == rows
        assert all(json.loads(files["json"])["attempts"] == 1 for files in stored.values())
    else:
        assert_files_exact(client, tiny_store, tasks)
    assert host_store(env)[0] != "store_failing"


def test_a_read_only_store_pauses_and_resumes_once_writable(
    tiny_store: Path, env, redis_server, image_server, tmp_path: Path
) -> None:
    """EROFS is the store's failure, not the tasks': no error record, no attempt used, the run ends once rw."""
    remount(tiny_store, "size=64m")
    client = redis_server.client()
    tasks = queue(client, [image_server.url(f"/slow/0.1/ro{row}.jpg") for row in range(150)])
    log = tmp_path / "worker.log"
    worker = start_logged_worker({**env, "LAION_STORE_DIR": str(tiny_store)}, log, "w", "--until-empty")
    wait_until(lambda: int(client.get(KEYS.tongji_succ) or 0) >= 10, timeout=60)
    remount(tiny_store, "ro")
    wait_until(lambda: "store_pause" in log.read_text(), timeout=30)
    assert "reason=store_failing errno=EROFS" in log.read_text()
    wait_until(lambda: host_store(env) == ("store_failing", "EROFS"), timeout=30)
    asked = image_server.requests
    time.sleep(2)
    assert image_server.requests - asked <= IN_FLIGHT, "a paused worker downloads no more than it had in flight"
    remount(tiny_store, "rw")
    assert worker.wait(timeout=90) == 0
    assert "store_resume" in log.read_text()
    assert_files_exact(client, tiny_store, tasks)


def stall_first_shard(client, store: Path, worker: subprocess.Popen, suffix: str) -> None:
    """Put a FIFO with no reader where the worker's first shard's tar (a put) or index (the sealer) goes: opening it
    for writing blocks for ever. Shards are named with the process's incarnation, which its heartbeat carries."""
    folder = store / ".tmp" / HOST / f"w.{worker.pid}"
    wait_until(folder.is_dir, timeout=30)
    owner = Owner.parse(client.get(KEYS.heartbeat(f"{HOST}:w")))
    assert owner is not None
    (folder / "sub").mkdir(exist_ok=True)
    os.mkfifo(folder / "sub" / f"{HOST}-w-000000-{owner.incarnation[:INCARNATION_CHARS]}{suffix}")


@pytest.mark.parametrize(
    ("stop", "engine", "hung"),
    [
        ("drain", "async", ".tar"),
        ("sigterm", "async", ".parquet"),
        ("sigterm", "threads", ".tar"),
        ("drain", "async-asyncio", ".parquet"),
    ],
)
def test_a_store_that_does_not_answer_is_shown_and_shutdown_is_bounded(
    env, redis_server, image_server, tmp_path: Path, stop: str, engine: str, hung: str
) -> None:
    """store_stalled after store_stall_seconds, whether a put or the sealer hangs; the engine keeps answering; drain
    and SIGTERM end within their bound with the stuck tasks returned, not counted; a fresh worker then finishes the
    run with exact books."""
    client = redis_server.client()
    store = tmp_path / "images"
    tasks = queue(client, [image_server.url(f"/slow/2/stall{row}.jpg") for row in range(24)])
    env = {**env, **engine_env(engine), "LAION_OUTPUT_FORMAT": "webdataset", "LAION_STORE_STALL_SECONDS": "1"}
    env["LAION_SHARD_SIZE"] = "4"
    log = tmp_path / "worker.log"
    asked = image_server.requests
    worker = start_logged_worker(env, log)
    stall_first_shard(client, store, worker, hung)
    wait_until(lambda: "reason=store_stalled" in log.read_text(), timeout=60)
    if engine in ASYNC_LOOPS:  # a thread of the threads engine downloads and stores: a hung write holds its slot
        assert image_server.requests - asked > IN_FLIGHT, "the event loop went on downloading while a write hung"
    wait_until(lambda: host_store(env)[0] == "store_stalled", timeout=30)
    assert f'laion5b_host_store_stalled{{host="{HOST}"}} 1.0' in exposition(redis_server)
    asked = time.monotonic()
    if stop == "drain":
        control = subprocess.run([*run_script("control.py"), "drain"], env=env, capture_output=True, timeout=30)
        assert control.returncode == 0
        assert worker.wait(timeout=40) == 3
    else:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=40) == 0
    assert time.monotonic() - asked < 30, "a stalled store must not hold the shutdown"
    assert not client.get(KEYS.tongji_succ) and not client.get(KEYS.tongji_error)
    assert client.llen(KEYS.task) == len(tasks) and not client.llen(KEYS.lease(f"{HOST}:w"))
    if stop == "drain":
        subprocess.run([*run_script("control.py"), "resume"], env=env, check=True, capture_output=True, timeout=30)
    finished = subprocess.run([*run_script("downloader.py"), "fresh", "--until-empty"], env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert len(assert_exact_books(client, store, tasks)) == len(tasks)


def test_a_closing_sink_refuses_puts_and_opens_no_shard(tmp_path: Path) -> None:
    """A finish still running once the worker stops (its coroutine cancelled) returns its task: no shard is opened
    after the last ones were sealed."""
    sink = ShardSink(tmp_path, HOST, "w", f"{HOST}:w", 10, 600, "0123456789abcdef")
    sink.open()
    task = Task("late", "http://127.0.0.1/late.jpg", "sub", "part", 0)
    sink.closing = True
    fetched = Fetched(image_bytes("late"), "jpg", None)
    outcome = Pipeline(sink, f"{HOST}:w", 3, 0.1, 60).finish(task, task.encode(), fetched)
    assert outcome[0] == RETURN and sink.unfinished == 0 and not list(tmp_path.rglob("*.tar"))
    sink.close()


def test_a_tasks_own_write_error_stays_its_own(tmp_path: Path) -> None:
    """A name too long for the file system is that task's error (an attempt used); the store stays healthy."""
    store = Store(tmp_path, HOST, "w", False)
    store.open()
    pipeline = Pipeline(store, f"{HOST}:w", 1, 0.1, 60)
    task = Task("x" * 300, "http://127.0.0.1/long.jpg", "sub", "part", 0)
    kind, _, payload = pipeline.finish(task, task.encode(), Fetched(image_bytes("long"), "jpg", None))
    assert kind == FAILED and str(payload).startswith("store_error|")
    assert not store.health.blocked and store.health.problem() is None
    healthy = Task("ok", "http://127.0.0.1/ok.jpg", "sub", "part", 1)
    assert pipeline.finish(healthy, healthy.encode(), Fetched(image_bytes("ok"), "jpg", None))[0] != RETURN
    store.close()


def test_a_failing_store_is_probed_on_a_backoff_until_a_probe_write_succeeds(tmp_path: Path) -> None:
    """EIO (a broken disk) is the store's failure too; probes come 2 s, then 4 s apart; a probe that writes, fsyncs and
    removes its file ends the failure."""
    health = StoreHealth()
    assert not health.failed(OSError(errno.ENAMETOOLONG, "too long"), "x")
    assert health.failed(OSError(errno.EIO, "broken", str(tmp_path / "a.tar")), "x", size=100_000)
    assert health.blocked and health.check(0.0, 60, tmp_path) == StoreProblem(STORE_FAILING, "EIO", f"{tmp_path}/a.tar")

    def probe_at(now: float, folder: Path) -> StoreProblem | None:
        health.check(now, 60, folder)  # starts the probe when due
        wait_until(lambda: not any(t.name == "store-probe" for t in threading.enumerate()), timeout=10)
        return health.check(now + 0.01, 60, folder)  # takes its result

    missing = tmp_path / "gone"
    assert probe_at(1.9, missing) is not None  # not due yet
    assert probe_at(2.0, missing) is not None  # due: fails (no such folder), the next one is 2 s later
    assert probe_at(3.9, tmp_path) is not None  # not due
    assert probe_at(4.1, tmp_path) is None and not health.blocked
    assert not list(tmp_path.iterdir())
