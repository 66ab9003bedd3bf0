"""The async engine's event loop: uvloop's (libuv, in C) where it is installed and wanted, else asyncio's own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(wanted: str) -> tuple[str, LoopFactory]:
    """The name of the loop the engine runs (``wanted``, "uvloop" or "asyncio") and the factory that makes it:
    asyncio's, with one log line, when uvloop is wanted but cannot be imported."""
    if wanted == "asyncio":
        return "asyncio", asyncio.new_event_loop
    try:
        import uvloop
    except ImportError as error:
        log.warning("engine_loop_fallback wanted=uvloop reason=%s", str(error).replace("\n", " "))
        return "asyncio", asyncio.new_event_loop
    return "uvloop", uvloop.new_event_loop
