"""speed.py --serve: the dashboard page, /api/status and /metrics, read-only, on a small threaded HTTP server.

Bound to anything but loopback it needs a token; with a token set, every request must carry it (``Authorization:
Bearer <token>`` or ``?token=<token>``) and any other gets an empty 401.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis

from laion5b import history, metrics, stats

log = logging.getLogger(__name__)

WEB = Path(__file__).resolve().parent / "web"
DEFAULT_LISTEN = "127.0.0.1:8800"
DEFAULT_SINCE = 6 * history.HOUR
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ListenError(ValueError):
    """The --listen address cannot be used as asked; the message is one line."""


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ListenError(f"--listen takes HOST:PORT, got {text!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback one."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as error:
        raise ListenError(f"--listen: cannot resolve {host!r}: {error}") from None
    return all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def page() -> bytes:
    """The dashboard page with the charting library and its style inlined (so that only ``/`` needs the token)."""
    html = (WEB / "dashboard.html").read_text(encoding="utf-8")
    html = html.replace("/*UPLOT_CSS*/", (WEB / "uPlot.min.css").read_text(encoding="utf-8"))
    return html.replace("/*UPLOT_JS*/", (WEB / "uPlot.iife.min.js").read_text(encoding="utf-8")).encode()


@dataclass
class Source:
    """Reads what the dashboard shows."""

    client: redis.Redis
    read: Callable[[], stats.Snapshot]
    history: history.History

    def status(self, since: float) -> dict[str, Any]:
        snapshot = self.read()
        document = stats.to_json(snapshot)
        if since > 0:
            scopes = [history.RUN, *self.history.hosts()]
            samples = self.history.read(scopes, since, snapshot.at)
            document["history"] = {
                "since": since,
                "fields": [name for name in history.Sample.__dataclass_fields__],
                "scopes": {scope: [sample.to_list() for sample in samples[scope]] for scope in scopes},
            }
        return document


def handler(source: Source, token: str, body: bytes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "laion5b-dashboard"
        sys_version = ""

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if token and not self._authorized(query):
                self._send(401, b"", "text/plain")
                return
            try:
                if url.path == "/":
                    self._send(200, body, "text/html; charset=utf-8")
                elif url.path == "/api/status":
                    since = _since(query)
                    if since is None:
                        self._send(400, b"since: a duration such as 90s, 30m, 6h or 2d\n", "text/plain")
                        return
                    self._send(200, json.dumps(source.status(since)).encode(), "application/json")
                elif url.path == "/metrics":
                    self._send(200, metrics.exposition(source.read()), METRICS_TYPE)
                else:
                    self._send(404, b"not found\n", "text/plain")
            except redis.RedisError as error:
                log.warning("dashboard_redis_error error=%s", " ".join(str(error).split()))
                self._send(503, b"redis unreachable\n", "text/plain")

        def _authorized(self, query: dict[str, list[str]]) -> bool:
            header = self.headers.get("Authorization", "")
            offered = header[7:] if header.startswith("Bearer ") else (query.get("token") or [""])[0]
            return hmac.compare_digest(offered.encode(), token.encode())

        def _send(self, status: int, data: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("dashboard_request %s", format % args)

    return Handler


def _since(query: dict[str, list[str]]) -> float | None:
    text = (query.get("since") or [""])[0]
    if not text:
        return DEFAULT_SINCE
    try:
        return history.parse_duration(text)
    except ValueError:
        return None


def make_server(listen: str, token: str, source: Source) -> ThreadingHTTPServer:
    """The dashboard's server, bound; raise ListenError when it may not listen there (no token beyond loopback)."""
    host, port = parse_listen(listen)
    if not token and not is_loopback(host):
        raise ListenError(f"refusing to serve on {host} without a token: set LAION_DASHBOARD_TOKEN (dashboard_token)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("DashboardServer", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
    return server_class((host, port), handler(source, token, page()))


def serve(server: ThreadingHTTPServer, stop: threading.Event) -> None:
    """Serve until ``stop`` is set."""
    thread = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    log.info("dashboard_start url=http://%s:%d/", host, port)
    stop.wait()
    server.shutdown()
    server.server_close()
    log.info("dashboard_exit")
