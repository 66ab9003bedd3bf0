"""Webdataset bench: the suite's workers writing tar shards against the same workers writing one file per image.

    python3 bench/webdataset.py [--n 40000] [--runs 3] [--modes disk,tmpfs] [--engines threads]
                                [--outputs files,files+sidecars,webdataset] [--shard-size 10000]

A redis-server and a multi-process image server (bench/imgserve.py) on loopback, N URLs of real JPEGs of 10-100 KB
(log-normal, median 30 KB: bench/webserve.py's sizes), then for each mode (disk: a folder on a real disk; tmpfs:
/dev/shm), each engine and each round, in an order that rotates between rounds: add_task.py + W x downloader.py
--until-empty with
  files            output_format=files (one file per image, no caption, no metadata)
  files+sidecars   output_format=files with save_caption and save_metadata (the information a shard holds)
  webdataset       output_format=webdataset, shard_size S (image + .txt + .json per sample, a parquet per shard)
  webdataset-s3    the same to an s3:// store_dir on a local S3 server (moto's server mode, as the tests start it:
                   a Python server, its CPU shown apart), shards staged in the store folder and uploaded; also
                   compared with webdataset
With --web the server is bench/openweb.py's stand-in for the open web instead (thousands of loopback hosts with
the host spread of the LAION sample, latencies, TLS, failures; N URLs), and runs use its timeouts and one try per URL.
Every store is checked (files counted, or the samples of every shard's index) against the images counted in Redis,
removed, and the page cache written back (sync, untimed) before the next run. Prints speed.py's columns per run,
then per round the ratios to files, and their medians. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from openweb import CONNECT_TIMEOUT, READ_TIMEOUT, SAMPLE, WebService
from webserve import SIZE_MEDIAN, SIZE_RANGE, SIZE_SIGMA, build_web, sample_hosts

from speed import (
    HEADER,
    WORK,
    ImageService,
    RedisService,
    Result,
    Setup,
    count_files,
    machine,
    measure,
    row,
    write_url_inputs,
)
from tests.s3_server import S3Server

OUTPUTS = {
    "files": {"LAION_OUTPUT_FORMAT": "files"},
    "files+sidecars": {"LAION_OUTPUT_FORMAT": "files", "LAION_SAVE_CAPTION": "1", "LAION_SAVE_METADATA": "1"},
    "webdataset": {"LAION_OUTPUT_FORMAT": "webdataset"},
    "webdataset-s3": {"LAION_OUTPUT_FORMAT": "webdataset"},
}
S3_OUTPUT = "webdataset-s3"


def image_urls(n: int, port: int, seed: int) -> list[str]:
    """N image URLs whose sizes are log-normal (median 30 KB), clipped to 10-100 KB, fixed by ``seed``."""
    rng = random.Random(seed)
    sizes = (
        min(max(rng.lognormvariate(0.0, SIZE_SIGMA) * SIZE_MEDIAN, SIZE_RANGE[0]), SIZE_RANGE[1]) for _ in range(n)
    )
    return [f"http://127.0.0.1:{port}/img/b{i}.jpg?size={int(size)}" for i, size in enumerate(sizes)]


def check_bucket(s3: S3Server, prefix: str, stored: int) -> tuple[str, int]:
    """``check_store`` of the bucket: samples in the indexes under ``prefix``, then every object there deleted (the
    server keeps them in memory)."""
    client, keys = s3.client(), s3.objects(f"{prefix}/")
    tars = [key for key in keys if key.endswith(".tar")]
    samples = 0
    for tar in tars:
        index = client.get_object(Bucket=s3.bucket, Key=tar[:-4] + ".parquet")["Body"].read()
        samples += pq.read_metadata(pa.BufferReader(index)).num_rows
    for key in keys:
        client.delete_object(Bucket=s3.bucket, Key=key)
    unfinished = len(s3.unfinished_uploads())
    note = f"{samples} samples in shards for {stored} stored; " if samples != stored else ""
    return note + (f"{unfinished} unfinished uploads; " if unfinished else ""), len(tars)


def check_store(output: str, store: Path, stored: int) -> tuple[str, int]:
    """(a note when the store does not hold the ``stored`` images counted in Redis, the number of shards)."""
    settings = OUTPUTS[output]
    if settings["LAION_OUTPUT_FORMAT"] == "files":
        found = count_files(store)[0]
        kinds = ("txt", "json") if settings.get("LAION_SAVE_CAPTION") else ()
        missing = [kind for kind in kinds if count_files(store, f".{kind}")[0] != found]
        note = f"{found} files for {stored} stored; " if found != stored else ""
        return note + "".join(f"{kind} sidecars missing; " for kind in missing), 0
    tars = [path for path in store.rglob("*.tar") if ".tmp" not in path.parts]
    samples = sum(pq.read_metadata(path.with_suffix(".parquet")).num_rows for path in tars)
    return (f"{samples} samples in shards for {stored} stored; " if samples != stored else ""), len(tars)


def run_one(setup: Setup, output: str, engine: str, mode: str, run: int, store: Path, extra: dict[str, str],
            s3: S3Server | None = None) -> Result:  # fmt: skip
    """One measured run of the suite with this output and engine; the store removed and synced afterwards."""
    setup.client_env["suite"] = {**OUTPUTS[output], **extra, "LAION_ENGINE": engine}
    if output == S3_OUTPUT:
        assert s3 is not None
        setup.client_env["suite"].update(s3.environ(store.name), LAION_STAGING_DIR=str(store))
    shutil.rmtree(store, ignore_errors=True)
    try:
        cpu0 = s3.cpu() if s3 is not None else 0.0
        result = measure(setup, "suite", mode, run, store)
        if output == S3_OUTPUT:
            assert s3 is not None
            result.cpu["s3 server"] = s3.cpu() - cpu0
            note, shards = check_bucket(s3, store.name, result.stored)
            note += f"S3 server CPU {result.cpu_ms_per_image('s3 server'):.2f} ms/image; "
        else:
            note, shards = check_store(output, store, result.stored)
    finally:
        shutil.rmtree(store, ignore_errors=True)
        os.sync()  # the next run must not pay for this one's write-back
    result.note += note + (f"{shards} shards; " if shards else "") + f"load {os.getloadavg()[0]:.1f}"
    return result


def ratios(results: list[Result], outputs: list[str], base_output: str = "files") -> list[str]:
    """Per round, each output's images/s and worker CPU per image against ``base_output``'s; then the medians."""
    lines = []
    rounds = sorted({result.run for result in results})
    for other in (name for name in outputs if name != base_output):
        speed, cpu = [], []
        for run in rounds:
            by_output = {output_of(result): result for result in results if result.run == run}
            base, this = by_output.get(base_output), by_output.get(other)
            if base is None or this is None or not base.images_per_s:
                continue
            speed.append(this.images_per_s / base.images_per_s)
            cpu.append(this.cpu_ms_per_image("workers") / base.cpu_ms_per_image("workers"))
        if speed:
            lines.append(
                f"- {other} ÷ {base_output}: images/s median **{statistics.median(speed):.3f}** ({_list(speed)}; "
                f"spread {max(speed) - min(speed):.3f}); worker CPU/image median **{statistics.median(cpu):.3f}** "
                f"({_list(cpu)})"
            )
    return lines


def medians(results: list[Result], outputs: list[str]) -> list[str]:
    lines = ["", "| output | images/s (median) | worker CPU ms/image (median) |", "|---|---|---|"]
    for output in outputs:
        group = [result for result in results if output_of(result) == output]
        rate = statistics.median(result.images_per_s for result in group)
        cpu = statistics.median(result.cpu_ms_per_image("workers") for result in group)
        lines.append(f"| {output} | {rate:.0f} | {cpu:.3f} |")
    return lines


def output_of(result: Result) -> str:
    """The output of a run, the part of its mode after the engine (``<mode>-<engine>-<output>``)."""
    return result.mode.split("-", 2)[2]


def _list(values: list[float]) -> str:
    return ", ".join(f"{value:.3f}" for value in values)


def store_root(mode: str, disk_dir: str) -> Path:
    """The folder a mode's stores go under, after checking it is on the file system the mode names."""
    root = Path(disk_dir) if mode == "disk" else Path("/dev/shm") / f"laion5b-wds-{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True)
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(root)], capture_output=True, text=True).stdout.strip()
    if (kind == "tmpfs") != (mode == "tmpfs"):
        raise SystemExit(f"{root} is on {kind}, not what mode {mode} needs")
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40_000, help="URLs per run (default 40000)")
    parser.add_argument("--runs", type=int, default=3, help="rounds per mode and engine (default 3)")
    parser.add_argument("--modes", default="disk,tmpfs", help="comma-separated: disk, tmpfs (default both)")
    parser.add_argument("--engines", default="threads", help="comma-separated: threads, async (default threads)")
    parser.add_argument("--outputs", default=",".join(OUTPUTS), help=f"comma-separated subset of {list(OUTPUTS)}")
    parser.add_argument("--shard-size", type=int, default=10_000, help="LAION_SHARD_SIZE (default 10000)")
    parser.add_argument("--workers", type=int, default=2, help="downloader.py processes (default 2)")
    parser.add_argument("--threads", type=int, default=32, help="threads, or async concurrency, per process")
    parser.add_argument("--server-procs", type=int, default=2, help="image server processes (default 2)")
    parser.add_argument("--max-bytes", type=int, default=4 * 2**20, help="LAION_MAX_IMAGE_BYTES (default 4 MiB)")
    parser.add_argument("--disk-dir", default=str(WORK / "store"), help="folder for the disk mode (a real disk)")
    parser.add_argument("--seed", type=int, default=5, help="seed of the image sizes")
    parser.add_argument("--profile", action="store_true", help="worker 0 under py-spy (bench/work/profile-*.txt)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' logs (bench/work/webdataset-*)")
    parser.add_argument("--web", action="store_true", help="bench/openweb.py's open-web stand-in as the server")
    args = parser.parse_args()
    outputs = [name for name in args.outputs.split(",") if name]
    unknown = set(outputs) - set(OUTPUTS)
    if unknown or "files" not in outputs:
        parser.error(f"--outputs must name files and a subset of {list(OUTPUTS)}")
    extra = {"LAION_SHARD_SIZE": str(args.shard_size), "LAION_CONCURRENCY": str(args.threads)}
    WORK.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="webdataset-", dir=WORK))
    (temp / "redis").mkdir()
    redis_service = RedisService(temp / "redis")
    if args.web:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        server = WebService(build_web(sample_hosts(SAMPLE), args.n, args.seed), False, temp, args.server_procs)
        extra.update(LAION_TLS_CA_FILE=str(server.ca_file), LAION_MAX_ATTEMPTS="1", LAION_RETRY_BACKOFF="0.5",
                     LAION_CONNECT_TIMEOUT=str(CONNECT_TIMEOUT), LAION_READ_TIMEOUT=str(READ_TIMEOUT))  # fmt: skip
    else:
        server = ImageService(args.server_procs)
    s3 = None
    if S3_OUTPUT in outputs:
        (temp / "s3").mkdir()
        s3 = S3Server(temp / "s3")
        s3.start()
    print(f"command: `python3 bench/webdataset.py {' '.join(sys.argv[1:])}`\n\nmachine: {machine()}\n")
    roots: list[Path] = []
    try:
        if args.web:
            urls = server.urls
            what = "URLs of the open-web stand-in (bench/openweb.py)"
        else:
            urls = image_urls(args.n, server.port, args.seed)
            what = f"images of 10-100 KB (mean {sum(int(u.rsplit('=', 1)[1]) for u in urls) / len(urls) / 1000:.1f} KB)"
        parquet_dir, parquet, tsv = write_url_inputs(temp, urls)
        print(f"N={args.n} {what}, {args.workers} processes x {args.threads} threads/concurrency, shard_size "
              f"{args.shard_size}")  # fmt: skip
        setup = Setup(args.n, args.workers, args.threads, args.max_bytes, False, parquet_dir, parquet, tsv,
                      redis_service, server, None, temp / "logs", args.profile)  # fmt: skip
        for mode in (name for name in args.modes.split(",") if name):
            root = store_root(mode, args.disk_dir)
            roots.append(root)
            for engine in (name for name in args.engines.split(",") if name):
                print(f"\n## {mode} ({root}), engine {engine}\n\n{HEADER}", flush=True)
                results = []
                for run in range(args.runs):
                    shift = run % len(outputs)
                    for output in outputs[shift:] + outputs[:shift]:
                        store = root / f"{output}-{run}"
                        result = run_one(setup, output, engine, f"{mode}-{engine}-{output}", run, store, extra, s3)
                        results.append(result)
                        print(row(result).replace("| suite |", f"| {output} |", 1), flush=True)
                lines = [*medians(results, outputs), "", *ratios(results, outputs)]
                if S3_OUTPUT in outputs and "webdataset" in outputs:
                    lines += ratios(results, ["webdataset", S3_OUTPUT], "webdataset")
                print("\n".join(lines), flush=True)
    finally:
        server.stop()
        redis_service.stop()
        if s3 is not None:
            s3.stop()
        for root in roots:
            if root.is_relative_to("/dev/shm"):
                shutil.rmtree(root, ignore_errors=True)
        if not args.keep_logs:
            shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
