"""Write a status table per input part: one row per input row, in input order, with its outcome and where it is.

Usage: python3 report.py [--subset S] [--part P]
       python3 report.py --manifest [braces|list] [--subset S]

Writes <status_dir>/<subset>/<part>.parquet and prints a short summary of each part. Reads only files: the input
lists, the stored samples and the saved error files; records still in Redis are counted (when Redis answers) so that
they can be saved first with save_error_task.py --until-empty.

With --manifest (webdataset output), writes instead, beside each subset's shards, shards.txt (the finished shards)
and sizes.json (shard -> samples) and prints the shard list for readers: a brace pattern, or with "list" open_clip's
::-joined list.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import redis

import setting
from laion5b import cli, inputs, manifest, redisconn, rowstatus
from laion5b.config import Config
from laion5b.inputs import Spec
from laion5b.log import setup
from laion5b.objectstore import bucket_of
from laion5b.rows import InputError
from laion5b.shardlocator import LOCATORS, ShardLocator

log = logging.getLogger("report")
REDIS_TIMEOUT = 3.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", help="only the parts of this subset (e.g. laion2B-en, or default)")
    parser.add_argument("--part", help="only the parts of this name (e.g. 00000)")
    parser.add_argument(
        "--manifest",
        nargs="?",
        const="braces",
        choices=manifest.FORMS,
        help="write each subset's shards.txt and sizes.json and print its shards (webdataset output)",
    )
    args = parser.parse_args()
    config = cli.load_settings(setting)
    setup("report", config.log_dir)
    if args.manifest:
        return write_manifests(config, args.subset, args.manifest)
    spec = Spec.of(config)
    parquet_bucket = bucket_of(config, config.parquet_dir)
    parquet_dir = config.parquet_dir if parquet_bucket is not None else Path(config.parquet_dir)
    found = inputs.find_files(parquet_dir, spec.input_format, parquet_bucket)
    sources = rowstatus.selected(found, args.subset, args.part)
    if not sources:
        log.error("no_input_parts parquet_dir=%s subset=%s part=%s", config.parquet_dir, args.subset, args.part)
        return 1
    _warn_about_unsaved_records(config)
    errors = rowstatus.saved_errors(Path(config.store_error_dir), {(s.subset, s.part) for s in sources})
    bucket = bucket_of(config)
    if bucket is not None and config.output_format == "webdataset":
        locator = ShardLocator(config.store_dir, bucket)
    else:
        locator = LOCATORS[config.output_format](config.store_dir)
    failed = 0
    for source in sources:
        target = Path(config.status_dir) / source.subset / f"{source.part}.parquet"
        try:
            summary = rowstatus.write_table(source, spec, errors[source.subset, source.part], locator, target)
        except InputError as error:
            log.error("part_failed %s", error)
            failed += 1
            continue
        sys.stdout.write(rowstatus.render(summary, target))
    return 1 if failed else 0


def write_manifests(config: Config, subset: str | None, form: str) -> int:
    """Write the manifest of each subset (or of ``subset``) with finished shards, and print its shard list."""
    if config.output_format != "webdataset":
        log.error("manifest_needs_webdataset output_format=%s: only shards have a manifest", config.output_format)
        return 1
    store = os.path.abspath(config.store_dir)
    written = 0
    for name in [subset] if subset else manifest.subsets(store):
        found = manifest.survey(f"{store}/{name}") if os.path.isdir(f"{store}/{name}") else None
        if not found or not found.sizes:
            log.warning("manifest_no_shards subset=%s folder=%s/%s", name, store, name)
            continue
        manifest.write(found)
        shards = manifest.braces(found) if form == "braces" else manifest.joined(found)
        sys.stdout.write(f"{name}: {len(found.sizes):,} shards, {found.samples:,} samples; wrote {found.folder}/"
                         f"{manifest.SHARDS_FILE} and {manifest.SIZES_FILE}\n{shards}\n")  # fmt: skip
        written += 1
    return 0 if written else 1


def _warn_about_unsaved_records(config: Config) -> None:
    client = redisconn.connect(config, timeout=REDIS_TIMEOUT)
    try:
        unsaved = client.llen(config.keys.error)
    except redis.RedisError as error:
        log.info("redis_not_checked error=%s: error records still in Redis (if any) are not in this report", error)
        return
    if unsaved:
        log.warning("unsaved_error_records count=%d: run save_error_task.py --until-empty first, or these rows show as "
                    "pending", unsaved)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
