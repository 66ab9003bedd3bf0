"""Object-store client bench: CPU per uploaded GB and peak memory of boto3, obstore and s3fs (fsspec) uploading
shard-sized files to a local S3 server (moto's server mode, as the tests start it).

    python3 bench/objectstore.py [--files 4] [--mb 256] [--runs 3] [--clients boto3,obstore,s3fs] [--path DIR]

Each client uploads the same FILES files of MB megabytes each (random bytes, multipart in parts of 16 MB, with the
checksums it sends by default), in a child process of its own; the figures are that child's rusage (user + system
CPU, peak RSS), so the server's own CPU (moto is a Python server and eats more than any client) is left out. A
client that is not installed is skipped, saying so (obstore and s3fs are contenders, not dependencies: install
them with ``pip install --target DIR obstore s3fs`` and pass ``--path DIR``, which only their children see: s3fs's
aiobotocore pins a botocore of its own, which may clash with the installed one). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.s3_server import REGION, S3Server  # noqa: E402

PART = 16 * 1024 * 1024
CLIENTS = ("boto3", "obstore", "s3fs")

UPLOADERS = {
    "boto3": """
import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
client = boto3.client("s3", endpoint_url=ENDPOINT, region_name=REGION, config=Config(s3={"addressing_style": "path"}))
transfer = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=4)
for index, path in enumerate(PATHS):
    client.upload_file(path, BUCKET, f"boto3/{index}.tar", Config=transfer)
""",
    "obstore": """
import obstore
from obstore.store import S3Store
store = S3Store(BUCKET, endpoint=ENDPOINT, region=REGION, client_options={"allow_http": True},
                virtual_hosted_style_request=False)
for index, path in enumerate(PATHS):
    with open(path, "rb") as file:
        obstore.put(store, f"obstore/{index}.tar", file, chunk_size=PART, max_concurrency=4)
""",
    "s3fs": """
import s3fs
fs = s3fs.S3FileSystem(endpoint_url=ENDPOINT, client_kwargs={"region_name": REGION})
for index, path in enumerate(PATHS):
    fs.put_file(path, f"{BUCKET}/s3fs/{index}.tar", chunksize=PART)
""",
}


def child_env(client: str, extra_path: str) -> dict[str, str]:
    """The environment of a client's child: the contenders' folder on its path (never boto3's)."""
    env = dict(os.environ)
    if extra_path and client != "boto3":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH", "")]))
    return env


def installed(client: str, extra_path: str) -> bool:
    probe = subprocess.run([sys.executable, "-c", f"import {client}"], capture_output=True,
                           env=child_env(client, extra_path))  # fmt: skip
    return probe.returncode == 0


def upload(client: str, server: S3Server, paths: list[str], extra_path: str) -> tuple[float, float, int]:
    """Run one client's uploads in a child: (seconds, CPU seconds, peak RSS in MB) of that child alone."""
    prelude = (f"ENDPOINT={server.endpoint!r}; REGION={REGION!r}; BUCKET={server.bucket!r}; PART={PART}; "
               f"PATHS={json.dumps(paths)}\n")  # fmt: skip
    env = {**child_env(client, extra_path), "AWS_ACCESS_KEY_ID": server.key_id,
           "AWS_SECRET_ACCESS_KEY": server.secret}  # fmt: skip
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", prelude + UPLOADERS[client]], env=env)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.monotonic() - started
    if status != 0:
        raise RuntimeError(f"{client} failed: status {status}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024


def baseline() -> tuple[float, int]:
    """CPU seconds and peak RSS (MB) of a child that only starts Python: subtracted from nothing, shown apart."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    _, _, usage = os.wait4(child.pid, 0)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--path", default="", help="folder holding the contenders (obstore, s3fs)")
    args = parser.parse_args()
    clients = [name for name in args.clients.split(",") if name]
    with tempfile.TemporaryDirectory(prefix="objectstore-bench-") as folder:
        paths = []
        for index in range(args.files):
            path = Path(folder, f"shard{index}.tar")
            with open(path, "wb") as file:
                for _ in range(args.mb):
                    file.write(os.urandom(1024 * 1024))
            paths.append(str(path))
        gigabytes = args.files * args.mb / 1024
        cpu0, rss0 = baseline()
        print(f"{args.files} files x {args.mb} MB per run; python start-up alone: {cpu0:.2f} s CPU, {rss0} MB")
        print(f"{'client':<8} {'run':>3} {'seconds':>8} {'MB/s':>7} {'CPU s/GB':>9} {'peak MB':>8}")
        figures: dict[str, list[tuple[float, int]]] = {}
        for run in range(args.runs):
            for client in clients[run % len(clients) :] + clients[: run % len(clients)]:
                if not installed(client, args.path):
                    print(f"{client:<8} skipped: not installed")
                    continue
                server = S3Server(Path(folder))  # a fresh server per upload: moto keeps every object in memory
                server.start()
                try:
                    seconds, cpu, rss = upload(client, server, paths, args.path)
                finally:
                    server.stop()
                figures.setdefault(client, []).append((cpu / gigabytes, rss))
                print(f"{client:<8} {run:>3} {seconds:>8.1f} {args.files * args.mb / seconds:>7.0f} "
                      f"{cpu / gigabytes:>9.2f} {rss:>8}")  # fmt: skip
        print("medians:")
        for client, values in figures.items():
            print(f"{client:<8} CPU s/GB {statistics.median(v[0] for v in values):.2f}  "
                  f"peak MB {statistics.median(v[1] for v in values):.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
