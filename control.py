"""Steer a running download from anywhere that reaches Redis: pause, resume, drain, or show the control state.

Usage: python3 control.py pause | resume | drain | status [--host H] [--worker HOST:NAME] [--json]

pause   workers stop claiming, finish and record what is in flight, return what they had not started, and wait
        (a pause of the whole run also stops add_task.py)
drain   workers finish what they hold, return the rest, retire and exit with code 3 (systemd leaves them down);
        the drain holds: a worker started (or restarted) in its scope exits 3 at once, until resume
resume  lift the pauses and drains of the scope and of everything inside it: paused workers go on, drained ones
        may be started again
status  what is paused or drained, and what each worker acknowledged
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import redis

import setting
from laion5b import cli, control, redisconn
from laion5b.log import setup
from laion5b.tables import table

log = logging.getLogger("control")
QUICK_TIMEOUT = 3.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("pause", "resume", "drain", "status"))
    parser.add_argument("--host", help="only the workers of this host (its host_id)")
    parser.add_argument("--worker", help="only this worker identity, HOST:NAME (or NAME with --host)")
    parser.add_argument("--json", action="store_true", help="status: print it as a JSON object")
    args = parser.parse_args()
    worker = args.worker
    if worker and ":" not in worker:
        if not args.host:
            parser.error("--worker takes HOST:NAME, or NAME together with --host")
        worker = f"{args.host}:{worker}"
    host = None if worker else args.host
    config = cli.load_settings(setting)
    setup("control", config.log_dir)
    client = redisconn.connect(config, timeout=QUICK_TIMEOUT)
    operator = control.Operator(client, config.keys)
    try:
        if args.action == "pause":
            log.info("pause_asked scope=%s", control.scope(operator.pause(host, worker)))
        elif args.action == "drain":
            log.info("drain_asked scope=%s", control.scope(operator.drain(host, worker)))
        elif args.action == "resume":
            lifted = operator.resume(host, worker)
            log.info("resumed lifted=%s", ",".join(lifted) or "none")
        else:
            status = control.read_status(client, config.keys)
            print(json.dumps(status.to_json(), indent=2) if args.json else render(status, time.time()))
    except redis.RedisError as error:
        log.error("redis_unreachable redis=%s error=%s", redisconn.describe(config), " ".join(str(error).split()))
        return cli.EXIT_USAGE
    return 0


def render(status: control.Status, now: float) -> str:
    """The control state as text: requests in force, then one row per acknowledging worker."""
    lines = [
        f"paused: {', '.join(status.paused) or 'nothing'}",
        f"drains asked: {', '.join(status.drains) or 'none'}",
    ]
    if status.acks:
        rows = [
            [identity, str(ack.get("state", "?")), f"{max(0.0, now - float(ack.get('at', now))):.0f} s ago"]
            for identity, ack in status.acks.items()
        ]
        lines += ["", table(["worker", "acknowledged", "since"], rows, right=(2,))]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
