"""A loopback stand-in for the web: thousands of hosts, each its own 127.x.y.z address, with the host structure of
real LAION URLs, TLS from a throwaway CA, log-normal waits and a tail of slow, dead and misbehaving hosts.

The model (``build_web``) replays the host names of a LAION sample (``../shared/data/laion_sample_10000.parquet``):
hosts seen more than once keep their share of URLs (scaled to N); hosts seen once get a fresh host per URL, so the
share of URLs on a once-seen host stays the sample's at any N. Each host gets the scheme most of its URLs use and a
behaviour ``kind`` drawn with ``KIND_SHARES`` (the 10 largest hosts, the CDNs, are always ``ok``). Everything is
deterministic from a seed.

The server (``python3 bench/webserve.py --spec SPEC.json --procs 2``) binds one listening socket per host address
in the parent (so one RLIMIT_NOFILE, raised to the hard limit, and one port for every host), then forks ``procs``
asyncio processes that all accept on those sockets. The host is known by the listening socket a connection came
in on. Per request: a wait drawn from a log-normal distribution (deterministic per path), then by kind:
  ok         200 image/jpeg: ``tools.image_server.image_bytes`` of the size named in the path (/img/<id>-<size>.jpg)
  slow       the same after 3-8 s
  never      accepts and stays silent (no TLS handshake either) until the client leaves
  reset      reads the request, then resets the connection (RST)
  refused    no listener: the kernel refuses the connection
  notfound   404 text/html
  html       200 text/html (a parked page)
  ratelimit  429 with ``Retry-After: 120``
HTTP/1.1 keep-alive (closed when the client sends ``Connection: close``), no pipelining. Prints
``ready port=P`` when every socket listens; SIGTERM to the parent stops every process.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import random
import re
import resource
import signal
import socket
import ssl
import statistics
import struct
import sys
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH)]  # imgserve, also when loaded by a test
sys.path.append(str(BENCH.parent))  # for tools/; bench/ stays first (bench/speed.py)

from imgserve import supervise  # noqa: E402

from tools.image_server import image_bytes  # noqa: E402

KIND_SHARES = {  # share of hosts (outside the 10 largest); "ok" takes the rest
    "slow": 0.04,
    "never": 0.015,
    "reset": 0.02,
    "refused": 0.01,
    "notfound": 0.03,
    "html": 0.02,
    "ratelimit": 0.015,
}
ALWAYS_OK_TOP = 10
WAIT_MEDIAN = 0.150  # seconds before an answer: log-normal with this median ...
WAIT_SIGMA = 0.8  # ... and this sigma of its logarithm (p95 ~ 0.56 s, p99 ~ 0.97 s)
WAIT_MAX = 5.0
SLOW_RANGE = (3.0, 8.0)
SIZE_MEDIAN = 30_000  # image bytes: log-normal, clipped to SIZE_RANGE
SIZE_SIGMA = 0.6
SIZE_RANGE = (10_000, 100_000)
RETRY_AFTER = 120
DNS_DOMAIN = "web.test"
FIRST_ADDRESS = int(ipaddress.ip_address("127.20.0.0"))


# --- the model ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    index: int
    name: str  # a name under DNS_DOMAIN, for the DNS variant
    address: str  # its own loopback address
    https: bool
    kind: str
    urls: int


@dataclass(frozen=True)
class Web:
    hosts: list[Host]
    url_hosts: list[int]  # host index of URL i
    sizes: list[int]  # image bytes of URL i
    seed: int

    def urls(self, http_port: int, https_port: int, by_name: bool) -> list[str]:
        """The URL list: each host by its address (IP literal) or by its name under ``DNS_DOMAIN``."""
        out = []
        for i, (index, size) in enumerate(zip(self.url_hosts, self.sizes, strict=True)):
            host = self.hosts[index]
            scheme, port, default = ("https", https_port, 443) if host.https else ("http", http_port, 80)
            authority = host.name if by_name else host.address
            if port != default:
                authority += f":{port}"
            out.append(f"{scheme}://{authority}/img/{i}-{size}.jpg")
        return out

    def stats(self) -> dict[str, float]:
        """The host structure: hosts, top-1/10/100 shares, share of URLs on once-seen hosts, https and kind shares."""
        n = len(self.url_hosts)
        counts = sorted((host.urls for host in self.hosts), reverse=True)
        out = {
            "urls": n,
            "hosts": len(self.hosts),
            "top1": counts[0] / n,
            "top10": sum(counts[:10]) / n,
            "top100": sum(counts[:100]) / n,
            "once": sum(1 for c in counts if c == 1) / n,
            "https": sum(host.urls for host in self.hosts if host.https) / n,
        }
        kinds_hosts = Counter(host.kind for host in self.hosts)
        kinds_urls = Counter()
        for host in self.hosts:
            kinds_urls[host.kind] += host.urls
        for kind in ("ok", *KIND_SHARES):
            out[f"hosts_{kind}"] = kinds_hosts[kind] / len(self.hosts)
            out[f"urls_{kind}"] = kinds_urls[kind] / n
        return out


def sample_hosts(path: Path) -> list[tuple[str, int, int]]:
    """(host name, URLs, https URLs) of a LAION parquet, most URLs first."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=None)
    column = "URL" if "URL" in table.column_names else "url"
    urls: Counter[str] = Counter()
    https: Counter[str] = Counter()
    for url in table.column(column).to_pylist():
        name = (urlsplit(url).hostname or "") if url else ""
        urls[name] += 1
        https[name] += url.startswith("https:") if url else 0
    return sorted(((name, count, https[name]) for name, count in urls.items()), key=lambda h: (-h[1], h[0]))


def build_web(sample: list[tuple[str, int, int]], n: int, seed: int) -> Web:
    """N URLs with the sample's host structure (see the module docstring)."""
    rng = random.Random(seed)
    total = sum(count for _, count, _ in sample)
    scale = n / total
    planned: list[tuple[str, int, bool]] = []  # name, URLs, https
    for name, count, https in sample:
        if count > 1 and round(count * scale) > 0:
            planned.append((name, round(count * scale), 2 * https >= count))
    once = [(name, https > 0) for name, count, https in sample if count == 1]
    n_once = min(n - sum(p[1] for p in planned), round(len(once) * scale)) if once else 0
    for copy in range(n_once):
        name, https = once[copy % len(once)]
        planned.append((f"{name}-{copy // len(once)}" if copy >= len(once) else name, 1, https))
    top_name, top_count, top_https = planned[0]
    planned[0] = (top_name, top_count + n - sum(p[1] for p in planned), top_https)  # round to exactly N
    hosts = []
    for index, (name, count, https) in enumerate(planned):
        kind = "ok" if index < ALWAYS_OK_TOP else _draw_kind(rng)
        hosts.append(Host(index, _dns_name(name, index), _address(index), https, kind, count))
    url_hosts = [host.index for host in hosts for _ in range(host.urls)]
    rng.shuffle(url_hosts)
    sizes = [_size(rng) for _ in url_hosts]
    return Web(hosts, url_hosts, sizes, seed)


def _draw_kind(rng: random.Random) -> str:
    draw = rng.random()
    for kind, share in KIND_SHARES.items():
        if draw < share:
            return kind
        draw -= share
    return "ok"


def _size(rng: random.Random) -> int:
    return int(min(max(rng.lognormvariate(0.0, SIZE_SIGMA) * SIZE_MEDIAN, SIZE_RANGE[0]), SIZE_RANGE[1]))


def _address(index: int) -> str:
    """127.20.0.1 onwards, skipping .0 and .255 in the last byte."""
    high, low = divmod(index, 254)
    return str(ipaddress.ip_address(FIRST_ADDRESS + high * 256 + low + 1))


def _dns_name(name: str, index: int) -> str:
    label = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or "host"
    return f"{label}-{index}.{DNS_DOMAIN}"


# --- TLS material ---------------------------------------------------------------------------------------------


def ensure_tls(folder: Path, addresses: list[str]) -> tuple[Path, dict[str, Path], Path]:
    """A throwaway CA under ``folder`` (kept between runs), a certificate per address (IP SAN) and a wildcard one
    for ``*.web.test``, all on one EC key. Returns (CA file, address -> certificate file, wildcard certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    ca_file, ca_key_file, key_file = folder / "ca.pem", folder / "ca-key.pem", folder / "leaf-key.pem"
    now = datetime.datetime.now(datetime.UTC)
    if ca_file.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
        if ca_cert.not_valid_after_utc < now + datetime.timedelta(days=7):
            for old in folder.glob("*.pem"):
                old.unlink()
    pem = serialization.Encoding.PEM
    if not ca_file.exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "laion5b bench throwaway CA")])
        ca_cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        no_encryption = serialization.NoEncryption()
        private = serialization.PrivateFormat.PKCS8
        ca_key_file.write_bytes(ca_key.private_bytes(pem, private, no_encryption))
        key_file.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(pem, private, no_encryption))
        ca_file.write_bytes(ca_cert.public_bytes(pem))
    ca_cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), None)
    leaf_key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    key_pem = key_file.read_bytes()

    def issue(path: Path, subject: str, alt_names: list[x509.GeneralName]) -> Path:
        if path.exists():
            return path
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(ca_cert.subject).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=300))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        path.write_bytes(cert.public_bytes(pem) + key_pem)
        return path

    certs = {
        address: issue(folder / f"ip-{address}.pem", address, [x509.IPAddress(ipaddress.ip_address(address))])
        for address in addresses
    }
    wildcard = issue(folder / "wildcard.pem", f"*.{DNS_DOMAIN}", [x509.DNSName(f"*.{DNS_DOMAIN}")])
    return ca_file, certs, wildcard


# --- the server -----------------------------------------------------------------------------------------------

_NORMAL = statistics.NormalDist()
_HTML = b"<!doctype html><html><head><title>Parked</title></head><body>" + b"<p>This domain is parked.</p>" * 200
_NOT_FOUND = b"<!doctype html><html><body><h1>404 Not Found</h1></body></html>"
_IMAGE_PATH = re.compile(rb"^/img/(\d+)-(\d+)\.jpg$")


def _unit(seed: int, path: bytes, salt: bytes) -> float:
    """A number in (0, 1) fixed by the seed and the path."""
    return (zlib.crc32(salt + path, seed & 0xFFFFFFFF) + 0.5) / 2**32


def wait_seconds(seed: int, kind: str, path: bytes) -> float:
    """How long the server waits before answering ``path`` on a host of ``kind``."""
    if kind == "slow":
        low, high = SLOW_RANGE
        return low + (high - low) * _unit(seed, path, b"slow")
    z = _NORMAL.inv_cdf(_unit(seed, path, b"wait"))
    return min(WAIT_MEDIAN * 2.718281828459045 ** (WAIT_SIGMA * z), WAIT_MAX)


def _response(status: bytes, content_type: bytes, body: bytes, close: bool, extra: bytes = b"") -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return (
        b"HTTP/1.1 %s\r\nServer: webserve\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n"
        % (status, content_type, len(body), connection, extra)
        + body
    )


class _Http(asyncio.Protocol):
    """One connection to one host: requests answered in order, each after its wait."""

    def __init__(self, kind: str, seed: int) -> None:
        self.kind = kind
        self.seed = seed
        self.buffer = b""
        self.busy = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.kind == "never":
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._serve()

    def _serve(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self.transport.close()
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            first = head.split(b"\r\n", 1)[0].split(b" ")
            path = first[1] if len(first) > 1 else b"/"
            close = b"\nconnection: close" in head.lower()
            self.busy = True
            delay = wait_seconds(self.seed, self.kind, path)
            asyncio.get_running_loop().call_later(delay, self._answer, path, close)

    def _answer(self, path: bytes, close: bool) -> None:
        self.busy = False
        transport = self.transport
        if transport is None:
            return
        if self.kind == "reset":
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
            return
        transport.write(self._body(path, close))
        if close:
            transport.close()
            return
        self._serve()

    def _body(self, path: bytes, close: bool) -> bytes:
        if self.kind == "notfound":
            return _response(b"404 Not Found", b"text/html", _NOT_FOUND, close)
        if self.kind == "html":
            return _response(b"200 OK", b"text/html; charset=utf-8", _HTML, close)
        if self.kind == "ratelimit":
            body = b"rate limited\n"
            return _response(b"429 Too Many Requests", b"text/plain", body, close, b"Retry-After: %d\r\n" % RETRY_AFTER)
        match = _IMAGE_PATH.match(path.split(b"?", 1)[0])
        if match is None:
            return _response(b"404 Not Found", b"text/html", _NOT_FOUND, close)
        name, size = match.group(1).decode(), int(match.group(2))
        return _response(b"200 OK", b"image/jpeg", image_bytes(name, "jpg", size), close)


@dataclass(frozen=True)
class Listener:
    sock: socket.socket
    kind: str
    tls: ssl.SSLContext | None


def bind_listeners(spec: dict) -> list[Listener]:
    """One listening socket per host that is not ``refused``; TLS contexts for the https ones."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    contexts: dict[str, ssl.SSLContext] = {}
    listeners = []
    for address, https, kind, cert in spec["hosts"]:
        if kind == "refused":
            continue
        port = spec["https_port"] if https else spec["http_port"]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(4096)
        sock.setblocking(False)
        context = None
        if https and kind != "never":
            context = contexts.get(cert)
            if context is None:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(cert)
                contexts[cert] = context
        listeners.append(Listener(sock, kind, context))
    return listeners


def serve(listeners: list[Listener], seed: int) -> None:
    """Accept on every listener in one asyncio loop until SIGTERM."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = []
        for listener in listeners:
            kind = listener.kind
            servers.append(
                await loop.create_server(
                    lambda kind=kind: _Http(kind, seed), sock=listener.sock, ssl=listener.tls, backlog=4096
                )
            )
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        for server in servers:
            server.close()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--spec", required=True, help="JSON: seed, http_port, https_port, hosts [[addr, https, kind, cert]]"
    )
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    try:
        listeners = bind_listeners(spec)
    except OSError as error:
        print(f"bind failed: {error}", flush=True)
        sys.exit(3)
    serve_forked(listeners, args.procs, lambda: serve(listeners, spec["seed"]))


def serve_forked(listeners: list[Listener], procs: int, serve_here: Callable[[], None]) -> None:
    """Run ``serve_here`` in ``procs`` forked children that share ``listeners``; say ready, then supervise them."""
    children = []
    for _ in range(procs):
        pid = os.fork()
        if pid == 0:
            try:
                serve_here()
            finally:
                os._exit(0)
        children.append(pid)
    for listener in listeners:
        listener.sock.close()
    print(f"ready listeners={len(listeners)}", flush=True)
    supervise(children)


if __name__ == "__main__":
    main()
