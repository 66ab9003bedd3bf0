"""Durable writes (``redis_min_replicas``): a Lua script's writes are held by that many replicas before its caller
goes on (a shard's rename, the next producer batch, a download).

The script and ``WAIT`` (``WAITAOF`` where the server has it and keeps an AOF) go in one pipeline on one connection:
one round trip per call, whatever the batch holds. When fewer replicas confirm in time, NotReplicated is raised and
the caller's retry loop (``redisconn.retrying``) sends the script again: every script given here is safe to repeat,
and a write that the replicas never saw is then either applied again on the promoted replica or found done.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.commands.core import Script

WAITAOF_SINCE = (7, 2)
"""The first Redis version with WAITAOF (Valkey reports a redis_version of 7.2 and up as well)."""
WAIT_MS = 2000
"""Milliseconds a call waits for its replicas before it is sent again."""


class NotReplicated(redis.ConnectionError):
    """Fewer replicas than ``redis_min_replicas`` confirmed a write in time: the write is sent again. A kind of
    ConnectionError: every script waits for it, and stops on it, as for Redis being unreachable."""


class Replicas:
    """Runs scripts whose writes ``count`` replicas must hold before the call returns (0: the script alone)."""

    def __init__(self, count: int, wait_ms: int = WAIT_MS) -> None:
        self.count = count
        self.wait_ms = wait_ms
        self._aof: bool | None = None
        """Whether to wait with WAITAOF (the server has it and keeps an AOF); asked once, on first use."""

    def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The script's reply, once ``count`` replicas hold its writes; NotReplicated when they do not in time."""
        if self.count == 0:
            return script(keys=keys, args=args)
        client = script.registered_client
        if self._aof is None:
            self._aof = _has_waitaof(client)
        for _ in range(2):
            pipe = client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            if self._aof:
                pipe.execute_command("WAITAOF", 1, self.count, self.wait_ms)
            else:
                pipe.wait(self.count, self.wait_ms)
            try:
                reply, confirmed = pipe.execute()
            except redis.exceptions.NoScriptError:  # a promoted replica does not have the scripts loaded
                client.script_load(script.script)
                continue
            held = (confirmed[1] if confirmed[0] >= 1 else 0) if self._aof else confirmed
            if held < self.count:
                raise NotReplicated(f"{held} of {self.count} replicas confirmed the write within {self.wait_ms} ms")
            return reply
        raise redis.exceptions.NoScriptError("script not loaded after SCRIPT LOAD")


def _has_waitaof(client: redis.Redis) -> bool:
    """Whether the server has WAITAOF (Redis 7.2 and later) and an AOF of its own to wait for."""
    version = tuple(int(part) for part in str(client.info("server")["redis_version"]).split(".")[:2])
    return version >= WAITAOF_SINCE and bool(client.info("persistence").get("aof_enabled"))
