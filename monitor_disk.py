"""Publish this machine's disk usage (and CPU, memory, network, live downloaders) to Redis every monitor_interval.

Usage: python3 monitor_disk.py [--once]
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path

import redis

import setting
from laion5b import cli, redisconn
from laion5b.history import Historian, History
from laion5b.log import setup
from laion5b.monitor import WARM_UP, Monitor, Sampler

log = logging.getLogger("monitor_disk")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="publish one sample and exit")
    args = parser.parse_args()
    config = cli.load_settings(setting)
    setup("monitor_disk", config.log_dir)
    if not Path(config.monitor_disk).exists():
        log.error("monitor_disk_missing path=%s: set monitor_disk to the download disk's path", config.monitor_disk)
        return cli.EXIT_USAGE
    client = redisconn.connect(config)
    stop = threading.Event()
    cli.stop_on_signals(stop)
    history = History(client, config.keys, config.history_days)
    historian = Historian(history, config.host_id, config.heartbeat_ttl, config.monitor_interval)
    monitor = Monitor(client, config.keys, config.host_id, Sampler(config.monitor_disk), config.monitor_interval,
                      historian.record)  # fmt: skip
    try:
        if args.once:
            stop.wait(WARM_UP)
            monitor.publish_once()
        else:
            log.info("monitor_start host=%s path=%s every=%ds", config.host_id, config.monitor_disk,
                     config.monitor_interval)  # fmt: skip
            monitor.run(stop)
            log.info("monitor_exit host=%s", config.host_id)
    except redis.AuthenticationError as error:
        log.error("redis_auth_failed redis=%s error=%s", redisconn.describe(config), error)
        return cli.EXIT_USAGE
    except redisconn.RETRYABLE as error:
        log.error("redis_unreachable redis=%s error=%s", redisconn.describe(config), error)
        return 1
    except OSError as error:
        log.error("disk_unmeasurable path=%s error=%s", config.monitor_disk, error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
