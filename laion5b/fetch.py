"""The threads engine's HTTP download of one image, with requests: the rules of ``laion5b.fetchpolicy`` on a
``requests`` session whose connections go through the address guard (``laion5b.guard``)."""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import socket
import ssl
import time
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import requests
import urllib3.exceptions
from requests.structures import CaseInsensitiveDict
from urllib3.response import HTTPResponse
from urllib3.util import parse_url

from laion5b.fetchpolicy import (
    BUDGET_MESSAGE,
    CHUNK,
    DRAIN_SECONDS,
    GAVE_WAY,
    TRUNCATED,
    Body,
    Decoder,
    Fetched,
    FetchFailure,
    FetchPolicy,
    check_final,
    check_url,
    drain_length,
    failed,
    one_line,
    pressed,
    redirect_location,
    redirect_target,
    tls_context,
)
from laion5b.guard import DEADLINE, PINNED, AddressGuard, BlockedAddress, GuardedAdapter, bare_host, system_resolver
from laion5b.limits import ByteBudget
from laion5b.robots import ROBOTS_REDIRECTS, RobotsGate, RobotsText, Turn

if TYPE_CHECKING:
    from laion5b.hops import ThreadHops

Final = Callable[[requests.Response, str], Fetched]
"""What turns the final response of a request (after its redirects) into its outcome: an image, or a robots.txt."""
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
_TRUNCATED_ERRORS = (http.client.IncompleteRead, urllib3.exceptions.IncompleteRead)
_EXPECTED_ERRORS = (
    zlib.error,
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
    ValueError,
)


class Fetcher:
    """One per thread: owns one requests.Session (connection reuse). The TLS context and the byte budget are the
    process's, shared by its threads."""

    def __init__(
        self,
        policy: FetchPolicy,
        tls: ssl.SSLContext | None = None,
        budget: ByteBudget | None = None,
        robots: RobotsGate | None = None,
        hops: ThreadHops | None = None,
    ) -> None:
        self._policy = policy
        self._budget = budget
        self._robots = robots
        self._hops = hops
        self._guard = AddressGuard(policy.allowed_networks, policy.resolver or system_resolver)
        adapter = GuardedAdapter(self._guard, tls or tls_context(policy.tls_ca_file))
        self._session = requests.Session()
        self._session.trust_env = False  # no proxies, netrc or CA bundle from the environment
        self._session.headers = CaseInsensitiveDict(policy.headers())
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def fetch(self, url: str) -> Fetched:
        """Download one image; every per-URL problem comes back as a status, never as an exception.

        With a byte budget, the image's bytes stay reserved until ``release(fetched)`` is called. With a robots.txt
        gate, each URL (redirect hops included) is checked first; the first one before the download's time starts.
        """
        try:
            turn = self._enter(url)
        except FetchFailure as exc:
            return failed(exc, url)
        deadline = time.monotonic() + self._policy.download_timeout
        body = Body(self._policy.max_bytes, deadline)
        image = functools.partial(self._image, body=body)
        fetched = self._attempt(url, deadline, lambda: self._follow(url, deadline, image, turn))
        fetched = pressed(fetched, body, self._policy.download_timeout)
        if fetched.data is None and self._budget is not None:
            self._budget.give(body.reserved)
        return fetched

    def fetch_robots(self, url: str) -> Fetched:
        """A robots.txt: its first ROBOTS_BYTES bytes as ``data`` (status None) once up to 5 redirects are followed,
        or the status that ended it; with the same guard, timeouts and limits as an image."""
        deadline = time.monotonic() + self._policy.download_timeout
        text = functools.partial(self._robots_text, deadline=deadline)
        return self._attempt(url, deadline, lambda: self._follow(url, deadline, text, None, ROBOTS_REDIRECTS))

    def close(self) -> None:
        """Close every pooled connection."""
        self._session.close()

    def _attempt(self, url: str, deadline: float, follow: Callable[[], Fetched]) -> Fetched:
        """Run ``follow`` under ``deadline``; every per-URL problem becomes a status."""
        outer = getattr(DEADLINE, "value", None)
        DEADLINE.value = deadline
        try:
            return follow()
        except FetchFailure as exc:
            return failed(exc, url)
        except BlockedAddress as exc:
            return Fetched(None, None, "blocked_address", one_line(str(exc), url))
        except _EXPECTED_ERRORS as exc:
            return Fetched(None, None, _status_word(exc), _describe(exc, url))
        finally:
            DEADLINE.value = outer

    def _follow(
        self, url: str, deadline: float, final: Final, turn: Turn | None, max_redirects: int | None = None
    ) -> Fetched:
        """Request ``url`` and follow its redirects by hand, each target checked like the first URL (whose robots.txt
        ``turn`` is already taken; robots.txt requests pass ``max_redirects`` and are not checked)."""
        seen = {url}
        gated = max_redirects is None
        while True:
            address = None
            try:
                address = self._reach(url, deadline) if gated else None
                response = self._send(url, deadline)
                try:
                    location = redirect_location(response.status_code, response.headers)
                    if not location:
                        return final(response, url)
                    self._drain(response, deadline)
                finally:
                    response.close()
            finally:
                self._part(address)
                self._leave(turn)
            url = redirect_target(url, location, seen, self._policy.max_redirects if gated else max_redirects)
            if gated and self._hops is not None:  # the target's host counts too
                self._hops.enter(url, deadline)
            turn = self._enter(url) if gated else None

    def _reach(self, url: str, deadline: float) -> str | None:
        """With max_per_ip: resolve the host of ``url`` once (through the DNS cache), hold a fleet slot of its first
        allowed address and pin the request's connection to it; return that address."""
        if self._hops is None or self._hops.ips is None:
            return None
        check_url(url, deadline, self._policy)
        parsed = parse_url(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        address = str(ipaddress.ip_address(self._guard.addresses(parsed.host or "", port)[0]))
        self._hops.reach(address, deadline)
        PINNED.value = (bare_host(parsed.host or ""), address)
        return address

    def _part(self, address: str | None) -> None:
        """The request to ``address`` ended: unpin, and give its slot back."""
        if address is not None and self._hops is not None:
            PINNED.value = None
            self._hops.part(address)

    def _enter(self, url: str) -> Turn | None:
        return self._robots.enter(url, self.fetch_robots) if self._robots is not None else None

    def _leave(self, turn: Turn | None) -> None:
        if self._robots is not None:
            self._robots.leave(turn)

    def _send(self, url: str, deadline: float) -> requests.Response:
        """Send one GET without following redirects; the response body is left unread."""
        check_url(url, deadline, self._policy)
        remaining = deadline - time.monotonic()
        request = _prepare(url, self._session.headers)
        timeout = (min(self._policy.connect_timeout, remaining), min(self._policy.read_timeout, remaining))
        adapter = self._session.get_adapter(request.url)
        return adapter.send(request, stream=True, timeout=timeout, verify=True, cert=None, proxies={})

    def _image(self, response: requests.Response, url: str, body: Body) -> Fetched:
        """Turn a final response into a Fetched: check status, opt-out and size, then read and identify the body."""
        try:
            check_final(response.status_code, response.reason, response.headers, self._policy)
        except FetchFailure:
            self._drain(response, body.deadline)
            raise
        _read_body(response.raw, body, self._budget)
        return body.image(url)

    def _robots_text(self, response: requests.Response, url: str, deadline: float) -> Fetched:
        """A final response to a robots.txt request: its status, or the first ROBOTS_BYTES bytes of its body."""
        if response.status_code >= 300:
            self._drain(response, deadline)
            return Fetched(None, None, response.status_code, f"HTTP {response.status_code}", final_url=url)
        text = RobotsText(deadline)
        decoder = Decoder(response.raw.headers.get("content-encoding", ""))
        while data := response.raw.read1(CHUNK, decode_content=False):
            if not all(text.add(chunk) for chunk in decoder.decode(data)):
                return text.fetched(url)
        decoder.finish()
        return text.fetched(url)

    def _drain(self, response: requests.Response, deadline: float) -> None:
        """Read a small unwanted body so that its connection can be reused; anything else is left to close()."""
        length = drain_length(response.headers)
        if length is None:
            return
        download_deadline = DEADLINE.value
        DEADLINE.value = min(deadline, time.monotonic() + DRAIN_SECONDS)
        try:
            with contextlib.suppress(FetchFailure, *_EXPECTED_ERRORS):
                _read_body(response.raw, Body(length, DEADLINE.value, image=False), None)
        finally:
            DEADLINE.value = download_deadline

    def release(self, fetched: Fetched) -> None:
        """Give the bytes of a fetched image back to the budget (once the image is stored)."""
        if self._budget is not None and fetched.data is not None:
            self._budget.give(len(fetched.data))


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


def _read_body(raw: HTTPResponse, body: Body, budget: ByteBudget | None) -> None:
    """Read and decode the body into ``body`` chunk by chunk (each socket read is also capped by the deadline in the
    connection layer, so a trickle cannot outlive it), reserving each chunk in ``budget`` first. Decoding is the
    fetchpolicy's, as in the async engine: bounded steps, and a compressed body cut short is ``truncated``."""
    decoder = Decoder(raw.headers.get("content-encoding", ""))
    while data := raw.read1(CHUNK, decode_content=False):
        for chunk in decoder.decode(data):
            if budget is not None:
                began = time.monotonic()
                granted = budget.take(len(chunk), body.reserved, body.deadline)
                body.waited += time.monotonic() - began
                if not granted:
                    raise FetchFailure(GAVE_WAY, BUDGET_MESSAGE)  # it gave way, or waited until its deadline
                body.reserved += len(chunk)
            body.add(chunk)
    decoder.finish()


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
        (TRUNCATED, _TRUNCATED_ERRORS),
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
    return one_line(f"{type(subject).__name__}: {subject}" if str(subject) else type(subject).__name__, url)
