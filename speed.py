"""Show the download's progress: counters, rates, ETA and one row per host, refreshed until Ctrl-C.

Usage: python3 speed.py [--interval SECONDS] [--once] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading

import redis

import setting
from laion5b import cli, redisconn, stats
from laion5b.config import Config
from laion5b.log import setup

log = logging.getLogger("speed")
QUICK_TIMEOUT = 3.0
"""Seconds speed.py waits for Redis: a view must say at once that Redis is unreachable, not retry."""
CLEAR = "\x1b[H\x1b[2J"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between two refreshes (default 10)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--once", action="store_true", help="print one status view and exit")
    output.add_argument("--json", action="store_true", help="print one snapshot as a JSON object and exit")
    args = parser.parse_args()
    if args.interval <= 0:
        parser.error("--interval must be greater than 0")
    config = cli.load_settings(setting)
    setup("speed", config.log_dir)
    client = redisconn.connect(config, timeout=QUICK_TIMEOUT)
    try:
        first = _snapshot(client, config)
    except redis.AuthenticationError as error:
        log.error("redis_auth_failed redis=%s error=%s", redisconn.describe(config), error)
        return cli.EXIT_USAGE
    except redis.RedisError as error:
        log.error("redis_unreachable redis=%s error=%s", redisconn.describe(config), " ".join(str(error).split()))
        return cli.EXIT_USAGE
    if args.json:
        print(json.dumps(stats.to_json(first), indent=2))
    elif args.once:
        sys.stdout.write(stats.render(first, None, config.min_success_ratio))
    else:
        _live_view(client, config, first, args.interval)
    return 0


def _snapshot(client: redis.Redis, config: Config) -> stats.Snapshot:
    return stats.read_snapshot(client, config.keys, config.heartbeat_ttl, config.monitor_interval)


def _live_view(client: redis.Redis, config: Config, first: stats.Snapshot, interval: float) -> None:
    """Redraw the view every ``interval`` seconds (in place on a terminal) until SIGINT or SIGTERM."""
    stop = threading.Event()
    cli.stop_on_signals(stop)
    terminal = sys.stdout.isatty()
    previous = first
    _show(stats.render(first, None, config.min_success_ratio), terminal)
    while not stop.wait(interval):
        try:
            current = _snapshot(client, config)
        except redis.RedisError as error:
            _show(f"redis unreachable ({' '.join(str(error).split())}); retrying in {interval:g} s\n", terminal)
            continue
        _show(stats.render(current, previous, config.min_success_ratio), terminal)
        previous = current


def _show(text: str, terminal: bool) -> None:
    sys.stdout.write(CLEAR + text if terminal else text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
