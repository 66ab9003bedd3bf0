"""What every download engine checks, as data and functions: the limits, the outcome value, the URL and response
rules, the body cap and magic-number check, redirect targets, and the one-line messages.

A fetch returns a ``Fetched`` for every per-URL problem; its ``status`` is None on success, the HTTP code for a
final status >= 300, or one of the words timeout, connection, dns, ssl, not_image, too_large, truncated, disallowed
(an X-Robots-Tag or TDMRep opt-out), blocked_address, redirects and bad_url; or GAVE_WAY when the download yielded to
local pressure, or POSTPONED when its host asked the fleet to wait (neither is the URL's fault).
"""

from __future__ import annotations

import contextlib
import re
import ssl
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import certifi

from laion5b import __version__
from laion5b.guard import Network, Resolver
from laion5b.imageformat import image_extension
from laion5b.retry import retry_after_of
from laion5b.tasks import MAX_URL_CHARS

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
CHUNK = 64 * 1024  # decoded bytes asked for per read: bounds the memory a gzip bomb can claim per step
DRAIN_BYTES = 64 * 1024  # unwanted bodies (redirects, errors) up to this size are read so the connection is reused
DRAIN_SECONDS = 1.0  # ... but for no longer than this
GAVE_WAY = "gave_way"
"""The status of a download that yielded to this process's own limits (byte budget, DNS look-up threads): it is tried
again soon without counting an attempt, and never recorded as the URL's failure."""
POSTPONED = "postponed"
"""The status of a download not started because its host asked the whole fleet to wait (a Retry-After pause, a
Crawl-delay): it is tried again after ``retry_after`` seconds without counting an attempt."""
TRUNCATED = "truncated"
BUDGET_MESSAGE = "gave way: the bodies in memory reached max_inflight_bytes"
TOOL_NAME = "laion5b-downloader"
ACCEPT = "image/avif,image/webp,image/apng,image/*,*/*;q=0.8"
ACCEPT_ENCODING = "gzip, deflate"
_MAGIC_BYTES = 256  # the body is checked for an image signature once this much of it has arrived
_MESSAGE_CHARS = 200
_TOKENS = re.compile(r"[\s,:;]+")
_USERINFO = re.compile(r"//[^/@\s]*@")


def user_agent_of(contact: str) -> str:
    """The User-Agent naming this tool, its version and, when given, the URL or address its operator is reached at."""
    agent = f"{TOOL_NAME}/{__version__}"
    return f"{agent} (+{contact})" if contact else agent


@dataclass(frozen=True)
class FetchPolicy:
    """Limits of one download; the worker builds it from the settings."""

    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    download_timeout: float = 30.0  # total deadline for the whole download incl. body and redirects
    max_bytes: int = 32 * 1024 * 1024  # body cap after content decoding (gzip bombs -> too_large)
    max_redirects: int = 5
    user_agent: str = user_agent_of("")
    disallowed_directives: frozenset[str] = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
    honour_tdm_reservation: bool = True  # a response with the W3C TDMRep header tdm-reservation: 1 is disallowed
    allowed_networks: tuple[Network, ...] = ()
    resolver: Resolver | None = None  # host, port -> IP strings; None = the system's; gaierror = DNS failure
    dns_timeout: float = 10.0  # a look-up is given up after this long (status dns); waits for a DNS thread are apart
    tls_ca_file: str = ""  # CA bundle for servers' certificates; empty = the bundle requests ships (certifi)

    def headers(self) -> dict[str, str]:
        return {"User-Agent": self.user_agent, "Accept": ACCEPT, "Accept-Encoding": ACCEPT_ENCODING}


@dataclass(frozen=True, slots=True)
class Fetched:
    """Outcome of one fetch: image bytes and extension, or a status and a short one-line message."""

    data: bytes | None  # from the fetchers a bytearray: the body as read, handed over without a copy
    extension: str | None
    status: int | str | None
    error_msg: str = ""
    retry_after: float | None = None  # seconds a 429 or 503 asked the client to wait (Retry-After)
    final_url: str | None = None  # the URL the image came from, after redirects


class FetchFailure(Exception):
    """A per-URL outcome decided by these rules, carried out of nested helpers."""

    def __init__(self, status: int | str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def tls_context(ca_file: str) -> ssl.SSLContext:
    """The TLS client context of a process: certificates checked against ``ca_file`` (else certifi's bundle),
    loaded once, not once per connection."""
    return ssl.create_default_context(cafile=ca_file or certifi.where())


def check_url(url: str, deadline: float, policy: FetchPolicy) -> None:
    """Refuse a URL that is too long or not http(s), or a request that the deadline leaves no time for."""
    if len(url) > MAX_URL_CHARS:
        raise FetchFailure("bad_url", f"URL longer than {MAX_URL_CHARS} characters")
    if not url.lstrip()[:8].lower().startswith(("http://", "https://")):
        raise FetchFailure("bad_url", "not an http(s) URL")
    if deadline - time.monotonic() <= 0:
        raise FetchFailure("timeout", f"no response within {policy.download_timeout:g} s")


def check_final(status: int, reason: str | None, headers: Mapping[str, str], policy: FetchPolicy) -> None:
    """Refuse a final response by its status, its opt-out (X-Robots-Tag, TDMRep) or its announced length."""
    if status >= 300:
        retry_after = retry_after_of(status, headers.get("retry-after"))
        raise FetchFailure(status, f"HTTP {status} {reason or ''}".rstrip(), retry_after)
    robots = headers.get("x-robots-tag")
    if robots and not _disallowed(policy).isdisjoint(_TOKENS.split(robots.lower())):
        raise FetchFailure("disallowed", f"X-Robots-Tag: {robots}")
    reservation = headers.get("tdm-reservation")
    if policy.honour_tdm_reservation and reservation and _reserved(reservation):
        raise FetchFailure("disallowed", f"tdm-reservation: {reservation}")
    length = headers.get("content-length", "")
    if length.isdigit() and int(length) > policy.max_bytes:
        raise FetchFailure("too_large", f"Content-Length {length} > {policy.max_bytes}")


def _disallowed(policy: FetchPolicy) -> frozenset[str]:
    return frozenset(directive.lower() for directive in policy.disallowed_directives)


def _reserved(value: str) -> bool:
    """Whether a tdm-reservation header value reserves text and data mining rights (TDMRep: 1; 0 or else: not)."""
    return "1" in (item.strip() for item in value.split(","))


def redirect_location(status: int, headers: Mapping[str, str]) -> str | None:
    """The Location of a redirect response, or None when the response is final."""
    return headers.get("location") if status in REDIRECT_CODES else None


def redirect_target(url: str, location: str, seen: set[str], max_redirects: int) -> str:
    """The absolute URL a redirect leads to; refuse loops, more than ``max_redirects`` hops and unusable targets."""
    try:
        target = urljoin(url, location.encode("latin-1").decode("utf-8"))
    except ValueError as exc:  # undecodable Location or an unparsable target such as http://[::1
        raise FetchFailure("bad_url", f"bad redirect target: {exc}") from exc
    if target in seen:
        raise FetchFailure("redirects", "redirect loop")
    if len(seen) > max_redirects:
        raise FetchFailure("redirects", f"more than {max_redirects} redirects")
    seen.add(target)
    return target


def drain_length(headers: Mapping[str, str]) -> int | None:
    """Bytes of an unwanted body worth reading to keep its connection (a small announced length), else None."""
    length = headers.get("content-length", "")
    return int(length) if length.isdigit() and int(length) <= DRAIN_BYTES else None


def pressed(fetched: Fetched, body: Body, download_timeout: float) -> Fetched:
    """A download that timed out after waiting for byte budget for half its time or more gave way: it lost its time
    to local pressure, not to the URL."""
    if fetched.status != "timeout" or body.waited < download_timeout / 2:
        return fetched
    return Fetched(None, None, GAVE_WAY, f"{BUDGET_MESSAGE} (waited {body.waited:.1f} s of {download_timeout:g} s)")


class Body:
    """A response body as it arrives: capped at ``limit`` bytes, checked for an image signature early."""

    def __init__(self, limit: int, deadline: float, *, image: bool = True) -> None:
        self.limit = limit
        self.deadline = deadline
        self.reserved = 0  # bytes of it reserved in the process's byte budget
        self.waiting = False  # waiting for byte budget (a deadline that passes now is local pressure, not a timeout)
        self.waited = 0.0  # seconds spent waiting for byte budget in all
        self._data = bytearray()
        self._checked = not image

    def __len__(self) -> int:
        return len(self._data)

    def add(self, chunk: bytes) -> None:
        """Append a decoded chunk; refuse the body once it is too large, late or not an image."""
        if time.monotonic() >= self.deadline:
            raise FetchFailure("timeout", f"body not complete by the deadline ({len(self._data)} bytes read)")
        self._data += chunk
        if len(self._data) > self.limit:
            raise FetchFailure("too_large", f"body larger than {self.limit} bytes")
        if not self._checked and len(self._data) >= _MAGIC_BYTES:
            if image_extension(bytes(self._data[:_MAGIC_BYTES])) is None:
                raise FetchFailure("not_image", "body is not a known image format")
            self._checked = True

    def image(self, url: str) -> Fetched:
        """The complete body (of ``url``) as a Fetched image; refuse it when it is no known image.

        Its data is the body's own buffer (a bytearray), handed over without a copy: the Body is done with it.
        """
        data = self._data
        self._data = bytearray()
        extension = image_extension(data)
        if extension is None:
            raise FetchFailure("not_image", "body is not a known image format")
        return Fetched(data, extension, None, final_url=url)


class Decoder:
    """Content decoding (gzip, deflate) in steps of at most CHUNK decoded bytes; other encodings pass through.

    ``finish`` refuses a compressed body that ended before its trailer (``truncated``): a cut gzip stream decodes
    without error up to the cut, and would otherwise be stored as a complete image.
    """

    def __init__(self, encoding: str) -> None:
        encoding = encoding.strip().lower()
        self._raw_fallback = encoding == "deflate"
        self._started = False
        if encoding in ("gzip", "x-gzip"):
            self._zlib: Any = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._zlib = zlib.decompressobj()
        else:
            self._zlib = None

    def decode(self, data: bytes) -> Iterator[bytes]:
        """The decoded chunks of ``data``, made one at a time as they are consumed."""
        if self._zlib is None:
            yield data
            return
        self._started = self._started or bool(data)
        if self._raw_fallback:
            self._raw_fallback = False
            try:
                chunk = self._zlib.decompress(data, CHUNK)
            except zlib.error:  # a deflate body without the zlib header, as some servers send
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                chunk = self._zlib.decompress(data, CHUNK)
        else:
            chunk = self._zlib.decompress(data, CHUNK)
        while chunk:
            yield chunk
            tail = self._zlib.unconsumed_tail
            chunk = self._zlib.decompress(tail, CHUNK) if tail else b""

    def finish(self) -> None:
        """Check that a compressed body reached the end of its stream (raise FetchFailure ``truncated`` if not)."""
        if self._started and not self._zlib.eof:
            raise FetchFailure(TRUNCATED, "compressed body ended before its end of stream")


def failed(exc: FetchFailure, url: str) -> Fetched:
    """The Fetched of a failure decided by these rules."""
    return Fetched(None, None, exc.status, one_line(str(exc), url), exc.retry_after)


def one_line(text: str, url: str) -> str:
    """``text`` on one line, at most 200 characters, with userinfo and the URL's password removed."""
    text = _USERINFO.sub("//***@", " ".join(text.split()))
    with contextlib.suppress(ValueError):
        password = urlsplit(url).password
        if password:
            text = text.replace(password, "***").replace(unquote(password), "***")
    return text[:_MESSAGE_CHARS]
