"""When a transient failure is tried again: the server's Retry-After, else an exponential backoff.

Plain functions of plain values, shared by every download engine (no HTTP library here).
"""

from __future__ import annotations

import re
import time
from datetime import UTC
from email.utils import parsedate_to_datetime

RETRY_AFTER_CODES = frozenset({429, 503})
"""Statuses whose Retry-After header is honoured."""
_SECONDS = re.compile(r"[+-]?\d{1,20}")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After value asks to wait: whole seconds or an HTTP date (from ``now``, Unix time; default the
    current time); None when absent or unreadable; 0 for a negative wait or a date already past."""
    if value is None:
        return None
    text = value.strip()
    if _SECONDS.fullmatch(text):
        return float(max(0, int(text)))
    try:
        when = parsedate_to_datetime(text)
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC by RFC 5322
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_after_of(status: int, value: str | None, now: float | None = None) -> float | None:
    """The wait a final response asks for: its Retry-After when ``status`` is 429 or 503, else None."""
    return parse_retry_after(value, now) if status in RETRY_AFTER_CODES else None


def retry_delay(attempts: int, retry_after: float | None, backoff: float, cap: float) -> float:
    """Seconds before the next try of a task that has failed ``attempts`` times (1 after its first failure): the
    server's ``retry_after``, else ``backoff`` x 2^(attempts - 1), capped at ``cap``."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), cap)
    return min(backoff * 2.0 ** min(max(attempts - 1, 0), 64), cap)
