"""Save the error records of Redis to JSON-lines files in store_error_dir; summarize or requeue the saved ones.

Usage: python3 save_error_task.py [--until-empty] [--name NAME]
       python3 save_error_task.py --summary
       python3 save_error_task.py --requeue [--status STATUS ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path

import redis

import setting
from laion5b import cli, errorfiles, errorreport, redisconn
from laion5b.config import Config
from laion5b.errorsaver import NameInUse, Saver
from laion5b.log import setup
from laion5b.requeue import Requeuer, selectors

log = logging.getLogger("save_error_task")
DEFAULT_BATCH = 1000


def main() -> int:
    parser = _parser()
    args = parser.parse_args()
    if args.status and not args.requeue:
        parser.error("--status only goes with --requeue")
    config = cli.load_settings(setting)
    setup("save_error_task", config.log_dir)
    folder = Path(config.store_error_dir)
    if args.summary:
        files = errorfiles.error_files(folder)
        sys.stdout.write(errorreport.render(errorreport.summarize(files), len(files)))
        return 0
    client = redisconn.connect(config)
    stop = threading.Event()
    cli.stop_on_signals(stop)
    try:
        redisconn.retrying(client.ping, "connect", stop)
        redisconn.warn_if_evicting(client)
        return _requeue(client, config, folder, args, stop) if args.requeue else _save(client, config, args, stop)
    except redis.AuthenticationError as error:
        log.error("redis_auth_failed redis=%s error=%s", redisconn.describe(config), error)
        return cli.EXIT_USAGE
    except redisconn.RETRYABLE:
        log.error("stopped while redis was unreachable redis=%s", redisconn.describe(config))
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--until-empty", action="store_true", help="exit 0 once the error list is empty")
    mode.add_argument("--summary", action="store_true", help="print counts by status over the saved files")
    mode.add_argument("--requeue", action="store_true", help="put saved transient failures back on the task queue")
    parser.add_argument("--status", action="append", default=[], help="with --requeue: requeue this status instead "
                        "of the transient ones (repeatable, e.g. --status 404 --status timeout)")  # fmt: skip
    parser.add_argument("--name", default="", help="this saver's name, when several run on one machine")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="records moved and written at once")
    return parser


def _save(client: redis.Redis, config: Config, args: argparse.Namespace, stop: threading.Event) -> int:
    name = f"{config.host_id}:{args.name}" if args.name else config.host_id
    folder, batch = Path(config.store_error_dir), max(1, args.batch)
    saver = Saver(
        client, config.keys, folder, config.host_id, name, batch, stop, min_replicas=config.redis_min_replicas
    )
    try:
        saver.acquire()
    except NameInUse as error:
        log.error("name_in_use %s", error)
        return cli.EXIT_USAGE
    log.info("saver_start name=%s folder=%s", name, config.store_error_dir)
    try:
        tally = saver.run(until_empty=args.until_empty)
    except NameInUse as error:
        log.error("name_lost %s", error)
        return 1
    saver.release()
    log.info("saver_exit name=%s saved=%d skipped_already_saved=%d batches=%d", name, tally.saved, tally.skipped,
             tally.batches)  # fmt: skip
    return 0


def _requeue(client: redis.Redis, config: Config, folder: Path, args: argparse.Namespace, stop: threading.Event) -> int:
    chosen = selectors(args.status)
    requeuer = Requeuer(client, config.keys, config.host_id, config.addtask_threshold, stop)
    try:
        tally = requeuer.run(errorfiles.error_files(folder), chosen)
    except errorfiles.MarksError as error:
        log.error("requeue_marks_unreadable %s", error)
        return 1
    log.info("requeue_done selectors=%s requeued=%d not_tasks=%d files=%d", ",".join(chosen), tally.requeued,
             tally.unusable, tally.files)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
