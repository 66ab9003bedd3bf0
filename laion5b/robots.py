"""robots.txt (RFC 9309) for the whole fleet: each site's file is fetched by one worker, kept in Redis in a compact
form for ``robots_ttl`` and in a small in-process cache in front of it, and every URL (redirect hops included) is
checked against it before it is requested. A site's ``Crawl-delay`` is kept by the whole fleet: one request at a time
to that site, each starting at least the delay after the previous one ended (a reservation in Redis).

Groups are chosen here, by RFC 9309's rule: a token obeys the groups that name it exactly (case-insensitive, all of
them merged), else the ``*`` groups. Protego then matches paths within the chosen groups (longest match, Allow wins
a tie, ``*`` and ``$``, percent-encoding normalised); its own agent matching is looser than the RFC (a group ``img``
would apply to ``img2dataset``), so it is never asked to choose.

``RobotsGate`` serves the threads engine (blocking calls in the download thread); ``AsyncRobotsGate`` serves the async
engine (redis.asyncio on the event loop, never a blocking call there). Both raise ``FetchFailure`` with the task's
outcome: ``robots_disallowed``, ``crawl_delay_too_long``, ``robots_unavailable`` (or the network's own word when the
site did not answer), or ``POSTPONED`` when the task must wait its turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio
from protego import Protego

from laion5b.config import Config
from laion5b.fetchpolicy import GAVE_WAY, POSTPONED, Fetched, FetchFailure
from laion5b.keys import Keys
from laion5b.redisconn import async_client, blocking_client

log = logging.getLogger(__name__)

ROBOTS_BYTES = 500 * 1024
"""Bytes of a robots.txt that are parsed (RFC 9309's minimum); the rest is not read."""
ROBOTS_REDIRECTS = 5
FETCH_WAIT = 2.0
"""Seconds a task waits for the robots.txt another worker is fetching; then it is postponed for as long."""
CRAWL_WAIT = 2.0
"""Longest a task waits in place for its Crawl-delay turn; a turn further away postpones it until then."""
POLL = 0.05
"""First pause between two looks at a robots.txt another worker is fetching (doubled at each look)."""
REDIS_DELAY = 5.0
"""Seconds a task is postponed when Redis did not answer its robots.txt question."""
LOCAL_ENTRIES = 4096
"""Sites whose rules a process keeps in memory (least recently used dropped first)."""
LOCAL_RULES = 32_768
"""Allow and Disallow lines those sites may hold in all: parsed, a line takes about 650 bytes (Protego's patterns and
our copy), so the cache stays under about 25 MB per process whatever the sites' files."""
LOCAL_SECONDS = 600.0
"""Seconds a process trusts its copy of a site's rules before asking Redis again (at most robots_ttl)."""
DISALLOWED = "robots_disallowed"
UNAVAILABLE = "robots_unavailable"
DELAY_TOO_LONG = "crawl_delay_too_long"
UNREACHABLE = frozenset({"timeout", "connection", "dns", "ssl", "truncated", "blocked_address"})
"""Outcomes of a robots.txt request that say the site did not answer: the task gets the same word."""
_COMPRESSED = b"\x00"
_COMPRESS_OVER = 16
_ZDICT = (
    b"-/administrator/\n-/api/\n-/bin/\n-/cache/\n-/cli/\n-/components/\n-/includes/\n-/installation/\n-/language/\n"
    b"-/layouts/\n-/libraries/\n-/logs/\n-/modules/\n-/plugins/\n-/tmp/\n"
    b"+/core/*.css$\n+/core/*.css?\n+/core/*.js$\n+/core/*.js?\n+/core/*.gif\n+/core/*.jpg\n+/core/*.jpeg\n"
    b"+/core/*.png\n+/core/*.svg\n+/profiles/*.css$\n+/profiles/*.css?\n+/profiles/*.js$\n+/profiles/*.js?\n"
    b"+/profiles/*.gif\n+/profiles/*.jpg\n+/profiles/*.jpeg\n+/profiles/*.png\n+/profiles/*.svg\n-/core/\n"
    b"-/profiles/\n-/README.md\n-/web.config\n-/admin/\n-/comment/reply/\n-/filter/tips\n-/node/add/\n-/search/\n"
    b"-/user/register\n-/user/password\n-/user/login\n-/user/logout\n-/media/oembed\n-/*/media/oembed\n"
    b"-/index.php/admin/\n-/index.php/comment/reply/\n-/index.php/user/login\n"
    b"-/config\n-/search\n-/account$\n-/account/\n-/commerce/digital-download/\n-/api/\n+/api/ui-extensions/\n"
    b"-/static/\n-/*?author=*\n-/*&author=*\n-/*?tag=*\n-/*&tag=*\n-/*?month=*\n-/*&month=*\n-/*?view=*\n"
    b"-/*&view=*\n-/*?format=json\n-/*&format=json\n-/*?format=page-context\n-/*&format=page-context\n"
    b"-/*?format=main-content\n-/*&format=main-content\n-/*?format=json-pretty\n-/*&format=json-pretty\n"
    b"-/*?format=ical\n-/*&format=ical\n-/*?reversePaginate=*\n-/*&reversePaginate=*\n"
    b"-/a/downloads/-/*\n-/admin\n-/cart\n-/orders\n-/checkouts/\n-/checkout\n-/carts\n-/account\n"
    b"-/collections/*sort_by*\n-/*/collections/*sort_by*\n-/collections/*+*\n-/collections/*%2B*\n"
    b"-/collections/*%2b*\n-/*/collections/*+*\n-/*/collections/*%2B*\n-/*/collections/*%2b*\n"
    b"-*/collections/*filter*&*filter*\n-/blogs/*+*\n-/blogs/*%2B*\n-/blogs/*%2b*\n-/*/blogs/*+*\n-/*/blogs/*%2B*\n"
    b"-/*/blogs/*%2b*\n-/*?*oseid=*\n-/*preview_theme_id*\n-/*preview_script_id*\n-/policies/\n-/*/policies/\n"
    b"-/*/*?*ls=*&ls=*\n-/*/*?*ls%3D*%3Fls%3D*\n-/*/*?*ls%3d*%3fls%3d*\n-/search\n-/apple-app-site-association\n"
    b"-/.well-known/shopify/monorail\n-/cdn/wpm/*.js\n-/recommendations/products\n-/*/recommendations/products\n"
    b"-/cgi-bin/\n-/wp-login.php\n-/wp-content/plugins/\n-/wp-includes/\n-/feed/\n-/trackback/\n-/?s=\n-/*?\n"
    b"-*?lightbox=\n+/\n-/search\n+/\n-/\n|\n-/wp-admin/\n+/wp-admin/admin-ajax.php"
)
"""Preset dictionary of the compact form's deflate stream: the default rules of common site software (Joomla, Drupal,
Squarespace, Shopify, WordPress, Blogger, Wix), which then take a few bytes. Never change it: values cached with it
would no longer decode (use a new prefix byte for a new one)."""
_TOKEN = re.compile(r"[A-Za-z0-9_*-]+")


@dataclass(frozen=True)
class RobotsSettings:
    """What the fleet honours, from the settings."""

    agents: tuple[str, ...]  # every one of these tokens must be allowed
    ttl: float  # seconds a site's rules are kept in Redis
    max_crawl_delay: float  # a longer Crawl-delay is crawl_delay_too_long
    failure_ttl: float  # seconds a site that did not serve its robots.txt is left alone (its tasks retry later)
    lock_seconds: float  # longest one worker may take to fetch a robots.txt before another may try

    @classmethod
    def of(cls, config: Config) -> RobotsSettings:
        return cls(
            agents=tuple(agent.lower() for agent in config.robots_agents),
            ttl=config.robots_ttl,
            max_crawl_delay=config.max_crawl_delay,
            failure_ttl=max(1.0, min(config.retry_backoff, config.robots_ttl)),
            lock_seconds=config.download_timeout + 5.0,
        )


def origin_of(url: str) -> str | None:
    """The site a URL belongs to for robots.txt: scheme, host and port (omitted when the scheme's default); None when
    it is no http(s) URL."""
    try:
        parts = urlsplit(url.strip())
        scheme, host, port = parts.scheme.lower(), (parts.hostname or "").rstrip("."), parts.port
    except ValueError:
        return None
    if scheme not in ("http", "https") or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    default = 80 if scheme == "http" else 443
    return f"{scheme}://{host}" if port in (None, default) else f"{scheme}://{host}:{port}"


Rule = tuple[bool, str]
"""(allowed, path pattern) of one Allow or Disallow line."""


@dataclass
class _Group:
    agents: set[str]
    rules: list[Rule]
    delays: list[float]


def _groups(text: str) -> list[_Group]:
    """The groups of a robots.txt: user-agent lines followed by rules (RFC 9309, 2.1); other records are ignored."""
    groups: list[_Group] = []
    naming = False  # the last record was a user-agent line: the next one joins the same group
    for line in text.removeprefix("\ufeff").splitlines():
        field, colon, value = line.split("#", 1)[0].partition(":")
        field, value = field.strip().lower(), value.strip()
        if not colon:
            continue
        if field == "user-agent":
            if not naming:
                groups.append(_Group(set(), [], []))
            naming = True
            token = _TOKEN.match(value)
            if token:
                groups[-1].agents.add(token.group().lower())
        elif field in ("allow", "disallow", "crawl-delay"):
            naming = False
            if not groups:
                continue
            if field == "crawl-delay":
                delay = _seconds(value)
                if delay is not None:
                    groups[-1].delays.append(delay)
            elif value:
                groups[-1].rules.append((field == "allow", value))
    return groups


def _seconds(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds < float("inf") else None


@dataclass(frozen=True)
class SiteRules:
    """What a site's robots.txt means for our tokens: rule lists that must all allow a URL, and the Crawl-delay to
    keep (the longest any of our groups asks); or why it could not be read (``failure``: status, message)."""

    groups: tuple[tuple[Rule, ...], ...] = ()
    delay: float | None = None
    failure: tuple[str, str] | None = None

    @cached_property
    def _parsers(self) -> tuple[Protego, ...]:
        return tuple(Protego.parse(_as_robots_txt(rules)) for rules in self.groups)

    @property
    def size(self) -> int:
        """Allow and Disallow lines kept."""
        return sum(len(rules) for rules in self.groups)

    def allows(self, url: str) -> bool:
        return all(parser.can_fetch(url, "*") for parser in self._parsers)


ALLOW_ALL = SiteRules()


def _as_robots_txt(rules: tuple[Rule, ...]) -> str:
    return "User-agent: *\n" + "".join(f"{'Allow' if allowed else 'Disallow'}: {path}\n" for allowed, path in rules)


def site_rules(text: str, agents: tuple[str, ...]) -> SiteRules:
    """Keep what a robots.txt says to ``agents``: for each, the groups naming it exactly, else the ``*`` groups."""
    groups = _groups(text)
    chosen: dict[tuple[Rule, ...], None] = {}
    delays: list[float] = []
    for agent in agents:
        mine = [group for group in groups if agent in group.agents]
        mine = mine or [group for group in groups if "*" in group.agents]
        rules = tuple(rule for group in mine for rule in group.rules)
        if rules:
            chosen[rules] = None
        delays.extend(delay for group in mine for delay in group.delays)
    return SiteRules(tuple(chosen), max(delays) if delays else None)


def answer_rules(fetched: Fetched, agents: tuple[str, ...]) -> SiteRules:
    """The rules a robots.txt request answered, by RFC 9309's failure rules: a body is parsed, 4xx (and too many
    redirects) allow everything, 429 and 5xx disallow for now, and a site that did not answer is unreachable."""
    status = fetched.status
    if status is None and fetched.data is not None:
        return site_rules(bytes(fetched.data).decode("utf-8", "replace"), agents)
    if isinstance(status, int) and (status == 429 or status >= 500):
        return SiteRules(failure=(UNAVAILABLE, f"robots.txt answered HTTP {status}"))
    if status in UNREACHABLE:
        return SiteRules(failure=(str(status), f"{fetched.error_msg} (robots.txt)"))
    return ALLOW_ALL


def encode(rules: SiteRules) -> bytes:
    """The compact form kept in Redis: empty for a site that allows everything; else the delay on a first line and
    each group's rules (``+path`` / ``-path``) after a ``|`` line, deflated with a preset dictionary when shorter;
    ``!status message`` for a site that did not serve its robots.txt."""
    if rules.failure is not None:
        return f"!{rules.failure[0]} {rules.failure[1]}".encode()
    if not rules.groups and rules.delay is None:
        return b""
    lines = ["" if rules.delay is None else f"{rules.delay:g}"]
    for group in rules.groups:
        lines.append("|")
        lines.extend(("+" if allowed else "-") + path for allowed, path in group)
    text = "\n".join(lines).encode()
    if len(text) > _COMPRESS_OVER:
        squeezer = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=_ZDICT)
        packed = _COMPRESSED + squeezer.compress(text) + squeezer.flush()
        if len(packed) < len(text):
            return packed
    return text


def decode(value: bytes) -> SiteRules:
    """The rules of a compact form made by ``encode``."""
    if value.startswith(_COMPRESSED):
        opener = zlib.decompressobj(-15, zdict=_ZDICT)
        value = opener.decompress(value[1:]) + opener.flush()
    text = value.decode()
    if not text:
        return ALLOW_ALL
    if text.startswith("!"):
        status, _, message = text[1:].partition(" ")
        return SiteRules(failure=(status, message))
    first, *lines = text.split("\n")
    groups: list[list[Rule]] = []
    for line in lines:
        if line == "|":
            groups.append([])
        else:
            groups[-1].append((line[0] == "+", line[1:]))
    return SiteRules(tuple(tuple(group) for group in groups), float(first) if first else None)


def judge(rules: SiteRules, url: str, origin: str, settings: RobotsSettings) -> float:
    """The Crawl-delay (seconds, 0 for none) to keep before fetching ``url``; raise FetchFailure when it may not be
    fetched now or ever."""
    if rules.failure is not None:
        raise FetchFailure(rules.failure[0], rules.failure[1])
    if not rules.allows(url):
        raise FetchFailure(DISALLOWED, f"robots.txt of {origin} disallows this URL for {', '.join(settings.agents)}")
    delay = rules.delay or 0.0
    if delay > settings.max_crawl_delay:
        raise FetchFailure(DELAY_TOO_LONG, f"{origin} asks a Crawl-delay of {delay:g} s > {settings.max_crawl_delay:g}")
    return delay


class LocalRules:
    """The rules of recently used sites in this process: at most ``entries`` sites holding at most ``rules`` Allow and
    Disallow lines in all (the least recently used go first), each trusted ``seconds`` at most. Thread-safe."""

    def __init__(self, entries: int = LOCAL_ENTRIES, rules: int = LOCAL_RULES) -> None:
        self.entries = entries
        self.rules = rules
        self.held = 0  # rules held in all
        self._sites: OrderedDict[str, tuple[float, SiteRules]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, origin: str) -> SiteRules | None:
        with self._lock:
            entry = self._sites.get(origin)
            if entry is None:
                return None
            if entry[0] <= time.monotonic():
                self._drop(origin)
                return None
            self._sites.move_to_end(origin)
            return entry[1]

    def put(self, origin: str, rules: SiteRules, seconds: float) -> None:
        with self._lock:
            if origin in self._sites:
                self._drop(origin)
            self._sites[origin] = (time.monotonic() + seconds, rules)
            self.held += rules.size
            while len(self._sites) > self.entries or self.held > self.rules:
                self._drop(next(iter(self._sites)))

    def __len__(self) -> int:
        return len(self._sites)

    def _drop(self, origin: str) -> None:
        self.held -= self._sites.pop(origin)[1].size


# KEYS: rules, lock. ARGV: lock ms, lock token. Returns {1, rules} when cached, else {2, ''} when this caller took the
# lock (it fetches the robots.txt), else {0, ''} (another worker is fetching it).
_LOOKUP = """
local value = redis.call('GET', KEYS[1])
if value then return {1, value} end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[1]) then return {2, ''} end
return {0, ''}
"""

# KEYS: rules, lock, crawl. ARGV: rules, ttl ms, lock token, Crawl-delay ms (0: none). Caches the rules, frees the
# lock if still ours, and counts the robots.txt request itself as the site's last request for its Crawl-delay.
_STORE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
local delay = tonumber(ARGV[4])
if delay > 0 then
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local next = math.max(tonumber(redis.call('HGET', KEYS[3], 'next')) or 0, now + delay)
  redis.call('HSET', KEYS[3], 'next', next)
  redis.call('PEXPIRE', KEYS[3], next - now + 60000)
end
return 1
"""

# KEYS: lock. ARGV: lock token. Frees the lock of a fetch that gave way without an answer.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: crawl (hash: next = earliest next start, until = end of the lease of the request in flight, holder = its
# token, tail = the turn given to the last postponed task; all Redis-clock ms). ARGV: delay ms, in-place wait ms,
# lease ms, token. Returns {1, wait}: the turn is the caller's, to start after ``wait`` ms; {0, wait}: a request is
# in flight, ask again after ``wait`` (half the delay, at least 100 ms); {-1, wait}: postponed, come back after
# ``wait`` (each postponed task is given a turn of its own, one delay after the previous one, so that they do not all
# come back at once).
_CRAWL_ENTER = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'next', 'until', 'tail')
local delay, limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local busy = (tonumber(state[2]) or 0) > now
local start = math.max(now, tonumber(state[1]) or 0)
if busy then start = math.max(start, now + delay) end
local result
if start - now > limit then
  local turn = math.max(start, tonumber(state[3]) or 0)
  redis.call('HSET', KEYS[1], 'tail', turn + delay)
  result = {-1, turn - now}
elseif busy then
  result = {0, math.max(100, math.floor(delay / 2))}
else
  redis.call('HSET', KEYS[1], 'next', start + delay, 'until', start + lease, 'holder', ARGV[4])
  result = {1, start - now}
end
local last = math.max(start + lease, tonumber(redis.call('HGET', KEYS[1], 'tail')) or 0)
redis.call('PEXPIRE', KEYS[1], last - now + 60000)
return result
"""

# KEYS: crawl. ARGV: token, delay ms. The request of this turn ended: the next may start ``delay`` after now.
_CRAWL_LEAVE = """
if redis.call('HGET', KEYS[1], 'holder') ~= ARGV[1] then return 0 end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('HSET', KEYS[1], 'next', now + tonumber(ARGV[2]))
redis.call('HDEL', KEYS[1], 'holder', 'until')
return 1
"""


@dataclass(frozen=True)
class Turn:
    """A request's Crawl-delay turn, to give back once it ended."""

    key: str
    token: str
    delay_ms: int


class _Gate:
    """What both gates share: settings, keys, the local cache and the decisions."""

    def __init__(self, settings: RobotsSettings, keys: Keys) -> None:
        self.settings = settings
        self.keys = keys
        self.local = LocalRules()
        self.token = secrets.token_hex(8)

    def _learn(self, origin: str, rules: SiteRules) -> SiteRules:
        seconds = self.settings.failure_ttl if rules.failure else min(LOCAL_SECONDS, self.settings.ttl)
        self.local.put(origin, rules, seconds)
        return rules

    def _known(self, origin: str) -> SiteRules:
        """The rules another download of this process just learned, else postponed (it is still asking)."""
        rules = self.local.get(origin)
        if rules is None:
            raise _fetched_elsewhere(origin)
        return rules

    def _store_args(self, rules: SiteRules) -> list[Any]:
        seconds = self.settings.failure_ttl if rules.failure else self.settings.ttl
        delay = rules.delay if rules.delay and rules.delay <= self.settings.max_crawl_delay else 0
        return [encode(rules), int(seconds * 1000), self.token, int(delay * 1000)]

    def _enter_args(self, delay: float) -> list[Any]:
        lease = self.settings.lock_seconds + CRAWL_WAIT
        return [int(delay * 1000), int(CRAWL_WAIT * 1000), int(lease * 1000), secrets.token_hex(8)]

    def _keys(self, origin: str) -> list[str]:
        return [self.keys.robots(origin), self.keys.robots_lock(origin), self.keys.crawl(origin)]


def _log_fetched(origin: str, fetched: Fetched, rules: SiteRules) -> None:
    outcome = rules.failure[0] if rules.failure else "ok"
    log.debug("robots_fetched site=%s status=%s outcome=%s bytes=%d groups=%d crawl_delay=%s", origin,
              fetched.status or 200, outcome, len(fetched.data or b""), len(rules.groups), rules.delay)  # fmt: skip


def _later(granted: int, wait_ms: int, delay: float) -> float:
    """Seconds a task waits for its Crawl-delay turn: the turn it was given, else (a request still in flight after
    the in-place wait) one delay."""
    return wait_ms / 1000 if granted == -1 else delay


def _pauses() -> list[float]:
    """Pauses between looks at a robots.txt another worker is fetching: doubling, FETCH_WAIT in all."""
    pauses: list[float] = []
    pause, total = POLL, 0.0
    while total + pause < FETCH_WAIT:
        pauses.append(pause)
        total += pause
        pause *= 2
    return [*pauses, FETCH_WAIT - total]


def _fetched_elsewhere(origin: str) -> FetchFailure:
    return _postponed(f"robots.txt of {origin} is being fetched by another worker", FETCH_WAIT)


def _postponed(message: str, seconds: float) -> FetchFailure:
    return FetchFailure(POSTPONED, message, seconds)


class RobotsGate(_Gate):
    """The threads engine's gate: blocking Redis calls from the download threads. Thread-safe."""

    def __init__(self, settings: RobotsSettings, client: redis.Redis, keys: Keys) -> None:
        super().__init__(settings, keys)
        self._asking: dict[str, threading.Event] = {}
        self._asking_lock = threading.Lock()
        self._lookup = client.register_script(_LOOKUP)
        self._store = client.register_script(_STORE)
        self._unlock = client.register_script(_UNLOCK)
        self._crawl_enter = client.register_script(_CRAWL_ENTER)
        self._crawl_leave = client.register_script(_CRAWL_LEAVE)

    def enter(self, url: str, fetch: Callable[[str], Fetched]) -> Turn | None:
        """Check ``url`` (fetching its site's robots.txt with ``fetch`` when no worker has it); return its Crawl-delay
        turn, if any, after waiting for it; raise FetchFailure when it may not be fetched now."""
        origin = origin_of(url)
        if origin is None:
            return None
        try:
            delay = judge(self._rules(origin, fetch), url, origin, self.settings)
            return self._turn(origin, delay) if delay else None
        except redis.RedisError as error:
            raise _postponed(f"robots.txt: Redis did not answer: {error}", REDIS_DELAY) from None

    def leave(self, turn: Turn | None) -> None:
        """The request of ``turn`` ended (a lost call only delays the site's next request by the lease)."""
        if turn is not None:
            with contextlib.suppress(redis.RedisError):
                self._crawl_leave(keys=[turn.key], args=[turn.token, turn.delay_ms])

    def _rules(self, origin: str, fetch: Callable[[str], Fetched]) -> SiteRules:
        """The site's rules: from this process's memory, else from Redis, else fetched. Only one thread of the
        process asks Redis about a site at a time; the others wait for its answer."""
        rules = self.local.get(origin)
        if rules is not None:
            return rules
        with self._asking_lock:
            asked = self._asking.get(origin)
            if asked is None:
                self._asking[origin] = threading.Event()
        if asked is not None:
            asked.wait(FETCH_WAIT)
            return self._known(origin)
        try:
            return self._ask(origin, fetch)
        finally:
            with self._asking_lock:
                self._asking.pop(origin).set()

    def _ask(self, origin: str, fetch: Callable[[str], Fetched]) -> SiteRules:
        keys = self._keys(origin)
        pauses = iter(_pauses())
        while True:
            found, value = self._lookup(keys=keys[:2], args=[int(self.settings.lock_seconds * 1000), self.token])
            if found == 1:
                return self._learn(origin, decode(value))
            if found == 2:
                return self._fetch(origin, keys, fetch)
            pause = next(pauses, None)
            if pause is None:
                raise _fetched_elsewhere(origin)
            time.sleep(pause)

    def _fetch(self, origin: str, keys: list[str], fetch: Callable[[str], Fetched]) -> SiteRules:
        fetched = fetch(f"{origin}/robots.txt")
        if fetched.status in (GAVE_WAY, POSTPONED):
            self._unlock(keys=keys[1:2], args=[self.token])
            raise FetchFailure(str(fetched.status), fetched.error_msg, fetched.retry_after)
        rules = answer_rules(fetched, self.settings.agents)
        self._store(keys=keys, args=self._store_args(rules))
        _log_fetched(origin, fetched, rules)
        return self._learn(origin, rules)

    def _turn(self, origin: str, delay: float) -> Turn:
        args = self._enter_args(delay)
        given_up = time.monotonic() + CRAWL_WAIT
        while True:
            granted, wait_ms = self._crawl_enter(keys=[self.keys.crawl(origin)], args=args)
            if granted == 1:
                time.sleep(wait_ms / 1000)
                return Turn(self.keys.crawl(origin), args[3], args[0])
            if granted == -1 or time.monotonic() >= given_up:
                raise _postponed(f"{origin}: waits for its Crawl-delay of {delay:g} s", _later(granted, wait_ms, delay))
            time.sleep(wait_ms / 1000)


class AsyncRobotsGate(_Gate):
    """The async engine's gate: redis.asyncio on the engine's event loop, which it never blocks. Use it on that loop
    only (its client's connections belong to it)."""

    def __init__(self, settings: RobotsSettings, client: redis.asyncio.Redis, keys: Keys) -> None:
        super().__init__(settings, keys)
        self._asking: dict[str, asyncio.Event] = {}
        self.client = client
        self._lookup = client.register_script(_LOOKUP)
        self._store = client.register_script(_STORE)
        self._unlock = client.register_script(_UNLOCK)
        self._crawl_enter = client.register_script(_CRAWL_ENTER)
        self._crawl_leave = client.register_script(_CRAWL_LEAVE)

    async def enter(self, url: str, fetch: Callable[[str], Awaitable[Fetched]]) -> Turn | None:
        """As ``RobotsGate.enter``, awaiting instead of blocking."""
        origin = origin_of(url)
        if origin is None:
            return None
        try:
            delay = judge(await self._rules(origin, fetch), url, origin, self.settings)
            return await self._turn(origin, delay) if delay else None
        except redis.RedisError as error:
            raise _postponed(f"robots.txt: Redis did not answer: {error}", REDIS_DELAY) from None

    async def leave(self, turn: Turn | None) -> None:
        if turn is not None:
            with contextlib.suppress(redis.RedisError):
                await self._crawl_leave(keys=[turn.key], args=[turn.token, turn.delay_ms])

    async def close(self) -> None:
        await self.client.aclose()

    async def _rules(self, origin: str, fetch: Callable[[str], Awaitable[Fetched]]) -> SiteRules:
        """As ``RobotsGate._rules``: one download of the process asks about a site, the others wait for it."""
        rules = self.local.get(origin)
        if rules is not None:
            return rules
        asked = self._asking.get(origin)
        if asked is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asked.wait(), FETCH_WAIT)
            return self._known(origin)
        self._asking[origin] = asyncio.Event()
        try:
            return await self._ask(origin, fetch)
        finally:
            self._asking.pop(origin).set()

    async def _ask(self, origin: str, fetch: Callable[[str], Awaitable[Fetched]]) -> SiteRules:
        keys = self._keys(origin)
        pauses = iter(_pauses())
        while True:
            found, value = await self._lookup(keys=keys[:2], args=[int(self.settings.lock_seconds * 1000), self.token])
            if found == 1:
                return self._learn(origin, decode(value))
            if found == 2:
                return await self._fetch(origin, keys, fetch)
            pause = next(pauses, None)
            if pause is None:
                raise _fetched_elsewhere(origin)
            await asyncio.sleep(pause)

    async def _fetch(self, origin: str, keys: list[str], fetch: Callable[[str], Awaitable[Fetched]]) -> SiteRules:
        fetched = await fetch(f"{origin}/robots.txt")
        if fetched.status in (GAVE_WAY, POSTPONED):
            await self._unlock(keys=keys[1:2], args=[self.token])
            raise FetchFailure(str(fetched.status), fetched.error_msg, fetched.retry_after)
        rules = answer_rules(fetched, self.settings.agents)
        await self._store(keys=keys, args=self._store_args(rules))
        _log_fetched(origin, fetched, rules)
        return self._learn(origin, rules)

    async def _turn(self, origin: str, delay: float) -> Turn:
        args = self._enter_args(delay)
        given_up = time.monotonic() + CRAWL_WAIT
        while True:
            granted, wait_ms = await self._crawl_enter(keys=[self.keys.crawl(origin)], args=args)
            if granted == 1:
                await asyncio.sleep(wait_ms / 1000)
                return Turn(self.keys.crawl(origin), args[3], args[0])
            if granted == -1 or time.monotonic() >= given_up:
                raise _postponed(f"{origin}: waits for its Crawl-delay of {delay:g} s", _later(granted, wait_ms, delay))
            await asyncio.sleep(wait_ms / 1000)


def robots_gate(config: Config) -> RobotsGate | None:
    """The threads engine's gate when ``robots`` is on, with a Redis client of its own (values are bytes; no retries
    inside the client: a task whose question Redis does not answer is postponed at once)."""
    if not config.robots:
        return None
    client = blocking_client(config, 5.0, decode_responses=False)
    return RobotsGate(RobotsSettings.of(config), client, config.keys)


def async_robots_gate(config: Config) -> AsyncRobotsGate | None:
    """The async engine's gate when ``robots`` is on; its client connects on first use, from the engine's loop."""
    if not config.robots:
        return None
    client = async_client(config, 5.0, decode_responses=False)
    return AsyncRobotsGate(RobotsSettings.of(config), client, config.keys)


class RobotsText:
    """The first ROBOTS_BYTES bytes of a robots.txt as they arrive, by the request's deadline."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.data = bytearray()

    def add(self, chunk: bytes) -> bool:
        """Keep what fits of a decoded chunk; False once ROBOTS_BYTES are kept (read no more)."""
        if time.monotonic() >= self.deadline:
            raise FetchFailure("timeout", f"robots.txt not complete by the deadline ({len(self.data)} bytes read)")
        self.data += chunk[: ROBOTS_BYTES - len(self.data)]
        return len(self.data) < ROBOTS_BYTES

    def fetched(self, url: str) -> Fetched:
        return Fetched(self.data, None, None, final_url=url)
