"""A live run on this machine, for the dashboard and control tests and for tools/screenshots.py.

Given an environment that points the scripts at a Redis and at folders, it writes a parquet file of the loopback
image server's URLs, queues it with add_task.py, starts downloader.py workers (and monitor_disk.py, speed.py --serve)
as child processes, and stops each of them by PID. ``browser`` opens the dashboard in headless Chromium.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER = "chromedriver"


def script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / name), *args]


def write_urls(folder: Path, urls: list[str]) -> Path:
    """A parquet file of the merged wide schema holding ``urls``."""
    path = folder / "live" / "part0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {
        "url": urls,
        "hash": [f"{i:032x}" for i in range(len(urls))],
        "image_suffix": ["jpg"] * len(urls),
        "caption": [f"caption {i}" for i in range(len(urls))],
    }
    pq.write_table(pa.table(columns), path)
    return path


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something true, and return that; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"still waiting after {timeout} s")
        time.sleep(interval)


@dataclass
class LiveRun:
    """Child processes of the suite's scripts sharing one environment; stopped by PID."""

    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(
        self, name: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """Run a script to its end, with ``env`` over the run's environment."""
        return subprocess.run(
            script(name, *args), env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout
        )

    def start(self, label: str, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        process = subprocess.Popen(
            script(name, *args),
            env=env or self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.processes[label] = process
        return process

    def start_workers(self, count: int) -> None:
        for number in range(count):
            self.start(f"worker-{number}", "downloader.py", str(number))

    def serve(self, port: int, token: str = "") -> str:
        """Start speed.py --serve on 127.0.0.1:``port``; return its base URL once it answers."""
        env = {**self.env, "LAION_DASHBOARD_TOKEN": token}
        self.start("serve", "speed.py", "--serve", "--listen", f"127.0.0.1:{port}", env=env)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(f"{base}/api/status?token={token}"), 30)
        return base

    def stop(self, label: str, timeout: float = 30) -> int:
        process = self.processes.pop(label)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        return process.wait(timeout)

    def stop_all(self) -> None:
        for label in list(self.processes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop(label)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def chromium_missing() -> str | None:
    """Why headless Chromium cannot be driven here, or None when it can."""
    if not any(shutil.which(name) for name in CHROMIUM):
        return "chromium is not installed (apt-get install chromium chromium-driver; .ci/run does it)"
    if not shutil.which(CHROMEDRIVER):
        return "chromedriver is not installed (apt-get install chromium-driver; .ci/run does it)"
    return None


def browser(width: int = 1366, height: int = 900):
    """A headless Chromium driven by selenium through the system's chromedriver, at a laptop's window size."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(argument)
    binary = next(shutil.which(name) for name in CHROMIUM if shutil.which(name))
    options.binary_location = binary
    return webdriver.Chrome(options=options, service=Service(shutil.which(CHROMEDRIVER)))


def chart_points(driver) -> dict[str, int]:
    """Data points each dashboard chart holds (x values with at least one non-null y), read from uPlot's data."""
    return driver.execute_script(
        "const out = {};"
        "for (const [name, chart] of Object.entries(window.laionCharts || {})) {"
        "  const d = chart.data; let n = 0;"
        "  for (let i = 0; i < d[0].length; i++) { if (d.slice(1).some(s => s[i] != null)) n++; }"
        "  out[name] = n; }"
        "return out;"
    )
