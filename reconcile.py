"""Compare the store, the error records and the input lists with Redis; repair the differences, or rebuild Redis.

Usage: python3 reconcile.py [check|repair|rebuild] [--subset S] [--part P] [--force]

check (default): prints per subset the rows stored, failed, queued, delayed, held and in open shards, and the
problems (rows stored twice, rows counted but neither stored nor recorded, rows in no state, ...); exit 0 only when
there are none. repair: fixes them without downloading anything stored. rebuild: restores Redis (counters, producer
positions, queue) from the store, the error records and the input lists, queueing transient failures again.
repair and rebuild refuse to run while a worker, add_task.py or save_error_task.py is alive (--force: run anyway).
Exit 2 when nothing was done: the run is alive, or Redis does not answer.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import redis

import setting
from laion5b import cli, inputs, redisconn, rowstatus
from laion5b.log import setup
from laion5b.reconciler import EXIT_NOT_RUN, EXIT_PROBLEMS, alive, reconcile

log = logging.getLogger("reconcile")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="check", choices=("check", "repair", "rebuild"))
    parser.add_argument("--subset", help="only the parts of this subset")
    parser.add_argument("--part", help="only the parts of this name")
    parser.add_argument("--force", action="store_true", help="repair or rebuild while workers or add_task.py run")
    args = parser.parse_args()
    if args.command == "rebuild" and (args.subset or args.part):
        parser.error("rebuild restores the whole run: no --subset or --part")
    config = cli.load_settings(setting)
    setup("reconcile", config.log_dir)
    found = inputs.find_files(Path(config.parquet_dir), config.input_format)
    sources = rowstatus.selected(found, args.subset, args.part)
    if not sources:
        log.error("no_input_parts parquet_dir=%s subset=%s part=%s", config.parquet_dir, args.subset, args.part)
        return EXIT_PROBLEMS
    client = redisconn.connect(config)
    try:
        busy = [] if args.command == "check" or args.force else alive(client, config)
        if busy:
            log.error("run_alive processes=%s: stop them first (or --force)", ",".join(busy))
            return EXIT_NOT_RUN
        whole_run = args.subset is None and args.part is None
        code, text = reconcile(client, config, args.command, sources, whole_run)
    except redis.RedisError as error:
        log.error("redis_unreachable %s error=%s", redisconn.describe(config), " ".join(str(error).split())[:200])
        return EXIT_NOT_RUN
    sys.stdout.write(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
