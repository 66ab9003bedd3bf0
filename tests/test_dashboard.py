"""speed.py --serve during a real run: the page in headless Chromium, /metrics against Redis, the token."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from laion5b.hostledger import HostLedger, HostReport
from laion5b.keys import Keys
from tests.redis_server import free_port
from tools.liverun import LiveRun, browser, chart_points, chromium_missing, get_json, script, wait_until, write_urls

KEYS = Keys()
TOKEN = "s3cret-dashboard-token"


def urls(image_server, count: int) -> list[str]:
    """``count`` images, with a 404 after every 100th and a non-image after every 400th from the start."""
    mix = []
    for i in range(count):
        mix.append(image_server.url(f"/slow/0.02/img{i}.jpg?size={2000 + i}"))
        if i % 100 == 0:
            mix.append(image_server.url("/status/404"))
        if i % 400 == 0:
            mix.append(image_server.url("/notimage"))
    return mix


@pytest.fixture
def live(redis_server, script_env, image_server):
    env = {
        **script_env,
        "LAION_ALLOWED_NETWORKS": "127.0.0.0/8",
        "LAION_HEARTBEAT_TTL": "3",
        "LAION_THREAD_NUM": "8",
        "LAION_MONITOR_INTERVAL": "1",
    }
    write_urls(Path(env["LAION_PARQUET_DIR"]), urls(image_server, 4000))
    run = LiveRun(env)
    assert run.run("add_task.py").returncode == 0
    yield run
    run.stop_all()


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def metrics(base: str) -> dict[tuple[str, tuple], float]:
    status, body = fetch(base + "/metrics")
    assert status == 200
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.documentation, f"{family.name} has a HELP text"
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


@pytest.mark.skipif(chromium_missing() is not None, reason=chromium_missing() or "")
def test_the_page_in_chromium_shows_the_run(live, redis_server):
    client = redis_server.client()
    live.start_workers(2)
    live.start("monitor", "monitor_disk.py")
    base = live.serve(free_port())
    HostLedger(client, KEYS, "testhost:9", 4, 16, 3).sync([HostReport("busy.test", throttles=2, retry_after=600)])
    wait_until(lambda: int(client.get(KEYS.tongji_succ) or 0) >= 50, 60)
    driver = browser()
    try:
        driver.get(base + "/?every=0.5")
        points = wait_until(lambda: (p := chart_points(driver)) and min(p.values()) >= 4 and p, 30)
        assert set(points) == {"rate", "held", "disk"}
        rates = driver.execute_script("return window.laionCharts.rate.data.slice(1).flat().filter(v => v > 0).length")
        assert rates >= 2, "images/s were drawn"
        assert live.run("control.py", "pause").returncode == 0
        wait_until(lambda: not any(client.llen(KEYS.lease(w)) for w in client.smembers(KEYS.workers)), 15)
        succeeded = int(client.get(KEYS.tongji_succ))
        shown = wait_until(lambda: driver.find_element("id", "succeeded").text == f"{succeeded:,}", 10)
        assert shown
        assert "PAUSED: run" in driver.find_element("id", "state").text
        assert "testhost" in driver.find_element("id", "hosts").text
        assert "404" in driver.find_element("id", "failures").text
        assert re.search(r"busy\.test 2 2 0 5\d\d s", driver.find_element("id", "throttled").text)  # paused ~600 s
        width = driver.execute_script("return document.documentElement.scrollWidth")
        assert width <= 1366, "no sideways scrolling on a laptop screen"
    finally:
        driver.quit()


def test_metrics_equal_redis_and_api_status_has_history(live, redis_server):
    client = redis_server.client()
    base = live.serve(free_port())
    HostLedger(client, KEYS, "testhost:9", 4, 16, 3).sync([HostReport("busy.test", throttles=2, retry_after=600)])
    assert live.run("downloader.py", "0", "--until-empty", env={"LAION_THREAD_NUM": "64"}).returncode == 0
    assert live.run("monitor_disk.py", "--once").returncode == 0
    found = metrics(base)
    redis_counts = {name: int(client.get(key) or 0) for name, key in (
        ("added", KEYS.tongji_all), ("succeeded", KEYS.tongji_succ), ("bytes", KEYS.tongji_bytes),
        ("failed", KEYS.tongji_error))}  # fmt: skip
    assert redis_counts["succeeded"] == 4000 and redis_counts["failed"] == 50
    for name in ("added", "succeeded", "bytes"):
        assert found[f"laion5b_{name}_total", ()] == redis_counts[name], name
    assert found["laion5b_failed", ()] == 50 and found["laion5b_requeued_total", ()] == 0
    host = (("host", "testhost"),)
    assert found["laion5b_host_succeeded_total", host] == int(client.hget(KEYS.host_counters, "testhost:succ"))
    assert found["laion5b_host_bytes_total", host] == redis_counts["bytes"]
    assert found["laion5b_failures", (("status", "404"),)] == 40
    assert found["laion5b_failures", (("status", "not_image"),)] == 10
    assert found["laion5b_paused", (("scope", "run"),)] == 0
    assert found["laion5b_host_disk_free_gb", host] > 0
    web_host = (("web_host", "busy.test"),)
    assert found["laion5b_web_host_throttles", web_host] == 2 and found["laion5b_web_host_limit", web_host] == 2
    assert 500 < found["laion5b_web_host_paused_seconds", web_host] <= 600
    gauges = {name: found[f"laion5b_{name}", ()] for name in ("queued", "delayed", "in_flight", "error_queue")}
    assert gauges == {"queued": 0, "delayed": 0, "in_flight": 0, "error_queue": 50}
    document = get_json(base + "/api/status?since=1h")
    assert document["succeeded"] == 4000 and document["failures_by_status"] == {"404": 40, "not_image": 10}
    scopes = document["history"]["scopes"]
    assert set(scopes) == {"*", "testhost"} and len(scopes["*"]) == 1 and len(scopes["testhost"]) == 1
    assert "history" not in get_json(base + "/api/status?since=0")
    assert fetch(base + "/api/status?since=soon")[0] == 400


def test_the_token_is_required_when_set(live):
    base = live.serve(free_port(), token=TOKEN)
    for path in ("/", "/api/status", "/metrics"):
        assert fetch(base + path) == (401, b"")
        assert fetch(base + path + "?token=wrong") == (401, b"")
        assert fetch(base + path, {"Authorization": "Bearer wrong"}) == (401, b"")
        assert fetch(base + path, {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert fetch(f"{base}{path}?token={TOKEN}")[0] == 200


def test_beyond_loopback_without_a_token_it_refuses_to_start(live):
    started = time.monotonic()
    command = script("speed.py", "--serve", "--listen", f"0.0.0.0:{free_port()}")
    result = subprocess.run(command, env=live.env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "dashboard_refused" in result.stderr and "LAION_DASHBOARD_TOKEN" in result.stderr
    assert time.monotonic() - started < 10
