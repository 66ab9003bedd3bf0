"""Per-task CPU cost of the worker's download path, one thread, no Redis: where the microseconds go.

    python3 bench/pertask.py [--n 3000] [--profile]

Starts bench/imgserve.py (one process), then times, per task, each stage the download threads run: decode the
queued JSON, Store.existing, Fetcher.fetch, Store.save, and the same fetch through a bare ``requests.Session.get``
for comparison. With ``--profile`` it prints cProfile's top functions of the whole path.
"""

from __future__ import annotations

import argparse
import cProfile
import ipaddress
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from laion5b.fetch import Fetcher  # noqa: E402
from laion5b.fetchpolicy import FetchPolicy  # noqa: E402
from laion5b.store import Store  # noqa: E402
from laion5b.tasks import Task, decode  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, str(ROOT / "bench" / "imgserve.py"), "--port", str(port), "--procs", "1"]
    server = subprocess.Popen(command)
    folder = Path(tempfile.mkdtemp(prefix="pertask-", dir="/dev/shm"))
    try:
        time.sleep(0.5)
        raws = [
            Task(str(i), f"http://127.0.0.1:{port}/img/p{i}.jpg?size=20000", "laion", "00000", i).encode()
            for i in range(args.n)
        ]
        policy = FetchPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))
        fetcher = Fetcher(policy)
        store = Store(folder / "store", "bench", "pertask", False)
        store.open()
        fetcher.fetch(decode(raws[0]).url)  # warm the connection
        stages = dict.fromkeys(("decode", "existing", "fetch", "save"), 0.0)

        def run() -> None:
            clock = time.thread_time
            for raw in raws:
                t0 = clock()
                task = decode(raw)
                t1 = clock()
                store.existing(task)
                t2 = clock()
                fetched = fetcher.fetch(task.url)
                t3 = clock()
                store.save(task, fetched.data, fetched.extension)
                t4 = clock()
                stages["decode"] += t1 - t0
                stages["existing"] += t2 - t1
                stages["fetch"] += t3 - t2
                stages["save"] += t4 - t3

        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        run()
        if profiler:
            profiler.disable()
        session = requests.Session()
        bare = 0.0
        for raw in raws:
            task = decode(raw)
            t0 = time.thread_time()
            with session.get(task.url, timeout=(5, 10)) as response:
                response.content  # noqa: B018
            bare += time.thread_time() - t0
        for stage, seconds in stages.items():
            print(f"{stage:10s} {1e6 * seconds / args.n:7.1f} µs/task")
        print(f"{'total':10s} {1e6 * sum(stages.values()) / args.n:7.1f} µs/task")
        print(f"{'bare get':10s} {1e6 * bare / args.n:7.1f} µs/task (requests.Session.get + .content)")
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
