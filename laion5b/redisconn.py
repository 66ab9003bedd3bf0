"""Connecting to Redis, and riding out its outages with logged retries and backoff."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from laion5b.config import Config

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError)
"""Errors that a wait can cure: Redis restarting, the network dropping, Redis full until something drains."""
FATAL = (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError)
"""Errors no wait cures: they are configuration mistakes."""
MAX_BACKOFF = 30.0


def connect(config: Config, timeout: float = 30.0, encoding_errors: str = "strict") -> redis.Redis:
    """A client for the configured Redis, waiting at most ``timeout`` seconds for an answer; connects lazily.
    ``encoding_errors="surrogateescape"`` reads values that are not UTF-8 as text that writes back as the same bytes
    (a worker must be able to claim, record and remove any queued entry)."""
    return redis.Redis(
        **client_options(config, timeout),
        decode_responses=True,
        encoding_errors=encoding_errors,
        retry=Retry(NoBackoff(), 0),
    )


def client_options(config: Config, timeout: float) -> dict[str, Any]:
    """Where the configured Redis is and how long to wait for it: the options any client of it (blocking or
    redis.asyncio) is made with."""
    return {
        "host": config.redis_ip,
        "port": config.redis_port,
        "db": config.redis_db,
        "password": config.redis_pass or None,
        "ssl": config.redis_tls,
        "ssl_ca_certs": config.redis_tls_ca or None,
        "socket_timeout": timeout,
        "socket_connect_timeout": min(timeout, 5.0),
        "health_check_interval": 30,
    }


def describe(config: Config) -> str:
    """Where the configured Redis is, for messages; never includes the password."""
    scheme = "rediss" if config.redis_tls else "redis"
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
        except RETRYABLE as error:
            log.warning("redis_unavailable during=%s error=%s retry_in=%.1fs", what, _one_line(error), delay)
            if stop is not None and stop.wait(delay):
                raise
            if stop is None:
                time.sleep(delay)
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
