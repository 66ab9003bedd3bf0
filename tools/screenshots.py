"""Make the dashboard screenshots of docs/operations.md from a real run: python3 -m tools.screenshots [--seconds 45]

Starts a private redis-server and the loopback image server, two hosts of two workers each (host ids dl-01 and
dl-02, each with its monitor_disk.py), and speed.py --serve; after ``--seconds`` it saves docs/dashboard.png, pauses
dl-02 and saves docs/dashboard-paused.png. Needs chromium and chromium-driver (apt-get install).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from tests.redis_server import RedisServer, free_port
from tools.image_server import ImageServer
from tools.liverun import ROOT, LiveRun, browser, chart_points, chromium_missing, wait_until, write_urls

DOCS = ROOT / "docs"
HOSTS = ("dl-01", "dl-02")


def urls(server: ImageServer, count: int) -> list[str]:
    """Mostly images at a few speeds, some 404s, a few that are not images and some timeouts."""
    mix = []
    for i in range(count):
        if i % 23 == 0:
            mix.append(server.url("/status/404"))
        elif i % 97 == 0:
            mix.append(server.url("/notimage"))
        elif i % 211 == 0:
            mix.append(server.url("/status/403"))
        else:
            mix.append(server.url(f"/slow/{0.02 + (i % 5) * 0.01:.2f}/img{i}.jpg?size={3000 + i % 5000}"))
    return mix


def environment(redis: RedisServer, folder: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LAION_")}
    env.update(redis.environ())
    env.update(
        PYTHONPATH=str(ROOT),
        LAION_PARQUET_DIR=str(folder / "parquet"),
        LAION_DONE_PATH=str(folder / "done_part.txt"),
        LAION_STORE_DIR=str(folder / "images"),
        LAION_STORE_ERROR_DIR=str(folder / "error_task"),
        LAION_LOG_DIR="",
        LAION_MONITOR_DISK=str(folder),
        LAION_MONITOR_INTERVAL="2",
        LAION_MIN_FREE_GB="0",
        LAION_MAX_PER_HOST="0",
        LAION_ALLOWED_NETWORKS="127.0.0.0/8",
        LAION_THREAD_NUM="8",
    )
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=45.0, help="how long the run goes before the first shot")
    args = parser.parse_args()
    missing = chromium_missing()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    DOCS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        (folder / "redis").mkdir()
        redis = RedisServer(folder / "redis")
        images = ImageServer()
        redis.start()
        images.start()
        env = environment(redis, folder)
        run = LiveRun(env)
        try:
            write_urls(folder / "parquet", urls(images, 40000))
            run.start("producer", "add_task.py")
            for host in HOSTS:
                host_env = {**env, "LAION_HOST_ID": host}
                run.start(f"monitor-{host}", "monitor_disk.py", env=host_env)
                for number in range(2):
                    run.start(f"{host}-{number}", "downloader.py", str(number), env=host_env)
            base = run.serve(free_port())
            driver = browser()
            try:
                driver.get(base + "/?every=2")
                time.sleep(args.seconds)
                wait_until(lambda: min(chart_points(driver).values(), default=0) >= 3, 30)
                driver.save_screenshot(str(DOCS / "dashboard.png"))
                run.run("control.py", "pause", "--host", HOSTS[1])
                time.sleep(6)
                driver.save_screenshot(str(DOCS / "dashboard-paused.png"))
            finally:
                driver.quit()
        finally:
            run.stop_all()
            images.stop()
            redis.stop()
    for name in ("dashboard.png", "dashboard-paused.png"):
        print(f"docs/{name} {(DOCS / name).stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
