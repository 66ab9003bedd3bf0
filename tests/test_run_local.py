"""The quick start as users run it: bash run.sh --demo, end to end, then again to resume."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers import ROOT
from tests.redis_server import free_port


def demo_command(tmp_path: Path) -> list[str]:
    return [
        "bash", str(ROOT / "run.sh"), "--demo", "--demo-rows", "300", "--workers", "2",
        "--demo-dir", str(tmp_path / "demo"), "--redis-dir", str(tmp_path / "redis"),
    ]  # fmt: skip


def demo_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LAION_")}
    env.update(LAION_REDIS_PORT=str(free_port()), LAION_DEMO_PORT=str(free_port()), LAION_THREAD_NUM="16")
    return env


def figure(output: str, name: str) -> int:
    """A figure of the final summary (the part after its heading)."""
    summary = output.split("=== laion5b-downloader: finished ===", 1)[1]
    return int(re.search(rf"^{name}\s+([\d,]+)", summary, re.MULTILINE).group(1).replace(",", ""))


def stored_images(tmp_path: Path) -> int:
    return sum(1 for p in (tmp_path / "demo" / "images").rglob("*.*") if ".tmp" not in p.parts)


def saved_records(tmp_path: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (tmp_path / "demo" / "error_task").glob("*.txt"))


def test_demo_runs_end_to_end_and_resumes(tmp_path):
    env = demo_env()
    first = subprocess.run(demo_command(tmp_path), env=env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    output = first.stdout
    added, succeeded, failed = figure(output, "added"), figure(output, "succeeded"), figure(output, "failed")
    assert added == 300 and succeeded + failed == 300 and figure(output, "queued") == 0
    assert 200 < succeeded < 280, "the sample mixes real images with failures"
    assert stored_images(tmp_path) == succeeded
    assert saved_records(tmp_path) == failed
    for status in ("404", "not_image", "disallowed", "bad_url"):
        assert re.search(rf"^{status}\s+\d+", output, re.MULTILINE), f"no {status} in the summary"
    second = subprocess.run(demo_command(tmp_path), env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stdout[-3000:]
    assert figure(second.stdout, "added") == 300, "nothing may be queued twice"
    assert (figure(second.stdout, "succeeded"), figure(second.stdout, "failed")) == (succeeded, failed)
    assert stored_images(tmp_path) == succeeded and saved_records(tmp_path) == failed
    assert not any(p.is_file() for p in (tmp_path / "demo" / "images" / ".tmp").rglob("*"))


def test_ctrl_c_stops_everything_and_a_second_run_finishes(tmp_path):
    env = {**demo_env(), "LAION_THREAD_NUM": "2"}
    process = subprocess.Popen(
        demo_command(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while stored_images(tmp_path) < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=90)
    assert process.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "interrupted" in stderr
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftovers.stdout == "", "every process of the run must be stopped"
    second = subprocess.run(demo_command(tmp_path), env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stdout[-3000:]
    succeeded, failed = figure(second.stdout, "succeeded"), figure(second.stdout, "failed")
    assert figure(second.stdout, "added") == 300 and succeeded + failed == 300
    assert stored_images(tmp_path) == succeeded and saved_records(tmp_path) == failed
