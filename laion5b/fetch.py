"""HTTP download of one image with limits: timeouts, total deadline, byte cap, redirects, opt-out, address guard.

``Fetcher.fetch`` returns a ``Fetched`` value for every per-URL problem; its ``status`` is None on success, the HTTP
code for a final status >= 300, or one of the words timeout, connection, dns, ssl, not_image, too_large, disallowed,
blocked_address, redirects and bad_url. Every connection goes through the address guard (``laion5b.guard``).
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlsplit

import requests
import urllib3.exceptions
from requests.structures import CaseInsensitiveDict
from urllib3.response import HTTPResponse

from laion5b.guard import DEADLINE, AddressGuard, BlockedAddress, GuardedAdapter, Network, Resolver, system_resolver
from laion5b.imageformat import image_extension
from laion5b.retry import retry_after_of
from laion5b.tasks import MAX_URL_CHARS

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024  # decoded bytes asked for per read: bounds the memory a gzip bomb can claim per step
_MAGIC_BYTES = 256  # the body is checked for an image signature once this much of it has arrived
_DRAIN_BYTES = 64 * 1024  # unwanted bodies (redirects, errors) up to this size are read so the connection is reused
_DRAIN_SECONDS = 1.0  # ... but for no longer than this
_MESSAGE_CHARS = 200
_TOKENS = re.compile(r"[\s,:;]+")
_USERINFO = re.compile(r"//[^/@\s]*@")
_ACCEPT = "image/avif,image/webp,image/apng,image/*,*/*;q=0.8"
_TIMEOUT_ERRORS = (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)
_SSL_ERRORS = (requests.exceptions.SSLError, urllib3.exceptions.SSLError, ssl.SSLError, ssl.CertificateError)
_URL_ERRORS = (
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidSchema,
    requests.exceptions.MissingSchema,
    urllib3.exceptions.LocationValueError,
    http.client.InvalidURL,
    UnicodeError,
)
_EXPECTED_ERRORS = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
    ValueError,
)


@dataclass(frozen=True)
class FetchPolicy:
    """Limits of one download; the worker builds it from the settings."""

    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    download_timeout: float = 30.0  # total deadline for the whole download incl. body and redirects
    max_bytes: int = 32 * 1024 * 1024  # body cap after content decoding (gzip bombs -> too_large)
    max_redirects: int = 5
    user_agent: str = "laion5b-downloader"
    disallowed_directives: frozenset[str] = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
    allowed_networks: tuple[Network, ...] = ()
    resolver: Resolver | None = None  # host, port -> IP strings; None = socket.getaddrinfo; gaierror = DNS failure


@dataclass(frozen=True, slots=True)
class Fetched:
    """Outcome of one fetch: image bytes and extension, or a status and a short one-line message (and the seconds a
    429 or 503 asked to wait in its Retry-After)."""

    data: bytes | None
    extension: str | None
    status: int | str | None
    error_msg: str = ""
    retry_after: float | None = None


class _Failure(Exception):
    """A per-URL outcome decided by this module, carried out of nested helpers."""

    def __init__(self, status: int | str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class Fetcher:
    """One per thread: owns one requests.Session (connection reuse)."""

    def __init__(self, policy: FetchPolicy) -> None:
        self._policy = policy
        self._disallowed = frozenset(directive.lower() for directive in policy.disallowed_directives)
        adapter = GuardedAdapter(AddressGuard(policy.allowed_networks, policy.resolver or system_resolver))
        self._session = requests.Session()
        self._session.trust_env = False  # no proxies, netrc or CA bundle from the environment
        self._session.headers = CaseInsensitiveDict(
            {"User-Agent": policy.user_agent, "Accept": _ACCEPT, "Accept-Encoding": "gzip, deflate"}
        )
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def fetch(self, url: str) -> Fetched:
        """Download one image; every per-URL problem comes back as a status, never as an exception."""
        deadline = time.monotonic() + self._policy.download_timeout
        DEADLINE.value = deadline
        try:
            return self._follow(url, deadline)
        except _Failure as exc:
            return Fetched(None, None, exc.status, _one_line(str(exc), url), exc.retry_after)
        except BlockedAddress as exc:
            return Fetched(None, None, "blocked_address", _one_line(str(exc), url))
        except _EXPECTED_ERRORS as exc:
            return Fetched(None, None, _status_word(exc), _describe(exc, url))
        finally:
            DEADLINE.value = None

    def close(self) -> None:
        """Close every pooled connection."""
        self._session.close()

    def _follow(self, url: str, deadline: float) -> Fetched:
        """Request ``url`` and follow its redirects by hand, each target checked like the first URL."""
        seen = {url}
        while True:
            response = self._send(url, deadline)
            try:
                location = response.headers.get("location") if response.status_code in _REDIRECT_CODES else None
                if not location:
                    return self._image(response, deadline)
                self._drain(response, deadline)
            finally:
                response.close()
            try:
                url = urljoin(url, location.encode("latin-1").decode("utf-8"))
            except ValueError as exc:  # undecodable Location or an unparsable target such as http://[::1
                raise _Failure("bad_url", f"bad redirect target: {exc}") from exc
            if url in seen:
                raise _Failure("redirects", "redirect loop")
            if len(seen) > self._policy.max_redirects:
                raise _Failure("redirects", f"more than {self._policy.max_redirects} redirects")
            seen.add(url)

    def _send(self, url: str, deadline: float) -> requests.Response:
        """Send one GET without following redirects; the response body is left unread."""
        if len(url) > MAX_URL_CHARS:
            raise _Failure("bad_url", f"URL longer than {MAX_URL_CHARS} characters")
        if not url.lstrip()[:8].lower().startswith(("http://", "https://")):
            raise _Failure("bad_url", "not an http(s) URL")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Failure("timeout", f"no response within {self._policy.download_timeout:g} s")
        request = _prepare(url, self._session.headers)
        timeout = (min(self._policy.connect_timeout, remaining), min(self._policy.read_timeout, remaining))
        adapter = self._session.get_adapter(request.url)
        return adapter.send(request, stream=True, timeout=timeout, verify=True, cert=None, proxies={})

    def _image(self, response: requests.Response, deadline: float) -> Fetched:
        """Turn a final response into a Fetched: check status, opt-out and size, then read and identify the body."""
        status = response.status_code
        if status >= 300:
            self._drain(response, deadline)
            retry_after = retry_after_of(status, response.headers.get("retry-after"))
            raise _Failure(status, f"HTTP {status} {response.reason or ''}".rstrip(), retry_after)
        robots = response.headers.get("x-robots-tag")
        if robots and not self._disallowed.isdisjoint(_TOKENS.split(robots.lower())):
            raise _Failure("disallowed", f"X-Robots-Tag: {robots}")
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self._policy.max_bytes:
            raise _Failure("too_large", f"Content-Length {length} > {self._policy.max_bytes}")
        data = _read_body(response.raw, self._policy.max_bytes, deadline, image=True)
        extension = image_extension(data)
        if extension is None:
            raise _Failure("not_image", "body is not a known image format")
        return Fetched(data, extension, None)

    def _drain(self, response: requests.Response, deadline: float) -> None:
        """Read a small unwanted body so that its connection can be reused; anything else is left to close()."""
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) <= _DRAIN_BYTES:
            download_deadline = DEADLINE.value
            DEADLINE.value = min(deadline, time.monotonic() + _DRAIN_SECONDS)
            try:
                with contextlib.suppress(_Failure, *_EXPECTED_ERRORS):
                    _read_body(response.raw, _DRAIN_BYTES, DEADLINE.value, image=False)
            finally:
                DEADLINE.value = download_deadline


def _prepare(url: str, headers: CaseInsensitiveDict) -> requests.PreparedRequest:
    """``PreparedRequest.prepare(method="GET", url=url, headers=headers)`` less its cookie step: no jar is ever
    passed, so that step only built an empty jar per request and asked it for a Cookie header it never has."""
    request = requests.PreparedRequest()
    request.prepare_method("GET")
    request.prepare_url(url, None)
    request.prepare_headers(headers)
    request.prepare_body(None, None)
    request.prepare_auth(None, url)  # user:password in the URL becomes Basic auth, as in prepare()
    return request


def _read_body(raw: HTTPResponse, limit: int, deadline: float, *, image: bool) -> bytes:
    """Read the decoded body in chunks, up to ``limit`` bytes and until ``deadline`` (each socket read is also capped
    by the deadline in the connection layer, so a trickle cannot outlive it)."""
    body = bytearray()
    checked = not image
    while True:
        if time.monotonic() >= deadline:
            raise _Failure("timeout", f"body not complete by the deadline ({len(body)} bytes read)")
        chunk = raw.read1(_CHUNK, decode_content=True)
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            raise _Failure("too_large", f"body larger than {limit} bytes")
        if not checked and len(body) >= _MAGIC_BYTES:
            if image_extension(bytes(body[:_MAGIC_BYTES])) is None:
                raise _Failure("not_image", "body is not a known image format")
            checked = True


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: causes, urllib3 reasons, requests' wrapped exceptions and contexts."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        inner = [current.__cause__, getattr(current, "reason", None), *current.args[:1], current.__context__]
        current = next((item for item in inner if isinstance(item, BaseException)), None)


def _status_word(exc: BaseException) -> str:
    """Map a requests/urllib3/socket exception to its status word."""
    # urllib3's NewConnectionError (refused, unreachable) subclasses ConnectTimeoutError: judge it by its cause
    chain = [item for item in _causes(exc) if not isinstance(item, urllib3.exceptions.NewConnectionError)]
    for word, kinds in (
        ("blocked_address", BlockedAddress),
        ("dns", socket.gaierror),
        ("timeout", _TIMEOUT_ERRORS),
        ("ssl", _SSL_ERRORS),
        ("bad_url", _URL_ERRORS),
    ):
        if any(isinstance(item, kinds) for item in chain):
            return word
    return "connection"


def _describe(exc: BaseException, url: str) -> str:
    """One short line naming the innermost urllib3 exception (else the root cause), without URL credentials."""
    chain = list(_causes(exc))
    named = [  # urllib3's messages say what failed and where; MaxRetryError only wraps another one
        item
        for item in chain
        if isinstance(item, urllib3.exceptions.HTTPError) and not isinstance(item, urllib3.exceptions.MaxRetryError)
    ]
    subject = named[-1] if named else chain[-1]
    return _one_line(f"{type(subject).__name__}: {subject}" if str(subject) else type(subject).__name__, url)


def _one_line(text: str, url: str) -> str:
    """``text`` on one line, at most 200 characters, with userinfo and the URL's password removed."""
    text = _USERINFO.sub("//***@", " ".join(text.split()))
    with contextlib.suppress(ValueError):
        password = urlsplit(url).password
        if password:
            text = text.replace(password, "***").replace(unquote(password), "***")
    return text[:_MESSAGE_CHARS]
