"""downloader.py as users run it: real processes, a real Redis, the loopback image server; every test runs once
per engine (threads, async on uvloop, async on asyncio's loop)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image

from laion5b.disk import publish_used
from laion5b.keys import Keys
from laion5b.tasks import Task
from tests.helpers import ENGINE_IDS, engine_env, run_script, start_logged_worker, wait_until
from tools.image_server import ImageServer, image_bytes

KEYS = Keys()


@pytest.fixture(params=ENGINE_IDS)
def env(script_env: dict[str, str], request: pytest.FixtureRequest) -> dict[str, str]:
    return {
        **script_env,
        **engine_env(request.param),
        "LAION_CONCURRENCY": "8",
        "LAION_ALLOWED_NETWORKS": "127.0.0.0/8",
        "LAION_THREAD_NUM": "8",
        "LAION_HEARTBEAT_TTL": "3",
        "LAION_CONNECT_TIMEOUT": "2",
        "LAION_READ_TIMEOUT": "2",
        "LAION_DOWNLOAD_TIMEOUT": "4",
        "LAION_MAX_IMAGE_BYTES": str(2 * 1024 * 1024),
    }


def engine_of(env: dict[str, str]) -> str:
    """The engine (and loop) that ``env`` runs, for names on the module's image server that differ between engines."""
    return f"{env['LAION_ENGINE']}-{env.get('LAION_ENGINE_LOOP', '')}"


def queue_urls(client, urls: list[str], subset: str = "s", part: str = "p") -> list[Task]:
    """Queue one task per URL the way add_task.py does, counting them in tongji_all."""
    tasks = [Task(id=f"id{row}", url=url, subset=subset, part=part, row=row) for row, url in enumerate(urls)]
    client.lpush(KEYS.task, *[task.encode() for task in tasks])
    client.incrby(KEYS.tongji_all, len(tasks))
    return tasks


def run_worker(env: dict[str, str], name: str = "0", *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*run_script("downloader.py"), name, "--until-empty", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_worker(env: dict[str, str], name: str = "0", *args: str) -> subprocess.Popen:
    return subprocess.Popen([*run_script("downloader.py"), name, *args], env=env, stderr=subprocess.PIPE, text=True)


def errors_by_id(client) -> dict[str, dict]:
    records = [json.loads(raw) for raw in client.lrange(KEYS.error, 0, -1)]
    ids = Counter(record["id"] for record in records)
    assert all(count == 1 for count in ids.values()), f"duplicate error records: {ids.most_common(3)}"
    return {record["id"]: record for record in records}


def stored_files(store_dir: Path) -> list[Path]:
    return [p for p in store_dir.rglob("*") if p.is_file() and ".tmp" not in p.parts]


def assert_books_balance(client, store_dir: Path, total: int) -> None:
    succeeded, failed = int(client.get(KEYS.tongji_succ) or 0), int(client.get(KEYS.tongji_error) or 0)
    assert succeeded + failed == total == int(client.get(KEYS.tongji_all))
    assert len(stored_files(store_dir)) == succeeded
    assert len(errors_by_id(client)) == failed
    assert client.llen(KEYS.task) == 0 and client.zcard(KEYS.delayed) == 0
    assert all(client.llen(KEYS.lease(worker)) == 0 for worker in client.smembers(KEYS.workers))
    assert not [p for p in (store_dir / ".tmp").rglob("*") if p.is_file()], "temporary files left behind"


def test_every_format_and_every_failure_kind(redis_server, env, image_server):
    cases = {
        "jpg": ("/img/a.jpg", "jpg"),
        "png": ("/img/b.png", "png"),
        "gif": ("/img/c.gif", "gif"),
        "webp": ("/img/d.webp", "webp"),
        "bmp": ("/img/e.bmp", "bmp"),
        "tiff": ("/img/f.tiff", "tiff"),
        "avif": ("/img/g.avif", "avif"),
        "wrongtype": ("/wrongtype/h.jpg", "jpg"),
        "redirected": ("/redirect/3/i.jpg", "jpg"),
        "404": ("/status/404", 404),
        "403": ("/status/403", 403),
        "500": ("/status/500", 500),
        "html": ("/html", "not_image"),
        "notimage": ("/notimage", "not_image"),
        "optout": ("/optout/noai/j.jpg", "disallowed"),
        "loop": ("/loop", "redirects"),
        "toomany": ("/redirect/6/k.jpg", "redirects"),
        "huge": ("/huge/100", "too_large"),
        "bomb": ("/gzipbomb", "too_large"),
        "trickle": ("/trickle", "timeout"),
        "reset": ("/reset", "connection"),
        "metadata": ("/redirect-to?url=http://169.254.169.254/latest/meta-data/", "blocked_address"),
    }
    client = redis_server.client()
    urls = [image_server.url(path) for path, _ in cases.values()]
    urls.append("ftp://127.0.0.1/x.jpg")
    tasks = queue_urls(client, urls)
    result = run_worker({**env, "LAION_DOWNLOAD_TIMEOUT": "1.5"})  # the trickle takes three deadlines
    assert result.returncode == 0, result.stderr[-2000:]
    store = Path(env["LAION_STORE_DIR"])
    errors = errors_by_id(client)
    for task, (name, (_, expected)) in zip(tasks, cases.items(), strict=False):
        if isinstance(expected, str) and expected in ("jpg", "png", "gif", "webp", "bmp", "tiff", "avif"):
            file = store / "s" / "p" / "00000" / f"{task.id}.{expected}"
            assert file.is_file(), f"{name}: not stored"
            assert task.id not in errors
        else:
            assert errors[task.id]["status"] == expected, f"{name}: {errors[task.id]}"
            assert errors[task.id]["url"] == task.url
    assert errors[tasks[-1].id]["status"] == "bad_url"
    assert errors[tasks[cases_index(cases, "500")].id]["attempts"] == 3
    assert_books_balance(client, store, len(urls))
    assert int(client.get(KEYS.tongji_bytes)) == sum(f.stat().st_size for f in stored_files(store))


def cases_index(cases: dict, name: str) -> int:
    return list(cases).index(name)


@pytest.mark.parametrize(
    ("retry_after", "backoff", "wait"),
    [("2", "0.1", 2.0), ("-", "1", 1.0)],
    ids=["retry-after", "backoff"],
)
def test_a_429_is_tried_again_after_the_wait_and_counted_once(
    redis_server, env, image_server, retry_after, backoff, wait
):
    client = redis_server.client()
    name = f"wait-{retry_after}-{engine_of(env)}"  # the server is the module's: a name per engine
    queue_urls(client, [image_server.url(f"/retry-after/{retry_after}/{name}.jpg")])
    result = run_worker({**env, "LAION_RETRY_BACKOFF": backoff})
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = image_server.asked(name)
    assert wait <= second - first < wait + 2, "tried again once the wait was over, not before, not much later"
    assert (int(client.get(KEYS.tongji_succ)), int(client.get(KEYS.tongji_error) or 0)) == (1, 0)
    assert_books_balance(client, Path(env["LAION_STORE_DIR"]), 1)


def test_tasks_waiting_for_a_retry_outlive_their_worker(redis_server, env, image_server):
    client = redis_server.client()
    names = [f"outlive{i}-{engine_of(env)}" for i in range(20)]
    total = len(queue_urls(client, [image_server.url(f"/retry-after/2/{name}.jpg") for name in names]))
    worker = start_worker(env, "doomed")
    wait_until(lambda: client.zcard(KEYS.delayed) == total)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    result = run_worker(env, "survivor")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in names:
        first, second = image_server.asked(name)
        assert second - first >= 2
    assert int(client.get(KEYS.tongji_succ)) == total
    assert_books_balance(client, Path(env["LAION_STORE_DIR"]), total)


def test_stored_bytes_are_what_the_server_sent(redis_server, env, image_server):
    client = redis_server.client()
    tasks = queue_urls(client, [image_server.url(f"/img/n{i}.jpg") for i in range(40)])
    assert run_worker(env).returncode == 0
    for i, task in enumerate(tasks):
        stored = Path(env["LAION_STORE_DIR"]) / "s" / "p" / "00000" / f"{task.id}.jpg"
        assert stored.read_bytes() == image_bytes(f"n{i}", "jpg")


def test_images_are_resized_and_filtered_with_the_books_exact(redis_server, env, image_server):
    cases = {  # path: the stored size, or the status of its refusal
        "/photo/200x100.jpg": (64, 64),
        "/photo/100x300.png": (64, 64),  # aspect ratio 3: not over the limit
        "/photo/48x40.webp": (64, 64),  # enlarged
        "/photo/300x120.jpg?orientation=6": (64, 64),
        "/photo/20x100.jpg": "too_small",
        "/photo/400x100.jpg": "bad_aspect",
        "/photo/1100x1000.jpg": "too_many_pixels",
        "/photo/200x100.jpg?truncate=600": "decode_error",
        "/img/h.heic": "decode_error",  # no decoder
        "/status/404": 404,
    }
    client = redis_server.client()
    tasks = queue_urls(client, [image_server.url(path) for path in cases])
    settings = {"LAION_RESIZE_MODE": "center_crop", "LAION_IMAGE_SIZE": "64", "LAION_MIN_IMAGE_SIZE": "32",
                "LAION_MAX_ASPECT_RATIO": "3", "LAION_MAX_IMAGE_AREA": "1000000"}  # fmt: skip
    result = run_worker({**env, **settings})
    assert result.returncode == 0, result.stderr[-2000:]
    store = Path(env["LAION_STORE_DIR"])
    errors = errors_by_id(client)
    for task, (path, expected) in zip(tasks, cases.items(), strict=True):
        if isinstance(expected, tuple):
            with Image.open(store / "s" / "p" / "00000" / f"{task.id}.jpg") as image:
                assert (image.format, image.size) == ("JPEG", expected), path
            assert task.id not in errors, path
        else:
            assert (errors[task.id]["status"], errors[task.id]["attempts"]) == (expected, 1), path
    assert_books_balance(client, store, len(tasks))
    assert int(client.get(KEYS.tongji_bytes)) == sum(f.stat().st_size for f in stored_files(store))


def test_captions_and_metadata_are_written_beside_each_image(redis_server, env, image_server):
    photo = image_server.url("/photo/120x80.png")
    urls = [photo, image_server.url(f"/redirect-to?url={quote(photo, safe='')}")]
    client = redis_server.client()
    tasks = [
        Task(id=f"m{row}", url=url, subset="s", part="p.a", row=row, text=f"caption {row} ü", meta={"NSFW": "NO"})
        for row, url in enumerate(urls)
    ]
    client.lpush(KEYS.task, *[task.encode() for task in tasks])
    client.incrby(KEYS.tongji_all, len(tasks))
    result = run_worker({**env, "LAION_SAVE_CAPTION": "1", "LAION_SAVE_METADATA": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    folder = Path(env["LAION_STORE_DIR"]) / "s" / "p.a" / "00000"
    for task in tasks:
        image = (folder / f"{task.id}.png").read_bytes()
        assert (folder / f"{task.id}.txt").read_text(encoding="utf-8") == task.text
        metadata = json.loads((folder / f"{task.id}.json").read_text(encoding="utf-8"))
        digest = hashlib.sha256(image).hexdigest()
        assert metadata == {
            **metadata,
            "key": f"p_a-{task.row:09d}",
            "id": task.id,
            "url": task.url,
            "caption": task.text,
            "NSFW": "NO",
            "final_url": photo,
            "ext": "png",
            "bytes": len(image),
            "sha256": digest,
            "original_sha256": digest,
            "width": 120,
            "height": 80,
            "original_width": 120,
            "original_height": 80,
            "host_id": "testhost",
            "worker": "testhost:0",
            "attempts": 1,
        }
        assert metadata["downloaded_at"].endswith("+00:00")
    client.lpush(KEYS.task, Task(id="r", url=photo, subset="s", part="q", row=0).encode())
    client.incr(KEYS.tongji_all)
    resize = {"LAION_SAVE_METADATA": "1", "LAION_RESIZE_MODE": "center_crop", "LAION_IMAGE_SIZE": "32"}
    resized = run_worker({**env, **resize})
    assert resized.returncode == 0, resized.stderr[-2000:]
    metadata = json.loads((Path(env["LAION_STORE_DIR"]) / "s" / "q" / "00000" / "r.json").read_text())
    stored = (Path(env["LAION_STORE_DIR"]) / "s" / "q" / "00000" / "r.jpg").read_bytes()
    assert (metadata["width"], metadata["height"], metadata["original_width"], metadata["original_height"]) == (
        32, 32, 120, 80)  # fmt: skip
    assert metadata["sha256"] == hashlib.sha256(stored).hexdigest() != metadata["original_sha256"]
    assert metadata["original_sha256"] == json.loads((folder / "m0.json").read_text())["sha256"]
    assert not (Path(env["LAION_STORE_DIR"]) / "s" / "q" / "00000" / "r.txt").exists()


def test_private_addresses_are_refused_by_default(redis_server, env, image_server):
    client = redis_server.client()
    queue_urls(client, [image_server.url("/img/a.jpg")])
    served = image_server.requests
    result = run_worker({**env, "LAION_ALLOWED_NETWORKS": ""})
    assert result.returncode == 0
    assert [r["status"] for r in errors_by_id(client).values()] == ["blocked_address"]
    assert image_server.requests == served


def test_max_per_host_holds_and_other_hosts_go_on_meanwhile(redis_server, env):
    slow_host, fast_host = ImageServer(host="127.0.0.3"), ImageServer(host="127.0.0.2")
    for server in (slow_host, fast_host):
        server.start()
    try:
        client = redis_server.client()
        slow = [slow_host.url(f"/slow/0.4/h{i}.jpg") for i in range(10)]
        fast = [fast_host.url(f"/img/f{i}.jpg") for i in range(6)]
        total = len(queue_urls(client, slow + fast))  # claimed in this order: the slow host first
        result = run_worker({**env, "LAION_MAX_PER_HOST": "2"})
        assert result.returncode == 0, result.stderr[-2000:]
        assert slow_host.most_in_progress("127.0.0.3") == 2
        slow_started = slow_host.started("127.0.0.3")
        assert max(slow_started) - min(slow_started) > 1.4  # five rounds of two, 0.4 s each
        assert max(fast_host.started("127.0.0.2")) < max(slow_started) - 1.0  # not held up behind the slow host
        assert_books_balance(client, Path(env["LAION_STORE_DIR"]), total)
    finally:
        slow_host.stop()
        fast_host.stop()


def test_a_repeated_task_finds_its_file_and_counts_once(redis_server, env, image_server):
    client = redis_server.client()
    queue_urls(client, [image_server.url("/img/a.jpg")])
    assert run_worker(env).returncode == 0
    served = image_server.requests
    queue_urls(client, [image_server.url("/img/a.jpg")])
    assert run_worker(env).returncode == 0
    assert image_server.requests == served
    assert int(client.get(KEYS.tongji_succ)) == 2
    assert len(stored_files(Path(env["LAION_STORE_DIR"]))) == 1


def test_bad_queue_entries_become_error_records(redis_server, env, image_server):
    client = redis_server.client()
    client.lpush(KEYS.task, "not json", '{"id": "../../x", "url": "http://a", "subset": "s", "part": "p", "row": 0}')
    client.incrby(KEYS.tongji_all, 2)
    assert run_worker(env).returncode == 0
    records = [json.loads(raw) for raw in client.lrange(KEYS.error, 0, -1)]
    assert sorted(r["status"] for r in records) == ["bad_task", "bad_task"]
    assert int(client.get(KEYS.tongji_error)) == 2


def test_kill_9_mid_run_loses_and_doubles_nothing(redis_server, env, image_server):
    client = redis_server.client()
    paths = [f"/slow/0.3/k{i}.jpg" if i % 10 else "/status/404" for i in range(240)]
    total = len(queue_urls(client, [image_server.url(path) for path in paths]))
    worker = start_worker(env, "0")
    wait_until(lambda: int(client.get(KEYS.tongji_succ) or 0) >= 40, interval=0.05)
    assert client.llen(KEYS.lease("testhost:0")) > 0, "the kill must land while tasks are leased"
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    result = run_worker(env, "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "returned_from_predecessor=" in result.stderr
    assert_books_balance(client, Path(env["LAION_STORE_DIR"]), total)


def test_a_dead_workers_leases_are_recovered_by_another(redis_server, env, image_server):
    client = redis_server.client()
    total = len(queue_urls(client, [image_server.url(f"/slow/0.2/d{i}.jpg") for i in range(100)]))
    worker = start_worker(env, "doomed")
    wait_until(lambda: client.llen(KEYS.lease("testhost:doomed")) > 0)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    result = run_worker(env, "survivor")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "leases_recovered" in result.stderr
    assert_books_balance(client, Path(env["LAION_STORE_DIR"]), total)


def test_second_live_process_with_the_same_identity_is_refused(redis_server, env, image_server):
    first = start_worker(env, "same")
    client = redis_server.client()
    wait_until(lambda: client.exists(KEYS.heartbeat("testhost:same")), timeout=30)
    second = subprocess.run([*run_script("downloader.py"), "same"], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert "identity_in_use" in second.stderr
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0


def test_sigterm_returns_held_tasks(redis_server, env, image_server):
    client = redis_server.client()
    total = len(queue_urls(client, [image_server.url(f"/slow/1/t{i}.jpg") for i in range(50)]))
    worker = start_worker({**env, "LAION_THREAD_NUM": "2"}, "0")
    wait_until(lambda: client.llen(KEYS.lease("testhost:0")) > 0, timeout=30)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, worker.stderr.read()[-3000:]
    done = int(client.get(KEYS.tongji_succ) or 0)
    assert client.llen(KEYS.task) + done == total
    assert client.llen(KEYS.lease("testhost:0")) == 0
    assert not client.exists(KEYS.heartbeat("testhost:0"))
    assert not list((Path(env["LAION_STORE_DIR"]) / ".tmp").rglob("*.*"))


def test_redis_restart_mid_run(redis_server, env, image_server):
    client = redis_server.client()
    total = len(queue_urls(client, [image_server.url(f"/slow/0.1/r{i}.jpg") for i in range(300)]))
    worker = start_worker(env, "0", "--until-empty")
    wait_until(lambda: int(client.get(KEYS.tongji_succ) or 0) >= 30)
    redis_server.restart()
    assert worker.wait(timeout=120) == 0
    client = redis_server.client()
    assert_books_balance(client, Path(env["LAION_STORE_DIR"]), total)


def test_disk_guard_pauses_and_resumes(redis_server, env, image_server, tmp_path):
    client = redis_server.client()
    publish_used(client, KEYS, "testhost", 10**9)
    total = len(queue_urls(client, [image_server.url(f"/img/g{i}.jpg") for i in range(20)]))
    log = tmp_path / "worker.log"
    worker_env = {**env, "LAION_MONITOR_INTERVAL": "1", "LAION_STOP_THRESHOLD": "100"}
    worker = start_logged_worker(worker_env, log, "0", "--until-empty")

    def paused() -> bool:
        publish_used(client, KEYS, "testhost", 10**9)  # a fresh figure: a stale one counts as no monitor
        return "disk_pause" in log.read_text()

    wait_until(paused, timeout=30, interval=0.5)
    for _ in range(4):
        publish_used(client, KEYS, "testhost", 10**9)
        time.sleep(0.5)
    assert client.llen(KEYS.task) == total, "a paused worker takes no task"
    publish_used(client, KEYS, "testhost", 0)
    assert worker.wait(timeout=60) == 0
    assert "disk_resume" in log.read_text()
    assert int(client.get(KEYS.tongji_succ)) == total


def test_a_lease_the_worker_does_not_hold_is_returned_and_done(redis_server, env, image_server):
    """What a Redis that lost its last writes leaves behind: a task in a worker's lease list that it never took."""
    client = redis_server.client()
    queue_urls(client, [image_server.url("/slow/3/busy.jpg")])
    worker = start_worker({**env, "LAION_HEARTBEAT_TTL": "2"}, "0", "--until-empty")
    wait_until(lambda: client.llen(KEYS.lease("testhost:0")) > 0, timeout=30)
    stray = Task(id="stray", url=image_server.url("/img/stray.jpg"), subset="s", part="p", row=1)
    client.lpush(KEYS.lease("testhost:0"), stray.encode())
    client.incr(KEYS.tongji_all)
    assert worker.wait(timeout=60) == 0
    assert "strays_returned" in worker.stderr.read()
    assert_books_balance(client, Path(env["LAION_STORE_DIR"]), 2)


def test_the_async_engine_runs_on_uvloop_or_falls_back_to_asyncio_once(
    redis_server, script_env, image_server, tmp_path
):
    """Asked for uvloop, the async engine runs on it (worker_start says loop=uvloop); where uvloop cannot be imported
    it runs on asyncio's loop, says so in one engine_loop_fallback line, and stores as well."""
    client = redis_server.client()
    hidden = tmp_path / "no-uvloop"
    hidden.mkdir()
    (hidden / "uvloop.py").write_text('raise ImportError("uvloop is not installed here")\n')
    env = {**script_env, "LAION_ENGINE": "async", "LAION_ENGINE_LOOP": "uvloop"}
    env["LAION_ALLOWED_NETWORKS"] = "127.0.0.0/8"
    for name, extra, loop in (("0", {}, "uvloop"), ("1", {"PYTHONPATH": f"{hidden}:{env['PYTHONPATH']}"}, "asyncio")):
        queue_urls(client, [image_server.url(f"/img/loop{name}.jpg")], part=name)
        result = run_worker({**env, **extra}, name)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"engine=async loop={loop} " in result.stderr and " ERROR " not in result.stderr
        fallbacks = [line for line in result.stderr.splitlines() if "engine_loop_fallback" in line]
        expected = ["wanted=uvloop reason=uvloop is not installed here"] if loop == "asyncio" else []
        assert [line.partition("engine_loop_fallback ")[2] for line in fallbacks] == expected
    assert_books_balance(client, Path(env["LAION_STORE_DIR"]), 2)


def test_threads_past_the_knee_are_named_at_start(redis_server, script_env):
    result = run_worker({**script_env, "LAION_ENGINE": "threads", "LAION_THREAD_NUM": "200"})
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if "threads_past_knee" in line]
    assert len(warnings) == 1 and "engine=async" in warnings[0]
    quiet = run_worker({**script_env, "LAION_ENGINE": "threads", "LAION_THREAD_NUM": "128"})
    assert quiet.returncode == 0 and "threads_past_knee" not in quiet.stderr
