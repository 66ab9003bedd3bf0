"""Bare download clients, the ceilings of the speed harness: one process of ``threads`` workers over a URL slice.

``python bare.py KIND URLS START END OUT --threads 32 --max-bytes N [--ca-file CA]`` with KIND requests (one
Session per thread), urllib3 (one PoolManager per thread) or aiohttp (one ClientSession, ``threads`` coroutines).
URLS is a file of ``id<TAB>url`` lines; lines START..END are fetched. A 200 whose body starts like a JPEG is written
to ``OUT/<id // 10000>/<id>.jpg``; anything else counts as failed. https servers are checked against CA when given
(else the normal CA store). Prints one JSON line of counts at the end.
Runs in the harness's own venv (bench/work/venv): aiohttp is no dependency of the project.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

CHUNK = 64 * 1024
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stored = 0
        self.failed = 0
        self.bytes = 0

    def add(self, size: int | None) -> None:
        with self.lock:
            if size is None:
                self.failed += 1
            else:
                self.stored += 1
                self.bytes += size


def write(out: str, ident: str, data: bytes) -> int:
    folder = os.path.join(out, f"{int(ident) // 10000:05d}")
    path = os.path.join(folder, f"{ident}.jpg")
    try:
        file = open(path, "wb")  # noqa: SIM115
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        file = open(path, "wb")  # noqa: SIM115
    with file:
        file.write(data)
    return len(data)


def is_image(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def run_threads(kind: str, items: list[tuple[str, str]], out: str, threads: int, max_bytes: int, ca_file: str) -> Tally:
    tally = Tally()
    iterator = iter(items)
    lock = threading.Lock()

    def next_item() -> tuple[str, str] | None:
        with lock:
            return next(iterator, None)

    def loop_requests() -> None:
        import requests

        session = requests.Session()
        if ca_file:
            session.verify = ca_file
        while (item := next_item()) is not None:
            ident, url = item
            try:
                with session.get(url, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), stream=True) as response:
                    if response.status_code != 200:
                        tally.add(None)
                        continue
                    body = bytearray()
                    for chunk in response.iter_content(CHUNK):
                        body += chunk
                        if len(body) > max_bytes:
                            break
                    if len(body) > max_bytes or not is_image(body):
                        tally.add(None)
                        continue
                tally.add(write(out, ident, bytes(body)))
            except requests.RequestException:
                tally.add(None)

    def loop_urllib3() -> None:
        import urllib3

        pool = urllib3.PoolManager(maxsize=1, retries=False, ca_certs=ca_file or None)
        timeout = urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT)
        while (item := next_item()) is not None:
            ident, url = item
            try:
                response = pool.request("GET", url, preload_content=False, timeout=timeout)
                try:
                    if response.status != 200:
                        response.drain_conn()
                        tally.add(None)
                        continue
                    body = bytearray()
                    for chunk in response.stream(CHUNK):
                        body += chunk
                        if len(body) > max_bytes:
                            break
                finally:
                    response.release_conn()
                if len(body) > max_bytes or not is_image(body):
                    tally.add(None)
                    continue
                tally.add(write(out, ident, bytes(body)))
            except urllib3.exceptions.HTTPError:
                tally.add(None)

    target = loop_requests if kind == "requests" else loop_urllib3
    workers = [threading.Thread(target=target) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return tally


def run_aiohttp(items: list[tuple[str, str]], out: str, concurrency: int, max_bytes: int, ca_file: str) -> Tally:
    import asyncio
    import ssl

    import aiohttp

    tally = Tally()

    async def main() -> None:
        iterator = iter(items)
        timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
        context = ssl.create_default_context(cafile=ca_file) if ca_file else True
        connector = aiohttp.TCPConnector(limit=concurrency, ssl=context)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def worker() -> None:
                for ident, url in iterator:
                    try:
                        async with session.get(url) as response:
                            if response.status != 200:
                                await response.read()
                                tally.add(None)
                                continue
                            body = bytearray()
                            async for chunk in response.content.iter_chunked(CHUNK):
                                body += chunk
                                if len(body) > max_bytes:
                                    break
                        if len(body) > max_bytes or not is_image(body):
                            tally.add(None)
                            continue
                        tally.add(write(out, ident, bytes(body)))
                    except (TimeoutError, aiohttp.ClientError, OSError):
                        tally.add(None)

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    asyncio.run(main())
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("requests", "urllib3", "aiohttp"))
    parser.add_argument("urls")
    parser.add_argument("start", type=int)
    parser.add_argument("end", type=int)
    parser.add_argument("out")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--max-bytes", type=int, default=32 * 1024 * 1024)
    parser.add_argument("--ca-file", default="", help="CA bundle that https servers are checked against")
    args = parser.parse_args()
    with open(args.urls, encoding="utf-8") as file:
        lines = file.read().splitlines()[args.start : args.end]
    items = [tuple(line.split("\t", 1)) for line in lines]
    started = time.monotonic()
    if args.kind == "aiohttp":
        tally = run_aiohttp(items, args.out, args.threads, args.max_bytes, args.ca_file)
    else:
        tally = run_threads(args.kind, items, args.out, args.threads, args.max_bytes, args.ca_file)
    print(json.dumps({"stored": tally.stored, "failed": tally.failed, "bytes": tally.bytes,
                      "seconds": time.monotonic() - started}))  # fmt: skip


if __name__ == "__main__":
    main()
