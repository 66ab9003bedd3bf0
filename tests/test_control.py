"""control.py against real workers: pause, resume and drain acknowledged within 10 s, books exact throughout; a
drain holds for workers started in its scope until resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from laion5b import control
from laion5b.keys import Keys
from tools.liverun import LiveRun, wait_until, write_urls

KEYS = Keys()
ACK_WITHIN = 10.0


def books(client) -> dict[str, int]:
    """The counters and where every task is, read in one transaction."""
    workers = sorted(client.smembers(KEYS.workers))
    pipe = client.pipeline(transaction=True)
    for key in (KEYS.tongji_all, KEYS.tongji_succ, KEYS.tongji_error):
        pipe.get(key)
    pipe.llen(KEYS.task)
    pipe.zcard(KEYS.delayed)
    for worker in workers:
        pipe.llen(KEYS.lease(worker))
    added, succeeded, failed, queued, delayed, *leased = pipe.execute()
    figures = {"added": int(added or 0), "succeeded": int(succeeded or 0), "failed": int(failed or 0)}
    return {**figures, "queued": queued, "delayed": delayed, "in_flight": sum(leased)}


def exact(figures: dict[str, int]) -> bool:
    held = figures["succeeded"] + figures["failed"] + figures["queued"] + figures["delayed"] + figures["in_flight"]
    return figures["added"] == held


def acks(client) -> dict[str, str]:
    return {identity: json.loads(text)["state"] for identity, text in client.hgetall(KEYS.control_acks).items()}


def acked(client, identities: list[str], state: str) -> float:
    """Seconds until every worker of ``identities`` acknowledged ``state``."""
    started = time.monotonic()
    wait_until(lambda: all(acks(client).get(identity) == state for identity in identities), ACK_WITHIN)
    return time.monotonic() - started


@pytest.fixture
def live(redis_server, script_env, image_server, tmp_path):
    urls = [image_server.url(f"/slow/0.05/img{i}.jpg") for i in range(6000)] + [image_server.url("/status/404")] * 50
    write_urls(Path(script_env["LAION_PARQUET_DIR"]), urls)
    env = {**script_env, "LAION_ALLOWED_NETWORKS": "127.0.0.0/8", "LAION_HEARTBEAT_TTL": "3", "LAION_THREAD_NUM": "8"}
    run = LiveRun(env)
    yield run
    run.stop_all()


def test_pause_resume_drain(live, redis_server):
    client = redis_server.client()
    assert live.run("add_task.py").returncode == 0
    live.start("worker-0", "downloader.py", "0")
    live.start("worker-1", "downloader.py", "1", env={**live.env, "LAION_ENGINE": "async", "LAION_CONCURRENCY": "8"})
    identities = ["testhost:0", "testhost:1"]  # one worker of each engine
    wait_until(lambda: int(client.get(KEYS.tongji_succ) or 0) >= 100, 60)

    assert live.run("control.py", "pause").returncode == 0
    paused_in = acked(client, identities, control.PAUSED)
    before = books(client)
    time.sleep(1.5)
    after = books(client)
    assert before == after and after["in_flight"] == 0 and exact(after), "paused workers hold and do nothing"
    status = live.run("control.py", "status")
    assert "paused: run" in status.stdout and "testhost:0  paused" in status.stdout, status.stdout

    assert live.run("control.py", "resume").returncode == 0
    resumed_in = acked(client, identities, control.RUNNING)
    wait_until(lambda: books(client)["succeeded"] > after["succeeded"] + 50, 30)

    assert live.run("control.py", "drain", "--host", "testhost", "--worker", "0").returncode == 0
    started = time.monotonic()
    assert live.processes["worker-0"].wait(ACK_WITHIN) == control.EXIT_DRAINED
    drained_in = time.monotonic() - started
    live.processes.pop("worker-0")
    assert acks(client)["testhost:0"] == control.DRAINED
    assert "testhost:0" not in client.smembers(KEYS.workers) and exact(books(client))

    restarted = live.start("worker-0", "downloader.py", "0")  # systemd restarting it: the drain is a state
    assert restarted.wait(30) == control.EXIT_DRAINED
    live.processes.pop("worker-0")
    assert acks(client)["testhost:0"] == control.DRAINED and client.llen(KEYS.lease("testhost:0")) == 0
    assert live.run("control.py", "resume", "--host", "testhost", "--worker", "0").returncode == 0
    assert "drains asked: none" in live.run("control.py", "status").stdout
    progress = books(client)["succeeded"]
    live.start("worker-0", "downloader.py", "0")  # started again after the resume: it works
    wait_until(lambda: acks(client).get("testhost:0") == control.RUNNING, 30)
    wait_until(lambda: books(client)["succeeded"] > progress + 100, 30)

    assert live.run("control.py", "drain").returncode == 0
    for label in ("worker-0", "worker-1"):
        assert live.processes.pop(label).wait(ACK_WITHIN) == control.EXIT_DRAINED
    final = books(client)
    assert final["in_flight"] == 0 and exact(final) and final["queued"] > 0
    print(f"pause acknowledged in {paused_in:.2f} s, resume in {resumed_in:.2f} s, drain exit in {drained_in:.2f} s")


def test_a_run_wide_pause_holds_the_producer_and_a_host_pause_does_not(live, redis_server):
    client = redis_server.client()
    assert live.run("control.py", "pause", "--host", "testhost").returncode == 0
    assert live.run("add_task.py").returncode == 0, "a host's pause leaves the producer alone"
    assert int(client.get(KEYS.tongji_all)) == 6050
    client.delete(KEYS.positions, KEYS.tongji_all, KEYS.task)
    Path(live.env["LAION_DONE_PATH"]).unlink()
    assert live.run("control.py", "pause").returncode == 0
    producer = live.start("producer", "add_task.py")
    time.sleep(2.5)
    assert producer.poll() is None and int(client.get(KEYS.tongji_all) or 0) == 0
    assert live.run("control.py", "resume").returncode == 0
    assert producer.wait(30) == 0 and int(client.get(KEYS.tongji_all)) == 6050
    assert client.hlen(KEYS.control) == 0, "resume of the run lifts every pause"
