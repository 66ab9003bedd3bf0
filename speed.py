"""Show the download's progress: counters, rates, ETA and one row per host, refreshed until Ctrl-C.

Usage: python3 speed.py [--interval SECONDS] [--once] [--json]
       python3 speed.py --history [--since 6h]          the history kept in Redis, one row per host
       python3 speed.py --serve [--listen HOST:PORT]    the dashboard: /, /api/status, /metrics
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading

import redis

import setting
from laion5b import cli, dashboard, history, redisconn, stats
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
    output.add_argument("--history", action="store_true", help="print the history kept in Redis and exit")
    output.add_argument("--serve", action="store_true", help="serve the dashboard, /api/status and /metrics")
    parser.add_argument("--since", default="6h", help="--history: how far back (90s, 30m, 6h, 2d; default 6h)")
    parser.add_argument("--listen", default=dashboard.DEFAULT_LISTEN, help="--serve: HOST:PORT (default %(default)s)")
    args = parser.parse_args()
    if args.interval <= 0:
        parser.error("--interval must be greater than 0")
    try:
        since = history.parse_duration(args.since)
    except ValueError:
        parser.error("--since takes a duration such as 90s, 30m, 6h or 2d")
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
    if args.serve:
        return _serve(client, config, args.listen)
    if args.history:
        scopes = history.History(client, config.keys, config.history_days)
        samples = scopes.read([history.RUN, *scopes.hosts()], since, first.at)
        sys.stdout.write(history.render(samples, since, first.at))
    elif args.json:
        print(json.dumps(stats.to_json(first), indent=2))
    elif args.once:
        sys.stdout.write(stats.render(first, None, config.min_success_ratio))
    else:
        _live_view(client, config, first, args.interval)
    return 0


def _snapshot(client: redis.Redis, config: Config) -> stats.Snapshot:
    return stats.read_snapshot(client, config.keys, config.heartbeat_ttl, config.monitor_interval)


def _serve(client: redis.Redis, config: Config, listen: str) -> int:
    """Serve the dashboard until SIGINT or SIGTERM; exit 2 when it may not listen where asked."""
    source = dashboard.Source(
        client, lambda: _snapshot(client, config), history.History(client, config.keys, config.history_days)
    )
    try:
        server = dashboard.make_server(listen, config.dashboard_token, source)
    except (dashboard.ListenError, OSError) as error:
        log.error("dashboard_refused listen=%s error=%s", listen, error)
        return cli.EXIT_USAGE
    stop = threading.Event()
    cli.stop_on_signals(stop)
    dashboard.serve(server, stop)
    return 0


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
