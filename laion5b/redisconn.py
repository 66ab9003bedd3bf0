"""Connecting to Redis (directly, or to the master that Sentinel names), and riding out its outages and failovers with
logged retries and backoff."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from laion5b.config import Config, sentinel_address
from laion5b.replicas import NotReplicated

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError)
"""Errors that a wait can cure: Redis restarting, the network dropping, Redis full until something drains, a master
failing over (a demoted master's READONLY is a ConnectionError of the Sentinel client), replicas lagging."""
NO_REPLICAS = "NOREPLICAS"
"""The start of the error of a master that refuses writes while it has fewer replicas than its
``min-replicas-to-write``: waited for as well."""
FATAL = (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError)
"""Errors no wait cures: they are configuration mistakes."""
MAX_BACKOFF = 30.0
FAILOVER_POLL = 1.0
"""Longest wait between two tries while the sentinels know no master (a failover is under way: asking them is cheap,
and the run goes on as soon as they name the promoted replica) or replicas do not confirm writes (each try waits
for them already)."""


def connect(config: Config, timeout: float = 30.0, encoding_errors: str = "strict") -> redis.Redis:
    """A client for the configured Redis, waiting at most ``timeout`` seconds for an answer; connects lazily.
    ``encoding_errors="surrogateescape"`` reads values that are not UTF-8 as text that writes back as the same bytes
    (a worker must be able to claim, record and remove any queued entry). With ``redis_sentinels`` the client asks
    the sentinels where the master is on every new connection, so it follows a failover (see ``retrying``)."""
    return blocking_client(config, timeout, decode_responses=True, encoding_errors=encoding_errors)


def blocking_client(config: Config, timeout: float, **options: Any) -> redis.Redis:
    """A client of the configured Redis (directly, or the master Sentinel names) that never retries inside a call."""
    options = {**_options(config, timeout), "retry": Retry(NoBackoff(), 0), **options}
    if not config.redis_sentinels:
        return redis.Redis(host=config.redis_ip, port=config.redis_port, **options)
    sentinels = Sentinel(_sentinels(config), sentinel_kwargs=_asking(config, timeout))
    return sentinels.master_for(config.redis_master_name, **options)


def async_client(config: Config, timeout: float, **options: Any) -> redis.asyncio.Redis:
    """The same for an event loop (redis.asyncio); it connects on first use, from the loop that uses it."""
    options = {**_options(config, timeout), "retry": AsyncRetry(NoBackoff(), 0), **options}
    if not config.redis_sentinels:
        return redis.asyncio.Redis(host=config.redis_ip, port=config.redis_port, **options)
    sentinels = AsyncSentinel(_sentinels(config), sentinel_kwargs=_asking(config, timeout))
    return sentinels.master_for(config.redis_master_name, **options)


def _security(config: Config) -> dict[str, Any]:
    """Password and TLS: the same for the master and the sentinels."""
    security: dict[str, Any] = {"password": config.redis_pass or None}
    if config.redis_tls:
        security.update(ssl=True, ssl_ca_certs=config.redis_tls_ca or None)
    return security


def _options(config: Config, timeout: float) -> dict[str, Any]:
    return {
        "db": config.redis_db,
        "socket_timeout": timeout,
        "socket_connect_timeout": min(timeout, 5.0),
        "health_check_interval": 30,
        **_security(config),
    }


def _sentinels(config: Config) -> list[tuple[str, int]]:
    return [address for address in map(sentinel_address, config.redis_sentinels) if address is not None]


def _asking(config: Config, timeout: float) -> dict[str, Any]:
    """Options of the connections to the sentinels themselves."""
    return {"socket_timeout": min(timeout, 5.0), "socket_connect_timeout": min(timeout, 5.0), **_security(config)}


def describe(config: Config) -> str:
    """Where the configured Redis is, for messages; never includes the password."""
    scheme = "rediss" if config.redis_tls else "redis"
    if config.redis_sentinels:
        return f"{scheme}+sentinel://{','.join(config.redis_sentinels)}/{config.redis_master_name}/{config.redis_db}"
    return f"{scheme}://{config.redis_ip}:{config.redis_port}/{config.redis_db}"


def retrying(call: Callable[[], T], what: str, stop: threading.Event | None = None) -> T:
    """Run ``call`` until it succeeds, waiting with exponential backoff while Redis is unreachable or full.

    Authentication failures are raised at once. When ``stop`` is set during a wait, the last error is raised.
    """
    delay = 0.5
    while True:
        try:
            return call()
        except FATAL:
            raise
        except (*RETRYABLE, redis.ResponseError) as error:
            if isinstance(error, redis.ResponseError) and not str(error).startswith(NO_REPLICAS):
                raise
            wait = min(delay, FAILOVER_POLL) if isinstance(error, (MasterNotFoundError, NotReplicated)) else delay
            log.warning("redis_unavailable during=%s error=%s retry_in=%.1fs", what, _one_line(error), wait)
            if stop is not None and stop.wait(wait):
                raise
            if stop is None:
                time.sleep(wait)
            delay = min(delay * 2, MAX_BACKOFF)


def warn_if_evicting(client: redis.Redis) -> None:
    """Log a warning when Redis may evict keys: eviction would silently delete queued tasks."""
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy", "")
    except redis.ResponseError:
        return
    if policy and policy != "noeviction":
        log.warning("redis_eviction policy=%s: set maxmemory-policy noeviction or tasks may be lost", policy)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__
