"""Redis time per outcome while a worker holds a whole shard's tasks (webdataset output), against the same tasks
left in the lease list, where every outcome's LREM would scan past them.

Runs the suite's own outcome scripts (laion5b.leases) on a private redis-server and reads Redis' own accounting
(INFO commandstats: microseconds spent in EVALSHA). Usage: python3 bench/holding.py [--shard 10000] [--in-flight 1024]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))

from laion5b.keys import Keys
from laion5b.leases import FAILED, KEPT, Leases
from laion5b.tasks import Task
from speed import RedisService

KEYS = Keys()
BATCH = 64


def eval_micros(client) -> int:
    """Microseconds Redis spent in EVALSHA so far."""
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0))


def measure(service: RedisService, held: int, in_flight: int, kept: bool, rounds: int) -> tuple[float, float]:
    """Microseconds of Redis time per outcome: ``held`` tasks of an open shard, then ``rounds`` x ``in_flight``
    tasks claimed and ended (half failed, half kept in the shard); ``kept`` False leaves the shard's tasks in the
    lease list instead. Also returns the microseconds that preparing and counting the shard took (kept only)."""
    client = service.client
    client.flushall()
    total = held + rounds * in_flight
    tasks = [
        Task(f"id{row}", f"http://img.test/{row}.jpg", "s", "p", row, "a caption").encode() for row in range(total)
    ]
    for start in range(0, total, 10_000):
        client.lpush(KEYS.task, *tasks[start : start + 10_000])
    leases = Leases(client, KEYS, "h", "h:w", 60)
    leases.register()
    shard = "s/h-w-000000"
    first = leases.claim(held)
    if kept:
        for start in range(0, held, 1000):
            leases.finish([(KEPT, raw, shard) for raw in first[start : start + 1000]])
    micros = eval_micros(client)
    outcomes = 0
    for _ in range(rounds):
        claimed = leases.claim(in_flight)
        for start in range(0, len(claimed), BATCH):
            batch = claimed[start : start + BATCH]
            leases.finish([(FAILED, raw, "404|{}") if i % 2 else (KEPT, raw, shard) for i, raw in enumerate(batch)])
            outcomes += len(batch)
    after_micros = eval_micros(client)
    per_outcome = (after_micros - micros) / outcomes
    if not kept:
        return per_outcome, float("nan")
    samples = client.llen(KEYS.kept_tasks("h:w", shard))
    assert leases.prepare_shard(shard, samples, f"h|{shard}", "{}")
    assert leases.commit_shard(f"h|{shard}", "h", 0) == samples
    return per_outcome, eval_micros(client) - after_micros


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", type=int, default=10_000, help="tasks of the open shard held")
    parser.add_argument("--in-flight", type=int, default=1024, help="tasks claimed and ended per round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="laion5b-holding-") as folder:
        service = RedisService(Path(folder))
        try:
            kept, finish = measure(service, args.shard, args.in_flight, True, args.rounds)
            in_lease, _ = measure(service, args.shard, args.in_flight, False, args.rounds)
        finally:
            service.stop()
    print(f"{args.shard:,} tasks of an open shard held, {args.in_flight:,} in flight, outcomes in batches of {BATCH}:")
    print(f"  kept in the shard's own list (this suite)   {kept:8.1f} us of Redis time per outcome")
    print(f"  left in the lease list (LREM scans them)    {in_lease:8.1f} us of Redis time per outcome")
    print(
        f"finishing the shard ({args.shard + args.rounds * args.in_flight // 2:,} samples): prepare + count "
        f"{finish:,.0f} us of Redis time"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
