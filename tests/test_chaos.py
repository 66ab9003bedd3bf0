"""The chaos run (bench/chaos.py) with small numbers: every kind of fault once, and the books exact afterwards. The
store that fills needs a tmpfs of its own: where mounting one is not permitted, the run says so and goes without."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import ROOT

LIMIT = 90.0
FAULTS = (
    "add_task.py SIGKILL",
    "worker SIGKILL, restarted under the same name",
    "worker SIGKILL, replaced under a new name",
    "every worker SIGKILLed at once",
    "Redis restart",
    "save_error_task.py SIGKILL",
    "disk guard tripped and released",
    "worker SIGSTOP > heartbeat_ttl, same-name replacement, SIGCONT",
)
STORE_FILL = "store full (ENOSPC, the disk guard blind), then freed"
KILLS = (
    "worker SIGKILL, restarted under the same name",
    "worker SIGKILL, replaced under a new name",
    "every worker SIGKILLed at once",
    "worker SIGSTOP > heartbeat_ttl, same-name replacement, SIGCONT",
)


def chaos(tmp_path: Path, *options: str) -> str:
    """Run bench/chaos.py small; return its output once it passed with nothing lost, doubled or misjudged."""
    command = [
        sys.executable,
        str(ROOT / "bench" / "chaos.py"),
        "--seed", "7",
        "--workers", "2",
        "--threads", "6",
        "--drain-timeout", "40",
        "--workdir", str(tmp_path),
        "--no-report",
        *options,
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=LIMIT, check=False)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "=== chaos run: PASS ===" in output
    for figure in ("lost", "doubled", "wrong outcome", "sentinel connections"):
        assert re.search(rf"^{figure} +0\b", output, re.MULTILINE), f"{figure} is not 0:\n{output[-6000:]}"
    assert elapsed < LIMIT
    assert str(tmp_path) not in Path("/proc/mounts").read_text(), "the store's tmpfs is still mounted"
    return output


def can_mount_tmpfs(folder: Path) -> bool:
    """Whether this machine lets a tmpfs be mounted (root with CAP_SYS_ADMIN), as the chaos run's store needs."""
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                                 check=False)  # fmt: skip
    except OSError:
        return False
    if mounted.returncode != 0:
        return False
    subprocess.run(["umount", str(folder)], check=True)
    return True


def assert_store_filled(output: str, tmp_path: Path) -> None:
    """Where a tmpfs can be mounted, the store filled: the workers paused for ENOSPC and resumed, no attempt used; else
    the run said in one line that it went without."""
    if not can_mount_tmpfs(tmp_path / "mountable"):
        assert "store fill: skipped, mounting a tmpfs needs root" in output, output
        return
    for figure in (re.escape(STORE_FILL), r"store pauses \(store_failing ENOSPC\)", r"store resumes "):
        assert re.search(rf"^ +[1-9][\d,]*  {figure}", output, re.MULTILINE), f"no {figure!r}:\n{output}"
    assert re.search(r"^  store fill: (\d+)/\1 workers paused", output, re.MULTILINE), output
    assert "store_error records: 0 " in output


def test_chaos_run_async_smoke(tmp_path: Path) -> None:
    chaos(tmp_path, "--engine", "async", "--rows", "600", "--seconds", "6")


def test_chaos_run_small(tmp_path: Path) -> None:
    output = chaos(tmp_path, "--rows", "1500", "--seconds", "15")
    for fault in FAULTS:
        assert re.search(rf"^ +[1-9][\d,]*  {re.escape(fault)}", output, re.MULTILINE), f"no {fault!r}:\n{output}"
    assert_store_filled(output, tmp_path)


def test_chaos_run_webdataset_smoke(tmp_path: Path) -> None:
    """Workers SIGKILLed with samples in open shards: every row in exactly one finished shard, nothing left open."""
    output = chaos(tmp_path, "--output", "webdataset", "--engine", "async", "--rows", "600", "--seconds", "8")
    for fault in KILLS:
        assert re.search(rf"^ +[1-9][\d,]*  {re.escape(fault)}", output, re.MULTILINE), f"no {fault!r}:\n{output}"
    assert re.search(r"^shards \(finished\) +[1-9][\d,]* ", output, re.MULTILINE), output
    assert "left unfinished: chaos:open 0, 0 shards being finished, 0 lists of kept tasks" in output
    assert_store_filled(output, tmp_path)
