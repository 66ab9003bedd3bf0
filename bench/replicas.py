"""What redis_min_replicas costs a worker's round trip: the suite's exchange script (record a batch of outcomes, claim
as many tasks) on a private master with one replica, without and with a WAIT for that replica, alternated.

Usage: python3 bench/replicas.py [--tasks 100000] [--batch 64] [--runs 3]
Prints the wall time per round trip and per task that the worker's main thread spends in Redis for each setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))

from laion5b.keys import Keys
from laion5b.leases import STORED, Leases
from laion5b.tasks import Task
from speed import RedisService

KEYS = Keys()


def run(master: RedisService, tasks: int, batch: int, min_replicas: int) -> float:
    """Seconds the exchanges of ``tasks`` queued tasks took, ``batch`` outcomes and claims per round trip."""
    client = master.client
    client.flushall()
    encoded = [
        Task(f"id{row}", f"http://img.test/{row}.jpg", "s", "p", row, "a caption").encode() for row in range(tasks)
    ]
    for start in range(0, tasks, 10_000):
        client.lpush(KEYS.task, *encoded[start : start + 10_000])
    leases = Leases(client, KEYS, "h", "h:w", 60, min_replicas)
    leases.register()
    held = leases.claim(batch)
    started = time.perf_counter()
    while held:
        _, held = leases.exchange([(STORED, raw, 1000) for raw in held], batch)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=64, help="outcomes and claims per round trip (default 64)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "master").mkdir()
        (Path(folder) / "replica").mkdir()
        master = RedisService(Path(folder) / "master")
        replica = RedisService(Path(folder) / "replica", replica_of=master.port)
        try:
            while replica.client.info("replication").get("master_link_status") != "up":
                time.sleep(0.05)
            seconds: dict[int, list[float]] = {0: [], 1: []}
            for _ in range(args.runs):
                for min_replicas in seconds:
                    seconds[min_replicas].append(run(master, args.tasks, args.batch, min_replicas))
        finally:
            replica.stop()
            master.stop()
    trips = args.tasks / args.batch
    print(f"{args.tasks} tasks, {args.batch} outcomes + claims per round trip, {args.runs} runs each (median)")
    print("| redis_min_replicas | round trip ms | µs per task | tasks/s through one worker's Redis calls |")
    print("|---|---|---|---|")
    for min_replicas, runs in seconds.items():
        median = statistics.median(runs)
        print(f"| {min_replicas} | {1000 * median / trips:.3f} | {1e6 * median / args.tasks:.1f} | "
              f"{args.tasks / median:,.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
