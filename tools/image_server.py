"""Loopback HTTP server of real images and misbehaving responses, for tests, the demo and benchmarks.

Standard library, and Pillow for ``/photo``. Import it (``ImageServer(port=0).start()``) or run it:
``python3 tools/image_server.py --port 8765``. HTTP/1.1 with keep-alive; every path is deterministic.

Paths (``<name>`` may hold any characters, percent-decoded; ``<ext>`` is one of ``FORMATS``):
  /img/<name>.<ext>[?size=N]     200, the bytes of ``image_bytes(name, ext, N)`` (N defaults to 20000);
                                 every image response carries ``X-Content-SHA256`` (hex digest of the body)
  /photo/<W>x<H>.<ext>[?orientation=O&truncate=N]  200, ``photo_bytes(W, H, ext, O)``: a Pillow-made picture of
                                 W x H pixels (``ext`` jpg, png or webp; EXIF orientation O for jpg), cut to its first
                                 N bytes when ``truncate`` is given
  /status/<code>[?retry_after=V] that status with a short body and ``Retry-After: V`` (429: ``1`` unless V is given)
  /retry-after/<value>/<name>.<ext>  the first request for ``name``: 429 with ``Retry-After: <value>`` (no header
                                 when value is ``-``); later ones: the image. ``ImageServer.asked(name)`` tells when
                                 each request for ``name`` arrived
  /slow/<seconds>/<name>.<ext>   sleeps, then serves the image
  /busy/<capacity>/<seconds>/<name>.<ext>  503 when more than <capacity> requests to this host name are in progress
                                 (``ImageServer.overloaded(host)`` counts them), else as /slow
  /trickle                       200 image/jpeg, a JPEG header, then 1 byte every 0.5 s until the client leaves
  /trickle_headers               a status line, then one byte of a header every 0.3 s, never ending the headers
  /endless                       200 image/jpeg, a JPEG header, then zeros as fast as possible, no end
  /huge/<MB>[?chunked=1]         200 image/jpeg of MB MiB (JPEG header + zeros), streamed, with a Content-Length
                                 (or chunked transfer encoding)
  /gzipbomb                      200 image/jpeg, Content-Encoding: gzip, decoding to a JPEG header + 100 MiB zeros
  /redirect/<n>/<name>.<ext>     302 to /redirect/<n-1>/...; /redirect/0/<name>.<ext> serves the image
  /loop                          302 to itself
  /redirect-to?url=U[&status=S]  redirect (302 or S) to any URL U
  /html                          200 text/html page
  /optout/<directive>/<name>.<ext>  the image with ``X-Robots-Tag: <directive>``
  /tdm/<value>/<name>.<ext>      the image with the W3C TDMRep header ``TDM-Reservation: <value>``
  /agent/<name>.<ext>            the image; ``ImageServer.user_agent(name)`` is the User-Agent it was asked with
  /wrongtype/<name>.<ext>        the image with ``Content-Type: text/html``
  /reset                         resets the connection (RST, SO_LINGER 0) without answering
  /truncated                     200 image/jpeg announcing 20000 bytes, then closing after 1000 of them
  /badgzip                       200 image/jpeg, Content-Encoding: gzip, but the body is a plain JPEG
  /gzip/<name>.<ext>[?cut=1]     200, Content-Encoding: gzip: the image gzipped; with cut=1 cut in the middle of
                                 its stream (no end, no trailer), with a Content-Length that matches the cut body
  /notimage                      200 image/jpeg, 4096 deterministic bytes that are no image
  /robots.txt                    ``ImageServer.robots`` (status, body) when set, else 404; after
                                 ``ImageServer.robots_hops`` redirects (302 to /robots-hop/<n>) when that is set
Anything else is 404. ``ImageServer.requests`` and ``.connections`` count what the server has seen, ``.paths`` lists
the paths asked.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import itertools
import logging
import random
import socket
import ssl
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from PIL import Image, ImageDraw

FORMATS = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "avif": "image/avif",
    "heic": "image/heic",
}
PHOTO_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
MAX_IMAGE_SIZE = 64 * 1024 * 1024
MAX_PHOTO_SIDE = 4096
_ORIENTATION_TAG = 0x0112
GZIP_BOMB_MB = 100
_IMAGES = Path(__file__).resolve().with_name("images")
_LABEL = b"laion5b-test-image:"
_JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
_BLOCK = 64 * 1024
_ZEROS = bytes(_BLOCK)

log = logging.getLogger(__name__)


def image_bytes(name: str, ext: str = "jpg", size: int = 20000) -> bytes:
    """A valid image of format ``ext`` that embeds ``name``, padded to about ``size`` bytes (exact for most)."""
    if ext not in FORMATS:
        raise ValueError(f"unknown image format {ext!r}")
    base = _asset(ext)
    label = _LABEL + name.encode("utf-8") + b"\x00"
    return _EMBEDDERS[ext](base, label, size - len(base))


@functools.lru_cache(maxsize=64)
def photo_bytes(width: int, height: int, ext: str = "jpg", orientation: int = 1) -> bytes:
    """A picture of ``width`` x ``height`` pixels as stored (a gradient and a few shapes), in format ``ext``; with
    an EXIF orientation tag when ``orientation`` is not 1 (jpg only)."""
    if ext not in PHOTO_FORMATS or not (0 < width <= MAX_PHOTO_SIDE and 0 < height <= MAX_PHOTO_SIDE):
        raise ValueError(f"no photo of {width} x {height} in {ext!r}")
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width // 3, height // 3), fill=(200, 40, 40))
    draw.ellipse((width // 2, height // 2, width - 1, height - 1), fill=(40, 40, 200))
    options: dict[str, Any] = {}
    if orientation != 1:
        if ext != "jpg":
            raise ValueError("EXIF orientation is served on jpg only")
        exif = Image.Exif()
        exif[_ORIENTATION_TAG] = orientation
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, PHOTO_FORMATS[ext], **options)
    return buffer.getvalue()


@functools.cache
def _asset(ext: str) -> bytes:
    return (_IMAGES / f"tiny.{ext}").read_bytes()


def _padded(label: bytes, length: int) -> bytes:
    return label.ljust(length, b"\x00")


def _embed_jpeg(base: bytes, label: bytes, extra: int) -> bytes:
    """COM segments right after SOI; each holds at most 65533 bytes plus a 4-byte marker and length."""
    count = max(1, -(-extra // 65537))
    payload = _padded(label, extra - 4 * count)
    bounds = [len(payload) * index // count for index in range(count + 1)]
    parts = (payload[start:end] for start, end in itertools.pairwise(bounds))
    segments = b"".join(b"\xff\xfe" + (len(part) + 2).to_bytes(2, "big") + part for part in parts)
    return base[:2] + segments + base[2:]


def _embed_png(base: bytes, label: bytes, extra: int) -> bytes:
    """A private ancillary chunk ``laIn`` right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    data = _padded(label, extra - 12)
    chunk = len(data).to_bytes(4, "big") + b"laIn" + data + zlib.crc32(b"laIn" + data).to_bytes(4, "big")
    return base[:33] + chunk + base[33:]


def _embed_gif(base: bytes, label: bytes, extra: int) -> bytes:
    """A comment extension before the trailer, in sub-blocks of at most 255 bytes."""
    room = extra - 3  # introducer, label byte and terminator
    data = _padded(label, room - -(-room // 256))  # each 255 data bytes take one length byte
    blocks = b"".join(bytes([len(data[i : i + 255])]) + data[i : i + 255] for i in range(0, len(data), 255))
    return base[:-1] + b"\x21\xfe" + blocks + b"\x00" + base[-1:]


def _embed_webp(base: bytes, label: bytes, extra: int) -> bytes:
    """An unknown chunk ``LAIN`` appended to an extended (VP8X) WebP; readers must skip it. Chunks are even-sized."""
    data = _padded(label, extra - 8)
    body = base[12:] + b"LAIN" + len(data).to_bytes(4, "little") + data + b"\x00" * (len(data) % 2)
    return b"RIFF" + (len(body) + 4).to_bytes(4, "little") + b"WEBP" + body


def _embed_bmp(base: bytes, label: bytes, extra: int) -> bytes:
    """A gap before the pixel array, which the file header's pixel offset then skips."""
    data = _padded(label, extra)
    offset = int.from_bytes(base[10:14], "little")
    header = (
        b"BM" + (len(base) + len(data)).to_bytes(4, "little") + base[6:10] + (offset + len(data)).to_bytes(4, "little")
    )
    return header + base[14:offset] + data + base[offset:]


def _embed_tail(base: bytes, label: bytes, extra: int) -> bytes:
    """Trailing bytes: TIFF readers follow offsets and never look at them."""
    return base + _padded(label, extra)


def _embed_isobmff(base: bytes, label: bytes, extra: int) -> bytes:
    """A top-level ``free`` box appended to an AVIF or HEIF file."""
    data = _padded(label, extra - 8)
    return base + (len(data) + 8).to_bytes(4, "big") + b"free" + data


_EMBEDDERS = {
    "jpg": _embed_jpeg,
    "png": _embed_png,
    "gif": _embed_gif,
    "webp": _embed_webp,
    "bmp": _embed_bmp,
    "tiff": _embed_tail,
    "avif": _embed_isobmff,
    "heic": _embed_isobmff,
}


@functools.cache
def gzip_bomb() -> bytes:
    """Gzip of a JPEG header followed by GZIP_BOMB_MB MiB of zeros (about 100 KB), computed once."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(_JPEG_HEAD)]
    megabyte = bytes(1024 * 1024)
    parts.extend(compressor.compress(megabyte) for _ in range(GZIP_BOMB_MB))
    parts.append(compressor.flush())
    return b"".join(parts)


class _Server(ThreadingHTTPServer):
    """The threading server plus what ImageServer reports and needs to stop quickly."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], tls: ssl.SSLContext | None = None) -> None:
        super().__init__(address, _Handler)
        self.tls = tls
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.requests = 0
        self.connections = 0
        self.asked: dict[str, list[float]] = {}
        self.sockets: set[socket.socket] = set()
        self.in_progress: Counter[str] = Counter()
        self.most_in_progress: Counter[str] = Counter()
        self.at_once = 0  # requests in progress, all host names together
        self.most_at_once = 0
        self.started: dict[str, list[float]] = {}
        self.overloaded: Counter[str] = Counter()
        self.busy: Counter[str] = Counter()  # requests of /busy/ not answered yet, per host
        self.user_agents: dict[str, str] = {}
        self.paths: list[str] = []
        self.robots: tuple[int, str] | None = None
        self.robots_hops = 0

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is not None:  # the handshake happens on the handler's thread, at its first read
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.connections += 1
            self.sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that reset their connection; print anything else (a bug)."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Dispatches GET /<route>/<rest> to the route_<route> method (see _ROUTES)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 60  # an idle keep-alive connection ends after this
    server: _Server

    def log_message(self, *args: Any) -> None:
        """Silence the per-request log line."""

    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").rpartition(":")[0]
        with self.server.lock:
            self.server.requests += 1
            self.server.in_progress[host] += 1
            self.server.most_in_progress[host] = max(self.server.most_in_progress[host], self.server.in_progress[host])
            self.server.at_once += 1
            self.server.most_at_once = max(self.server.most_at_once, self.server.at_once)
            self.server.started.setdefault(host, []).append(time.monotonic())
            self.server.paths.append(self.path)
        try:
            self._answer()
        finally:
            with self.server.lock:
                self.server.in_progress[host] -= 1
                self.server.at_once -= 1

    def _answer(self) -> None:
        parts = urlsplit(self.path)
        route, _, rest = unquote(parts.path).lstrip("/").partition("/")
        query = dict(parse_qsl(parts.query))
        handler = _ROUTES.get(route)
        try:
            if handler is None:
                self._reply(404, b"not found\n")
            else:
                handler(self, rest, query)
        except (KeyError, ValueError) as exc:  # a malformed path such as /huge/abc or /redirect-to without url
            self._reply(400, f"bad request: {exc}\n".encode())
        except OSError:  # the client went away
            self.close_connection = True

    def _reply(
        self, status: int, body: bytes, content_type: str = "text/plain", headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if status in (204, 304):
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _image(self, rest: str, query: dict[str, str], **headers: str) -> None:
        name, _, ext = rest.rpartition(".")
        if ext not in FORMATS or not name:
            self._reply(404, b"unknown image\n")
            return
        size = min(int(query.get("size", 20000)), MAX_IMAGE_SIZE)
        body = image_bytes(name, ext, size)
        content_type = headers.pop("content_type", FORMATS[ext])
        headers["X-Content-SHA256"] = hashlib.sha256(body).hexdigest()
        self._reply(200, body, content_type, headers)

    def _stream_start(self, headers: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def route_img(self, rest: str, query: dict[str, str]) -> None:
        self._image(rest, query)

    def route_photo(self, rest: str, query: dict[str, str]) -> None:
        sizes, _, ext = rest.rpartition(".")
        width, _, height = sizes.partition("x")
        body = photo_bytes(int(width), int(height), ext, int(query.get("orientation", 1)))
        if "truncate" in query:
            body = body[: int(query["truncate"])]
        self._reply(200, body, FORMATS[ext])

    def route_status(self, rest: str, query: dict[str, str]) -> None:
        code = int(rest)
        if not 200 <= code <= 599:
            raise ValueError(f"status {code} is out of range")
        retry_after = query.get("retry_after", "1" if code == 429 else None)
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        self._reply(code, f"status {code}\n".encode(), headers=headers)

    def route_retry_after(self, rest: str, query: dict[str, str]) -> None:
        value, _, image = rest.partition("/")
        with self.server.lock:
            times = self.server.asked.setdefault(image.rpartition(".")[0], [])
            times.append(time.monotonic())
            first = len(times) == 1
        if not first:
            self._image(image, query)
        else:
            self._reply(429, b"status 429\n", headers={"Retry-After": value} if value != "-" else None)

    def route_slow(self, rest: str, query: dict[str, str]) -> None:
        seconds, _, image = rest.partition("/")
        if not self.server.stopping.wait(float(seconds)):
            self._image(image, query)

    def route_busy(self, rest: str, query: dict[str, str]) -> None:
        capacity, _, slow = rest.partition("/")
        seconds, _, image = slow.partition("/")
        host = (self.headers.get("Host") or "").rpartition(":")[0]
        with self.server.lock:  # counted until the answer is ready: a client never sees a request end before
            over = self.server.busy[host] >= int(capacity)
            self.server.overloaded[host] += over
            self.server.busy[host] += not over
        if over:
            self._reply(503, b"status 503\n")
            return
        stopping = self.server.stopping.wait(float(seconds))
        with self.server.lock:
            self.server.busy[host] -= 1
        if not stopping:
            self._image(image, query)

    def route_trickle(self, rest: str, query: dict[str, str]) -> None:
        self.close_connection = True
        self._stream_start({"Connection": "close"})
        self.wfile.write(_JPEG_HEAD)
        while not self.server.stopping.wait(0.5):
            self.wfile.write(b"\x00")

    def route_trickle_headers(self, rest: str, query: dict[str, str]) -> None:
        self.close_connection = True
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not self.server.stopping.wait(0.3):
            self.wfile.write(b"a")

    def route_endless(self, rest: str, query: dict[str, str]) -> None:
        self.close_connection = True
        self._stream_start({"Connection": "close"})
        self.wfile.write(_JPEG_HEAD)
        while not self.server.stopping.is_set():
            self.wfile.write(_ZEROS)

    def route_huge(self, rest: str, query: dict[str, str]) -> None:
        remaining = int(rest) * 1024 * 1024 - len(_JPEG_HEAD)
        chunked = query.get("chunked") == "1"
        self._stream_start({"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(int(rest) << 20)})
        write = self._write_chunk if chunked else self.wfile.write
        write(_JPEG_HEAD)
        while remaining > 0 and not self.server.stopping.is_set():
            write(_ZEROS[: min(remaining, _BLOCK)])
            remaining -= _BLOCK
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def route_gzipbomb(self, rest: str, query: dict[str, str]) -> None:
        self._reply(200, gzip_bomb(), "image/jpeg", {"Content-Encoding": "gzip"})

    def route_redirect(self, rest: str, query: dict[str, str]) -> None:
        hops, _, image = rest.partition("/")
        if int(hops) <= 0:
            self._image(image, query)
        else:
            self._reply(302, b"redirect\n", headers={"Location": f"/redirect/{int(hops) - 1}/{quote(image)}"})

    def route_loop(self, rest: str, query: dict[str, str]) -> None:
        self._reply(302, b"redirect\n", headers={"Location": "/loop"})

    def route_redirect_to(self, rest: str, query: dict[str, str]) -> None:
        self._reply(int(query.get("status", 302)), b"redirect\n", headers={"Location": query["url"]})

    def route_html(self, rest: str, query: dict[str, str]) -> None:
        self._reply(200, b"<!doctype html><html><body><p>not an image</p></body></html>\n", "text/html")

    def route_optout(self, rest: str, query: dict[str, str]) -> None:
        directive, _, image = rest.partition("/")
        self._image(image, query, **{"X-Robots-Tag": directive})

    def route_tdm(self, rest: str, query: dict[str, str]) -> None:
        value, _, image = rest.partition("/")
        self._image(image, query, **{"TDM-Reservation": value})

    def route_agent(self, rest: str, query: dict[str, str]) -> None:
        with self.server.lock:
            self.server.user_agents[rest.rpartition(".")[0]] = self.headers.get("User-Agent", "")
        self._image(rest, query)

    def route_wrongtype(self, rest: str, query: dict[str, str]) -> None:
        self._image(rest, query, content_type="text/html")

    def route_reset(self, rest: str, query: dict[str, str]) -> None:
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # the socket closes for real only once its file objects are closed
        self.connection.close()  # with linger 0 and no FIN sent yet, the kernel answers with RST

    def route_truncated(self, rest: str, query: dict[str, str]) -> None:
        self.close_connection = True
        self._stream_start({"Content-Length": "20000"})
        self.wfile.write(image_bytes("truncated")[:1000])

    def route_badgzip(self, rest: str, query: dict[str, str]) -> None:
        self._reply(200, image_bytes("badgzip"), "image/jpeg", {"Content-Encoding": "gzip"})

    def route_gzip(self, rest: str, query: dict[str, str]) -> None:
        name, _, ext = rest.rpartition(".")
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
        body = compressor.compress(image_bytes(name, ext)) + compressor.flush()
        if query.get("cut") == "1":
            body = body[: len(body) // 2]
        self._reply(200, body, FORMATS[ext], {"Content-Encoding": "gzip"})

    def route_robots(self, rest: str, query: dict[str, str]) -> None:
        self.route_robots_hop(str(self.server.robots_hops), query)

    def route_robots_hop(self, rest: str, query: dict[str, str]) -> None:
        if int(rest) > 0:
            self._reply(302, b"redirect\n", headers={"Location": f"/robots-hop/{int(rest) - 1}"})
        elif self.server.robots is None:
            self._reply(404, b"not found\n")
        else:
            self._reply(self.server.robots[0], self.server.robots[1].encode())

    def route_notimage(self, rest: str, query: dict[str, str]) -> None:
        self._reply(200, b"NOTIMAGE" + random.Random(rest).randbytes(4088), "image/jpeg")


_ROUTES = {
    "img": _Handler.route_img,
    "photo": _Handler.route_photo,
    "status": _Handler.route_status,
    "retry-after": _Handler.route_retry_after,
    "slow": _Handler.route_slow,
    "busy": _Handler.route_busy,
    "trickle_headers": _Handler.route_trickle_headers,
    "trickle": _Handler.route_trickle,
    "endless": _Handler.route_endless,
    "huge": _Handler.route_huge,
    "gzipbomb": _Handler.route_gzipbomb,
    "redirect": _Handler.route_redirect,
    "loop": _Handler.route_loop,
    "redirect-to": _Handler.route_redirect_to,
    "html": _Handler.route_html,
    "optout": _Handler.route_optout,
    "tdm": _Handler.route_tdm,
    "agent": _Handler.route_agent,
    "wrongtype": _Handler.route_wrongtype,
    "reset": _Handler.route_reset,
    "truncated": _Handler.route_truncated,
    "badgzip": _Handler.route_badgzip,
    "notimage": _Handler.route_notimage,
    "gzip": _Handler.route_gzip,
    "robots.txt": _Handler.route_robots,
    "robots-hop": _Handler.route_robots_hop,
}


class ImageServer:
    """The server on a background thread; port 0 picks a free port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self._server = _Server((host, port), tls)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.host = host
        self.port: int = self._server.server_address[1]

    @property
    def requests(self) -> int:
        """Requests received so far."""
        return self._server.requests

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        return self._server.connections

    def most_in_progress(self, host: str) -> int:
        """The most requests to ``host`` (the Host header's name) that were ever in progress at once."""
        with self._server.lock:
            return self._server.most_in_progress[host]

    def most_at_once(self) -> int:
        """The most requests (to any host name) that were ever in progress at once."""
        with self._server.lock:
            return self._server.most_at_once

    def started(self, host: str) -> list[float]:
        """When each request to ``host`` arrived (monotonic clock)."""
        with self._server.lock:
            return list(self._server.started.get(host, []))

    @property
    def paths(self) -> list[str]:
        """Every path asked so far (with its query), in order."""
        with self._server.lock:
            return list(self._server.paths)

    def serve_robots(self, status: int, body: str, hops: int = 0) -> None:
        """Answer /robots.txt with ``status`` and ``body``, after ``hops`` redirects."""
        with self._server.lock:
            self._server.robots = (status, body)
            self._server.robots_hops = hops

    def overloaded(self, host: str) -> int:
        """Requests to ``host`` that /busy/ answered 503 because more than its capacity were in progress."""
        with self._server.lock:
            return self._server.overloaded[host]

    def user_agent(self, name: str) -> str | None:
        """The User-Agent of the last request of /agent/<name>.<ext>, None if there was none."""
        with self._server.lock:
            return self._server.user_agents.get(name)

    def asked(self, name: str) -> list[float]:
        """When (time.monotonic) each request of /retry-after/.../<name>.<ext> arrived."""
        with self._server.lock:
            return list(self._server.asked.get(name, []))

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` (which starts with a slash) on this server."""
        scheme = "http" if self._server.tls is None else "https"
        return f"{scheme}://{self.host}:{self.port}{path}"

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, end streaming responses and close every open connection."""
        self._server.stopping.set()
        self._server.shutdown()
        with self._server.lock:
            sockets = list(self._server.sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):  # already closed by its handler
                sock.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join()


def main() -> None:
    """Run the server in the foreground until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = ImageServer(args.host, args.port)
    server.start()
    log.info("serving images on %s", server.url("/"))
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
