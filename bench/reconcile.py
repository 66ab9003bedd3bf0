"""Time ``reconcile.py check`` and ``rebuild`` on a synthetic webdataset run (no download): input parts, finished
shards with their indexes, error files and a Redis holding the rest of the rows in its queue.

Usage: python3 bench/reconcile.py [--rows 1000000] [--parts 10] [--shard-size 2000] [--keep DIR]

Of the rows, 8 % have an error record (404, with one in ten a 500), ``--queued`` % (2) are still queued, the rest
are samples in shards (filled in row order, as workers take the queue). Prints the wall time and peak RSS of check
on the run, of rebuild after FLUSHALL, and of check after that rebuild (which must find the books exact).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from laion5b.shards import TAR_END, tar_member  # noqa: E402
from laion5b.tasks import Task  # noqa: E402

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
IMAGE = b"\xff\xd8\xff" + bytes(97)
SUBSET = "laion2B-en"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--parts", type=int, default=10)
    parser.add_argument("--shard-size", type=int, default=2000)
    parser.add_argument("--queued", type=int, default=2, help="percent of the rows queued in Redis (the rest: 8 %% "
                        "errors, samples)")  # fmt: skip
    parser.add_argument("--keep", help="build the run in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="reconcile-bench-"))
    started = time.monotonic()
    port = start_redis(folder)
    queued = build(folder, args.rows, args.parts, args.shard_size, port, args.queued)
    print(f"built {args.rows:,} rows ({queued:,} queued) in {time.monotonic() - started:.1f} s under {folder}")
    env = environment(folder, port)
    try:
        measure("check", env)
        redis_cli(port, "FLUSHALL")
        measure("rebuild", env)
        measure("check", env, after="after rebuild")
    finally:
        redis_cli(port, "SHUTDOWN", "NOSAVE")
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def build(folder: Path, rows: int, parts: int, shard_size: int, port: int, queued_percent: int) -> int:
    """Write the input parts, the shards, the error file and the done file; queue the rest in Redis."""
    per_part = rows // parts
    store, errors = folder / "images" / SUBSET, folder / "error_task"
    store.mkdir(parents=True)
    errors.mkdir()
    samples: list[tuple[str, int]] = []
    queued: list[str] = []
    with (errors / "20261208_0.txt").open("w") as error_file:
        for number in range(parts):
            part = f"{number:05d}"
            write_part(folder / "parquet" / SUBSET / f"{part}.parquet", part, per_part)
            for row in range(per_part):
                fate = row % 100
                if fate < 92 - queued_percent:
                    samples.append((part, row))
                elif fate < 100 - queued_percent:
                    error_file.write(error_record(part, row, 500 if row // 100 % 10 == 0 else 404) + "\n")
                else:
                    queued.append(task(part, row).encode())
    for first in range(0, len(samples), shard_size):
        write_shard(store, first // shard_size, samples[first : first + shard_size])
    done = "".join(f"{SUBSET}/{number:05d}.parquet\n" for number in range(parts))
    (folder / "done_part.txt").write_text(done)
    positions = {f"{SUBSET}/{number:05d}.parquet": per_part for number in range(parts)}
    redis_cli(port, "HSET", "laion5b_task:position", *[str(v) for pair in positions.items() for v in pair])
    commands = "".join(resp("LPUSH", "laion5b_task", *queued[i : i + 1000]) for i in range(0, len(queued), 1000))
    subprocess.run(["redis-cli", "-p", str(port), "--pipe"], input=commands.encode(), check=True, capture_output=True)
    counters = {"laion5b_tongji_succ": len(samples), "laion5b_tongji_error": rows - len(samples) - len(queued)}
    for key, value in {**counters, "laion5b_tongji_all": rows}.items():
        redis_cli(port, "SET", key, str(value))
    return len(queued)


def write_part(path: Path, part: str, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "url": [f"https://img{row % 997}.example/{part}/{row}.jpg" for row in range(rows)],
        "hash": [f"{part}{row:027x}" for row in range(rows)],
        "caption": [f"a photo of thing {row} in part {part}" for row in range(rows)],
    })  # fmt: skip
    pq.write_table(table, path)


def task(part: str, row: int) -> Task:
    return Task(f"{part}{row:027x}", f"https://img{row % 997}.example/{part}/{row}.jpg", SUBSET, part, row,
                f"a photo of thing {row} in part {part}")  # fmt: skip


def error_record(part: str, row: int, status: int) -> str:
    return task(part, row).error_record(status, f"HTTP {status}", "bench:0")


def write_shard(store: Path, number: int, samples: list[tuple[str, int]]) -> None:
    """A finished shard (tar and index) holding ``samples`` (part, row), each an image, a caption and metadata."""
    name = f"bench-{number % 8}-{number:06d}-0badcafe"
    keys = [f"{part}-{row:09d}" for part, row in samples]
    with (store / f"{name}.tar").open("wb") as tar:
        for (part, row), key in zip(samples, keys, strict=True):
            metadata = json.dumps({"key": key, "id": f"{part}{row:027x}"}).encode()
            members = ((f"{key}.jpg", IMAGE), (f"{key}.txt", b"caption"), (f"{key}.json", metadata))
            tar.write(b"".join(piece for member, data in members for piece in tar_member(member, data, 0)))
        tar.write(TAR_END)
    index = pa.table({
        "key": keys,
        "id": [f"{part}{row:027x}" for part, row in samples],
        "url": [f"https://img{row % 997}.example/{part}/{row}.jpg" for part, row in samples],
        "caption": [f"a photo of thing {row} in part {part}" for part, row in samples],
        "part": [part for part, _ in samples],
        "row": [row for _, row in samples],
        "members": [[f"{key}.jpg", f"{key}.txt", f"{key}.json"] for key in keys],
        "bytes": [len(IMAGE)] * len(samples),
    })  # fmt: skip
    pq.write_table(index, store / f"{name}.parquet")


def environment(folder: Path, port: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LAION_")}
    env.update(LAION_REDIS_IP="127.0.0.1", LAION_REDIS_PORT=str(port), LAION_REDIS_DB="0", LAION_LOG_DIR="",
               LAION_PARQUET_DIR=str(folder / "parquet"), LAION_DONE_PATH=str(folder / "done_part.txt"),
               LAION_STORE_DIR=str(folder / "images"), LAION_STORE_ERROR_DIR=str(folder / "error_task"),
               LAION_OUTPUT_FORMAT="webdataset", LAION_HOST_ID="bench")  # fmt: skip
    return env


def measure(command: str, env: dict[str, str], after: str = "") -> None:
    """Run ``reconcile.py command``; print its wall time, peak RSS and summary. The peak is the process's own VmHWM,
    read while it runs (its rusage would start from this process's size, which a fork and exec carry over)."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "reconcile.py"), command], env=env, stdout=out,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        peak = 0
        while process.poll() is None:
            peak = max(peak, high_water_mark(process.pid))
            time.sleep(0.02)
        seconds = time.monotonic() - started
        out.seek(0)
        lines = out.read().splitlines()
    summary = " | ".join(line.strip() for line in lines[:1] + lines[-1:])
    print(f"{command} {after}: {seconds:.1f} s, peak RSS {peak / 1024:.0f} MB, exit {process.returncode}: {summary}")


def high_water_mark(pid: int) -> int:
    """The process's peak resident set so far in KiB (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)


def start_redis(folder: Path) -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (folder / "redis").mkdir(parents=True, exist_ok=True)
    subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder / "redis"),
                      "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)  # fmt: skip
    for _ in range(100):
        if subprocess.run(["redis-cli", "-p", str(port), "PING"], capture_output=True, text=True).stdout == "PONG\n":
            return port
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def redis_cli(port: int, *command: str) -> None:
    subprocess.run(["redis-cli", "-p", str(port), *command], check=True, capture_output=True)


def resp(*words: str) -> str:
    """One command in Redis's protocol, for ``redis-cli --pipe``."""
    return f"*{len(words)}\r\n" + "".join(f"${len(word.encode())}\r\n{word}\r\n" for word in words)


if __name__ == "__main__":
    sys.exit(main())
