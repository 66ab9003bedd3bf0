"""A fast multi-process loopback image server for the speed harness (standard library only).

``python3 bench/imgserve.py --port P --procs 2`` forks ``procs`` processes that each run one asyncio loop on their
own SO_REUSEPORT socket bound to 127.0.0.1:P, so the kernel spreads connections over them. HTTP/1.1 keep-alive,
no pipelining. Bodies come from ``tools.image_server.image_bytes`` (valid JPEGs, padded to the size asked for).

Routes (a subset of tools/image_server.py's, plus a bounded ``/endless``):
  /img/<name>.jpg?size=N      200 image/jpeg of N bytes
  /status/<code>              that status with a short body
  /slow/<seconds>/<name>.jpg?size=N   waits, then serves the image
  /notimage/<name>            200 image/jpeg whose 4096 bytes are no image
  /file/<name>                200, the bytes of the file <name> of the folder given with ``--files`` (read at each
                              request: the page cache keeps them), Content-Type from its suffix
  /endless/<name>?bytes=N     200 image/jpeg with no Content-Length: a JPEG header then zeros, closed after N bytes
                              (a client without a byte cap reads all N; the cap keeps img2dataset from reading forever)
SIGTERM to the parent stops every process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

sys.path.append(str(Path(__file__).resolve().parent.parent))  # for tools/; bench/ stays first

from tools.image_server import image_bytes

_JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
_CONTENT_TYPES = {".jpg": b"image/jpeg", ".png": b"image/png", ".webp": b"image/webp"}
_REASONS = {200: b"OK", 404: b"Not Found", 500: b"Internal Server Error", 403: b"Forbidden"}


def _response(status: int, body: bytes, content_type: bytes = b"image/jpeg") -> bytes:
    reason = _REASONS.get(status, b"Status")
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (
        status,
        reason,
        content_type,
        len(body),
    )
    return head + body


class _Http(asyncio.Protocol):
    files: Path | None = None  # the folder that /file/ serves

    def __init__(self) -> None:
        self.buffer = b""
        self.busy = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._serve()

    def _serve(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            try:
                target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
                self._route(target)
            except (IndexError, ValueError, KeyError, FileNotFoundError):
                self.transport.write(_response(400, b"bad request\n", b"text/plain"))

    def _route(self, target: str) -> None:
        parts = urlsplit(target)
        route, _, rest = unquote(parts.path).lstrip("/").partition("/")
        query = dict(parse_qsl(parts.query))
        transport = self.transport
        assert transport is not None
        if route == "img":
            transport.write(_response(200, _image(rest, query)))
        elif route == "status":
            transport.write(_response(int(rest), b"status %s\n" % rest.encode(), b"text/plain"))
        elif route == "slow":
            seconds, _, image = rest.partition("/")
            self.busy = True
            body = _response(200, _image(image, query))
            asyncio.get_running_loop().call_later(float(seconds), self._late, body)
        elif route == "file" and self.files is not None and "/" not in rest:
            path = self.files / rest
            transport.write(_response(200, path.read_bytes(), _CONTENT_TYPES.get(path.suffix, b"image/jpeg")))
        elif route == "notimage":
            transport.write(_response(200, b"NOTIMAGE" + random.Random(rest).randbytes(4088)))
        elif route == "endless":
            total = int(query.get("bytes", 8 << 20))
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nConnection: close\r\n\r\n" + _JPEG_HEAD)
            transport.write(bytes(total))
            transport.close()
        else:
            transport.write(_response(404, b"not found\n", b"text/plain"))

    def _late(self, body: bytes) -> None:
        self.busy = False
        if self.transport is not None:
            self.transport.write(body)
            self._serve()


def _image(rest: str, query: dict[str, str]) -> bytes:
    name, _, ext = rest.rpartition(".")
    return image_bytes(name, ext, int(query.get("size", 20000)))


def _serve_forever(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Http, sock=sock, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--files", type=Path, help="folder served under /file/")
    args = parser.parse_args()
    _Http.files = args.files
    children = []
    for _ in range(args.procs):
        pid = os.fork()
        if pid == 0:
            try:
                _serve_forever(args.port)
            finally:
                os._exit(0)
        children.append(pid)

    supervise(children)


def supervise(children: list[int]) -> None:
    """Wait for the forked server processes; SIGTERM or SIGINT is passed on to them."""

    def stop(signum: int, frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        while True:
            try:
                os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break


if __name__ == "__main__":
    main()
