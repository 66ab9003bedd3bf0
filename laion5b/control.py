"""Remote control of a run: pause, resume and drain requests kept in Redis, and the workers' acknowledgements.

A request names a scope: the whole run, one host, or one worker identity (``<host>:<name>``). Both are states that
hold until ``resume`` lifts them: a paused worker waits; a drained worker exits with EXIT_DRAINED, and so does every
worker that starts in a drained scope (systemd restarting a drained worker that crashed, a host rebooted).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from laion5b.keys import Keys

log = logging.getLogger(__name__)

PAUSE, DRAIN = "pause", "drain"
RUNNING, PAUSING, PAUSED, DRAINING, DRAINED = "running", "pausing", "paused", "draining", "drained"
"""States a worker acknowledges: pausing / draining until it holds nothing, then paused, or drained as it exits."""
EXIT_DRAINED = 3
"""Exit code of a drained worker; the systemd unit does not restart it (RestartPreventExitStatus=3)."""


def field(action: str, host: str | None = None, worker: str | None = None) -> str:
    """The control hash field of a request for the whole run, a host or a worker identity."""
    if worker:
        return f"{action}:worker:{worker}"
    if host:
        return f"{action}:host:{host}"
    return action


def scope(name: str) -> str:
    """The scope of a control field, for people: ``run``, ``host <host>`` or ``worker <identity>``."""
    _, _, rest = name.partition(":")
    kind, _, target = rest.partition(":")
    return f"{kind} {target}" if target else "run"


def redis_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1_000_000


@dataclass(frozen=True)
class Directive:
    """What the control asks of one worker right now."""

    paused: bool
    drain: bool


def directive(fields: Mapping[str, str], host: str, identity: str) -> Directive:
    """Read the control hash for the worker ``identity`` of ``host``."""
    targets = _targets(host, identity)
    paused = any(field(PAUSE, *target) in fields for target in targets)
    return Directive(paused, any(field(DRAIN, *target) in fields for target in targets))


def _targets(host: str, identity: str) -> tuple[tuple[str | None, str | None], ...]:
    return (None, None), (host, None), (None, identity)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def run_paused(fields: Mapping[str, str]) -> bool:
    """Whether the whole run is paused (the producer then waits too)."""
    return PAUSE in fields


class WorkerControl:
    """One worker's side: read what is asked, acknowledge what it did (only when that changes)."""

    def __init__(self, client: redis.Redis, keys: Keys, host: str, identity: str) -> None:
        self.client = client
        self.keys = keys
        self.host = host
        self.identity = identity
        self.acked: tuple[str, dict[str, str]] | None = None

    def read(self) -> Directive:
        return directive(self.client.hgetall(self.keys.control), self.host, self.identity)

    def ack(self, state: str, detail: Mapping[str, str] | None = None) -> None:
        """Publish the worker's state, with ``detail`` beside it (a store problem: ``store``, ``errno``, ``path``)."""
        acked = (state, dict(detail or {}))
        if acked == self.acked:
            return
        record = json.dumps({"state": state, "at": round(redis_time(self.client), 3), **acked[1]})
        self.client.hset(self.keys.control_acks, self.identity, record)
        self.acked = acked
        log.info("control_ack worker=%s state=%s%s", self.identity, state,
                 "".join(f" {name}={value}" for name, value in acked[1].items()))  # fmt: skip

    def forget(self) -> None:
        """Remove this worker's acknowledgement (it retired without being drained)."""
        self.client.hdel(self.keys.control_acks, self.identity)


@dataclass(frozen=True)
class Status:
    """The control state of the run: requests in force and what each worker acknowledged."""

    requests: dict[str, float]
    acks: dict[str, dict]

    @property
    def paused(self) -> list[str]:
        return sorted(scope(name) for name in self.requests if name.startswith(PAUSE))

    @property
    def drains(self) -> list[str]:
        return sorted(scope(name) for name in self.requests if name.startswith(DRAIN))

    def to_json(self) -> dict:
        return {"paused": self.paused, "drains": self.drains, "requests": self.requests, "acks": self.acks}


def read_status(client: redis.Redis, keys: Keys) -> Status:
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.control)
    pipe.hgetall(keys.control_acks)
    requests, acks = pipe.execute()
    return Status({name: _float(value) for name, value in requests.items()}, _acks(acks))


def _acks(fields: Mapping[str, str]) -> dict[str, dict]:
    acks = {}
    for identity, text in sorted(fields.items()):
        try:
            acks[identity] = json.loads(text)
        except ValueError:
            continue
    return acks


class Operator:
    """The operator's side (control.py): write requests."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def pause(self, host: str | None, worker: str | None) -> str:
        name = field(PAUSE, host, worker)
        self.client.hset(self.keys.control, name, f"{redis_time(self.client):.3f}")
        return name

    def drain(self, host: str | None, worker: str | None) -> str:
        name = field(DRAIN, host, worker)
        self.client.hset(self.keys.control, name, f"{redis_time(self.client):.3f}")
        return name

    def resume(self, host: str | None, worker: str | None) -> list[str]:
        """Lift the pauses and drains of the scope and of everything inside it (the run's: all of them); return
        them."""
        requests = self.client.hkeys(self.keys.control)
        lifted = [name for name in requests if any(_inside(name, action, host, worker) for action in (PAUSE, DRAIN))]
        if lifted:
            self.client.hdel(self.keys.control, *lifted)
        return lifted


def _inside(name: str, action: str, host: str | None, worker: str | None) -> bool:
    if worker:
        return name == field(action, worker=worker)
    if host:
        return name == field(action, host) or name.startswith(field(action, worker=f"{host}:"))
    return name.startswith(action)
