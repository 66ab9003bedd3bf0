"""One download worker process: python3 downloader.py NAME [--until-empty]

Start several per machine (each with its own NAME); all share the Redis queue set in setting.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

import redis

import setting
from laion5b import cli, redisconn
from laion5b.control import EXIT_DRAINED
from laion5b.leases import IdentityInUse, IdentityLost
from laion5b.limits import OpenFilesTooLow
from laion5b.log import setup
from laion5b.worker import StoreRefused, Worker

log = logging.getLogger("downloader")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="this worker's name, unique on this machine (e.g. 0, 1, 2, ...)")
    parser.add_argument("--until-empty", action="store_true", help="exit once no task remains anywhere")
    parser.add_argument("--debug", action="store_true", help="log every failed task")
    args = parser.parse_args()
    cli.keep_out("pandas")  # pyarrow imports it where installed, at the first index: 45 MB a worker, never used
    config = cli.load_settings(setting)
    setup(f"downloader-{args.name}", config.log_dir, logging.DEBUG if args.debug else logging.INFO)
    stop = threading.Event()
    cli.stop_on_signals(stop)
    client = redisconn.connect(config, encoding_errors="surrogateescape")  # any queued entry is claimed and ended
    try:
        redisconn.retrying(client.ping, "connect", stop)
        redisconn.warn_if_evicting(client)
        worker = Worker(client, config, args.name, stop, until_empty=args.until_empty)
        worker.run()
    except IdentityInUse as error:
        log.error("identity_in_use %s", error)
        return 2
    except StoreRefused as error:
        log.error("store_refused %s", error)
        return 2
    except OpenFilesTooLow as error:
        log.error("open_files_too_low %s", error)
        return 2
    except IdentityLost as error:
        log.error("identity_lost %s", error)
        return 1
    except redis.AuthenticationError as error:
        log.error("redis_auth_failed redis=%s error=%s", redisconn.describe(config), error)
        return 2
    except redis.ConnectionError:
        log.error("stopped while redis was unreachable redis=%s", redisconn.describe(config))
        return 1
    return EXIT_DRAINED if worker.draining else 0


if __name__ == "__main__":
    sys.exit(main())
