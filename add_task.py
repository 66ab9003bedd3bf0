"""Queue the rows of every URL list file (parquet, CSV, TSV, JSON lines, ...) under parquet_dir as download tasks.

Usage: python3 add_task.py
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import redis

import setting
from laion5b import cli, redisconn
from laion5b.inputs import SourceFile, Spec
from laion5b.log import setup
from laion5b.objectstore import bucket_of
from laion5b.producer import Producer, Progress, show_progress

log = logging.getLogger("add_task")
PLAIN_PROGRESS_EVERY = 10.0


def main() -> int:
    cli.keep_out("pandas")  # pyarrow imports it where installed (a float column's first value): 45 MB, never used
    config = cli.load_settings(setting)
    setup("add_task", config.log_dir)
    bucket = bucket_of(config, config.parquet_dir)
    parquet_dir = config.parquet_dir if bucket is not None else Path(config.parquet_dir)
    if bucket is None and not Path(parquet_dir).is_dir():
        log.error("parquet_dir_missing path=%s", parquet_dir)
        return 1
    client = redisconn.connect(config)
    stop = threading.Event()
    cli.stop_on_signals(stop)
    producer = Producer(
        client=client,
        keys=config.keys,
        parquet_dir=parquet_dir,
        done_path=Path(config.done_path),
        threshold=config.addtask_threshold,
        batch_size=config.addtask_batch,
        spec=Spec.of(config),
        stop=stop,
        on_batch=show_progress if sys.stderr.isatty() else _plain_progress(),
        min_replicas=config.redis_min_replicas,
        bucket=bucket,
    )
    try:
        redisconn.retrying(client.ping, "connect", stop)
        redisconn.warn_if_evicting(client)
        progress = producer.run()
    except redis.AuthenticationError as error:
        log.error("redis_auth_failed redis=%s error=%s", redisconn.describe(config), error)
        return 2
    except redis.ConnectionError:
        log.error("stopped while redis was unreachable")
        return 1
    log.info(
        "producer_exit rows=%d rows_per_s=%.0f failed_files=%d stopped=%s",
        progress.rows,
        progress.rate(),
        len(progress.failed_files),
        stop.is_set(),
    )
    return 1 if progress.failed_files else 0


def _plain_progress():
    """A progress callback that logs one line every few seconds, for output that is not a terminal."""
    last = time.monotonic()

    def report(progress: Progress, source: SourceFile) -> None:
        nonlocal last
        if time.monotonic() - last >= PLAIN_PROGRESS_EVERY:
            last = time.monotonic()
            log.info("progress rows=%d rows_per_s=%.0f file=%s", progress.rows, progress.rate(), source.key)

    return report


if __name__ == "__main__":
    sys.exit(main())
