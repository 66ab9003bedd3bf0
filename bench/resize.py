"""Resizing bench: the suite's workers against img2dataset, end to end, on generated photos served from loopback.

    python3 bench/resize.py e2e [--n 2000] [--photos 500] [--runs 3] [--workers 2] [--threads 32] [--mode center_crop]
                                [--size 256] [--contenders threads,async,img2dataset]
    python3 bench/resize.py bombs
    python3 bench/resize.py stage [--n 400] [--threads 1,2] [--img2dataset]
    python3 bench/resize.py formats [--per-format 60] [--runs 3]
    python3 bench/resize.py formats-e2e [--n 4000] [--photos 400] [--runs 3] [--workers 2] [--threads 64]

Photos: 500-2,000 pixels a side (80 % JPEG of quality 75-95, 10 % PNG, 10 % WebP; gradients, shapes and grain, so
that they cost what photos cost to decode), generated once into bench/work/resize-corpus-N/.

e2e: a redis-server and a multi-process image server (bench/imgserve.py, serving the photos under /file/) on
loopback, N URLs cycling over the photos, then per run, in an order that rotates between runs: the suite (add_task.py
+ W x downloader.py --until-empty, engine threads with T threads, then engine async with concurrency T) and
img2dataset (W processes x T threads, bench/work/venv of bench/speed.py), both with --resize_mode/--image_size and
their jpg quality 95. Prints images/s, CPU ms per image, peak RSS, the machine's load average at the end (note) and
the workers' heartbeat_gap_max, then medians and the ratios to img2dataset taken within each run. Every stored
image of the suite is checked to be size x size.

bombs: in a fresh process, the time and peak-RSS growth of refusing a 1 MB PNG and a 1 MB JPEG that claim 50,000 x
50,000 pixels (center_crop 256), with a control that decodes a 3,000 x 3,000 PNG (it must show, or RSS is blind).

stage: ``process`` alone against img2dataset's ``Resizer`` on the same files, in threads; nothing downloaded.

formats: what one image format per webdataset run costs (``webdataset_keep_format = false``, the default, against
true): ``process`` on one thread with the policy of each, per format, on photos of 200-1,000 pixels a side generated
in each format, weighted by the share of each format among the URLs of the LAION sample (tests/data, by the URL's
extension; URLs without one are left out). Prints CPU ms per image and images/s per core, medians of the runs.

formats-e2e: the same two settings end to end: photos of 200-1,000 pixels a side in the sample's mix of formats,
served from loopback (bench/imgserve.py), N URLs cycling over them, add_task.py + W x downloader.py --until-empty
(async engine, webdataset output on tmpfs), keep_format and the default in turn; images/s and worker CPU per image,
then the medians and the default's ratios to keep_format within each run. Every shard is checked (one image
extension per sample by default).
"""

from __future__ import annotations

import argparse
import bisect
import io
import itertools
import json
import os
import posixpath
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from laion5b.imageformat import image_extension  # noqa: E402
from laion5b.imaging import ProcessPolicy, process  # noqa: E402
from speed import (  # noqa: E402
    HEADER,
    WORK,
    ImageService,
    RedisService,
    Result,
    Setup,
    ensure_venv,
    machine,
    measure,
    row,
    write_url_inputs,
)
from tools.bombs import jpeg_bomb, png_bomb  # noqa: E402

ENGINES = ("threads", "async")

IMG2DATASET_SCRIPT = """
import io, json, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from img2dataset.resizer import Resizer
folder, mode, size, threads = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
images = [path.read_bytes() for path in sorted(folder.iterdir())]
resizer = Resizer(image_size=size, resize_mode=mode, resize_only_if_bigger=False, encode_quality=95)
def one(data):
    return resizer(io.BytesIO(data))[-1] is None
wall, cpu = time.perf_counter(), time.process_time()
with ThreadPoolExecutor(threads) as pool:
    ok = sum(pool.map(one, images))
print(json.dumps({"ok": ok, "seconds": time.perf_counter() - wall, "cpu": time.process_time() - cpu}))
"""


def photo(rng: random.Random, width: int, height: int) -> Image.Image:
    """A picture with smooth areas, edges and grain."""
    channels = []
    for _ in range(3):
        gradient = Image.linear_gradient("L").rotate(rng.randrange(360), expand=True).resize((width, height))
        grain = Image.effect_noise((width, height), rng.uniform(30, 90))
        channels.append(Image.blend(gradient, grain, rng.uniform(0.1, 0.35)))
    image = Image.merge("RGB", channels)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(3, 12)):
        x, y = rng.randrange(width), rng.randrange(height)
        box = (x, y, x + rng.randrange(20, width // 2), y + rng.randrange(20, height // 2))
        draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def corpus(n: int, seed: int = 12) -> Path:
    """The folder of N generated photos, made on first use."""
    folder = WORK / f"resize-corpus-{n}"
    if folder.is_dir() and len(list(folder.iterdir())) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(n):
        image = photo(rng, rng.randrange(500, 2001), rng.randrange(500, 2001))
        kind = rng.random()
        buffer = io.BytesIO()
        if kind < 0.8:
            image.save(buffer, "JPEG", quality=rng.randrange(75, 96))
        elif kind < 0.9:
            image.save(buffer, "PNG", compress_level=6)
        else:
            image.save(buffer, "WEBP", quality=80)
        data = buffer.getvalue()
        (folder / f"{index:05d}.{image_extension(data)}").write_bytes(data)
    return folder


def run_suite(folder: Path, policy: ProcessPolicy, threads: int) -> dict[str, float]:
    return run_images([(path.read_bytes(), path.suffix[1:]) for path in sorted(folder.iterdir())], policy, threads)


def run_images(images: list[tuple[bytes, str]], policy: ProcessPolicy, threads: int) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        statuses = Counter(result.status for result in pool.map(lambda item: process(*item, policy), images))
    return {"ok": statuses[None], "seconds": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def run_img2dataset(python: Path, folder: Path, policy: ProcessPolicy, threads: int) -> dict[str, float]:
    command = [str(python), "-c", IMG2DATASET_SCRIPT, str(folder), policy.resize_mode, str(policy.image_size)]
    output = subprocess.run([*command, str(threads)], capture_output=True, text=True, check=True)
    return json.loads(output.stdout.splitlines()[-1])


def line(name: str, threads: int, n: int, figures: dict[str, float]) -> str:
    rate = n / figures["seconds"]
    cpu_ms = 1000 * figures["cpu"] / n
    ok = int(figures["ok"])
    return f"{name:<12} threads={threads:<2} ok={ok:>5}/{n}  {rate:8.1f} images/s  {cpu_ms:6.2f} CPU ms/image"


# --- one image format per webdataset run ---------------------------------------------------------------------

LAION_SAMPLE = ROOT / "tests" / "data" / "laion_sample_10000.parquet"
URL_FORMATS = {"jpg": "jpg", "jpeg": "jpg", "jpe": "jpg", "png": "png", "webp": "webp", "gif": "gif", "tif": "tiff",
               "tiff": "tiff", "bmp": "bmp"}  # fmt: skip
"""A URL's extension -> the format it names."""
SAVE_AS = {"jpg": ("JPEG", {"quality": 90}), "png": ("PNG", {}), "webp": ("WEBP", {"quality": 80}),
           "gif": ("GIF", {}), "tiff": ("TIFF", {"compression": "tiff_deflate"}), "bmp": ("BMP", {})}  # fmt: skip
KEEP_FORMAT = ProcessPolicy()  # what the pipeline runs with webdataset_keep_format = true: header sizes and hashes
ONE_FORMAT = ProcessPolicy(one_format=True)  # the default: other formats re-encoded to jpg, quality 95


def url_formats(sample: Path) -> tuple[Counter[str], int]:
    """How many of the sample's URLs name each image format by their extension, and how many URLs there are."""
    urls = pq.read_table(sample, columns=["URL"])["URL"].to_pylist()
    found: Counter[str] = Counter()
    for url in urls:
        extension = posixpath.splitext(url.split("?")[0].split("#")[0])[1][1:].lower()
        if extension in URL_FORMATS:
            found[URL_FORMATS[extension]] += 1
    return found, len(urls)


def format_corpus(per_format: int, seed: int = 13) -> dict[str, list[bytes]]:
    """``per_format`` photos of 200-1,000 pixels a side in each format (GIF: an adaptive palette of 256)."""
    rng = random.Random(seed)
    images: dict[str, list[bytes]] = {}
    for extension, (name, options) in SAVE_AS.items():
        for _ in range(per_format):
            image = photo(rng, rng.randrange(200, 1001), rng.randrange(200, 1001))
            if extension == "gif":
                image = image.convert("P", palette=Image.Palette.ADAPTIVE)
            buffer = io.BytesIO()
            image.save(buffer, name, **options)
            images.setdefault(extension, []).append(buffer.getvalue())
    return images


def formats(args: argparse.Namespace) -> int:
    found, urls = url_formats(LAION_SAMPLE)
    named = sum(found.values())
    print(f"command: `python3 bench/resize.py {' '.join(sys.argv[1:])}`\n\nmachine: {machine()}\n")
    print(f"{urls:,} URLs in {LAION_SAMPLE.name}, {named:,} naming an image format by their extension\n")
    corpus_images = format_corpus(args.per_format)
    for extension, images in corpus_images.items():  # load every decoder and encoder before measuring
        run_images([(images[0], extension)], ONE_FORMAT, 1)
    print("| format | share of the sample | KB (mean) | keep_format CPU ms/image | default CPU ms/image | "
          "default images/s per core |\n|---|---|---|---|---|---|")  # fmt: skip
    weighted = {"keep": 0.0, "one": 0.0}
    for extension, images in corpus_images.items():
        cost = {}
        for name, policy in (("keep", KEEP_FORMAT), ("one", ONE_FORMAT)):
            runs = [run_images([(data, extension) for data in images], policy, 1) for _ in range(args.runs)]
            assert all(run["ok"] == len(images) for run in runs), f"{extension}: not every image was stored"
            cost[name] = statistics.median(1000 * run["cpu"] / len(images) for run in runs)
        share = found[extension] / named
        for name in weighted:
            weighted[name] += share * cost[name]
        kilobytes = statistics.mean(len(data) for data in images) / 1000
        print(f"| {extension} | {100 * share:.2f} % | {kilobytes:.0f} | {cost['keep']:.3f} | {cost['one']:.2f} | "
              f"{1000 / cost['one']:.0f} |")  # fmt: skip
    keep, one = weighted["keep"], weighted["one"]
    print(f"| **the sample's mix** | 100 % | | **{keep:.3f}** | **{one:.3f}** | **{1000 / one:.0f}** "
          f"(keep_format: {1000 / keep:.0f}) |")  # fmt: skip
    return 0


def mix_corpus(photos: int, shares: dict[str, float], seed: int = 14) -> Path:
    """The folder of ``photos`` photos of 200-1,000 pixels a side, their formats in ``shares``, made on first use."""
    folder = WORK / f"format-corpus-{photos}"
    if folder.is_dir() and len(list(folder.iterdir())) == photos:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    bounds = list(itertools.accumulate(shares.values()))
    for index in range(photos):
        extension = list(shares)[min(bisect.bisect(bounds, (index + 0.5) / photos), len(bounds) - 1)]
        image = photo(rng, rng.randrange(200, 1001), rng.randrange(200, 1001))
        if extension == "gif":
            image = image.convert("P", palette=Image.Palette.ADAPTIVE)
        name, options = SAVE_AS[extension]
        image.save(folder / f"{index:05d}.{extension}", name, **options)
    return folder


def formats_end_to_end(args: argparse.Namespace) -> int:
    found, _ = url_formats(LAION_SAMPLE)
    shares = {extension: count / sum(found.values()) for extension, count in found.most_common()}
    folder = mix_corpus(args.photos, shares)
    names = sorted(path.name for path in folder.iterdir())
    spread = Counter(name.rpartition(".")[2] for name in names)
    temp = Path(tempfile.mkdtemp(prefix="formats-", dir=WORK))
    (temp / "redis").mkdir()
    redis_service = RedisService(temp / "redis")
    server = ImageService(args.server_procs, folder)
    root = Path("/dev/shm") / f"laion5b-formats-{os.getpid()}"
    print(f"command: `python3 bench/resize.py {' '.join(sys.argv[1:])}`\n\nmachine: {machine()}\n")
    print(f"N={args.n} URLs over {len(names)} photos ({', '.join(f'{k} {v}' for k, v in spread.most_common())}), "
          f"{args.workers} workers x {args.threads} in flight (async engine), webdataset on tmpfs\n")  # fmt: skip
    print("| setting | run | images/s | worker CPU ms/image | stored/failed | shards checked | load |\n"
          "|---|---|---|---|---|---|---|")  # fmt: skip
    variants = {"keep_format": "true", "default": "false"}
    results: dict[tuple[str, int], Result] = {}
    try:
        urls = [f"http://127.0.0.1:{server.port}/file/{names[i % len(names)]}" for i in range(args.n)]
        parquet_dir, parquet, tsv = write_url_inputs(temp, urls)
        setup = Setup(args.n, args.workers, args.threads, 32 * 2**20, False, parquet_dir, parquet, tsv,
                      redis_service, server, None, temp / "logs")  # fmt: skip
        for run in range(args.runs):
            order = list(variants) if run % 2 == 0 else list(reversed(variants))
            for variant in order:
                store = root / f"{variant}-{run}"
                setup.client_env["suite"] = {"LAION_OUTPUT_FORMAT": "webdataset", "LAION_ENGINE": "async",
                                             "LAION_CONCURRENCY": str(args.threads),
                                             "LAION_WEBDATASET_KEEP_FORMAT": variants[variant]}  # fmt: skip
                shutil.rmtree(store, ignore_errors=True)
                try:
                    result = measure(setup, "suite", variant, run, store)
                    note = check_members(store, one_format=variant == "default")
                finally:
                    shutil.rmtree(store, ignore_errors=True)
                results[variant, run] = result
                print(f"| {variant} | {run} | {result.images_per_s:.0f} | {result.cpu_ms_per_image('workers'):.2f} | "
                      f"{result.stored}/{result.failed} | {note} {result.note}| {os.getloadavg()[0]:.1f} |",
                      flush=True)  # fmt: skip
        print(formats_summary(results, args.runs))
    finally:
        server.stop()
        redis_service.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)
    return 0


def check_members(store: Path, one_format: bool) -> str:
    """How many shards were read, and a note when a sample's image member is not .jpg while ``one_format``."""
    tars = [path for path in store.rglob("*.tar") if ".tmp" not in path.parts]
    extensions: Counter[str] = Counter()
    for path in tars:
        with tarfile.open(path) as archive:
            extensions.update(name.partition(".")[2] for name in archive.getnames())
    images = {extension: count for extension, count in extensions.items() if extension not in ("txt", "json")}
    wrong = sum(count for extension, count in images.items() if extension != "jpg") if one_format else 0
    kinds = ", ".join(f"{extension} {count}" for extension, count in sorted(images.items()))
    return f"{len(tars)} ({kinds}){'; NOT ONE FORMAT' if wrong else ''}"


def formats_summary(results: dict[tuple[str, int], Result], runs: int) -> str:
    lines = ["", "| setting | images/s (median) | worker CPU ms/image (median) |", "|---|---|---|"]
    for variant in ("keep_format", "default"):
        group = [results[variant, run] for run in range(runs)]
        rate = statistics.median(result.images_per_s for result in group)
        cpu = statistics.median(result.cpu_ms_per_image("workers") for result in group)
        lines.append(f"| {variant} | {rate:.0f} | {cpu:.2f} |")
    speed = [results["default", run].images_per_s / results["keep_format", run].images_per_s for run in range(runs)]
    cpu = [
        results["default", run].cpu_ms_per_image("workers") / results["keep_format", run].cpu_ms_per_image("workers")
        for run in range(runs)
    ]
    lines.append(f"\n- default ÷ keep_format: images/s median **{statistics.median(speed):.2f}** ({_list(speed)}); "
                 f"worker CPU per image median **{statistics.median(cpu):.2f}** ({_list(cpu)})")  # fmt: skip
    return "\n".join(lines)


# --- end to end -----------------------------------------------------------------------------------------------


def end_to_end(args: argparse.Namespace) -> int:
    python, note = ensure_venv()
    if note or python is None:
        print(f"img2dataset unavailable: {note}")
        return 1
    folder = corpus(args.photos)
    names = sorted(path.name for path in folder.iterdir())
    temp = Path(tempfile.mkdtemp(prefix="resize-", dir=WORK))
    (temp / "redis").mkdir()
    redis_service = RedisService(temp / "redis")
    server = ImageService(args.server_procs, folder)
    root = Path("/dev/shm") / f"laion5b-resize-{os.getpid()}"
    print(f"command: `python3 bench/resize.py {' '.join(sys.argv[1:])}`\n\nmachine: {machine()}\n")
    print(
        f"N={args.n} URLs over {len(names)} photos, {args.workers} processes x {args.threads} threads or coroutines "
        f"each, resize_mode={args.mode} image_size={args.size}, jpg quality 95, stores on tmpfs\n"
    )
    print(HEADER.replace("| note |\n", "| note | heartbeat_gap_max s |\n") + "---|")
    results: list[Result] = []
    gaps: dict[tuple[str, int], float] = {}
    try:
        urls = [f"http://127.0.0.1:{server.port}/file/{names[i % len(names)]}" for i in range(args.n)]
        parquet_dir, parquet, tsv = write_url_inputs(temp, urls)
        setup = Setup(args.n, args.workers, args.threads, args.max_bytes, False, parquet_dir, parquet, tsv,
                      redis_service, server, python, temp / "logs")  # fmt: skip
        setup.resize_args = ["--resize_mode", args.mode, "--image_size", str(args.size)]
        suite_env = {"LAION_RESIZE_MODE": args.mode, "LAION_IMAGE_SIZE": str(args.size),
                     "LAION_CONCURRENCY": str(args.threads)}  # fmt: skip
        contenders = args.contenders.split(",")
        for run in range(args.runs):
            shift = run % len(contenders)
            for name in contenders[shift:] + contenders[:shift]:
                store = root / f"{name}-{run}"
                shutil.rmtree(store, ignore_errors=True)
                try:
                    if name == "img2dataset":
                        result = measure(setup, name, "e2e", run, store)
                    else:
                        setup.client_env["suite"] = {**suite_env, "LAION_ENGINE": name}
                        result = measure(setup, "suite", name, run, store)
                        gaps[name, run] = heartbeat_gap(setup.logs / f"{name}-{run}-suite")
                        result.note += check_sizes(store, args.size)
                finally:
                    shutil.rmtree(store, ignore_errors=True)
                result.note += f"load {os.getloadavg()[0]:.1f}"
                results.append(result)
                shown = row(result).replace("| suite |", f"| {label(result)} |", 1)
                print(f"{shown} {gaps.get((name, run), float('nan')):.2f} |", flush=True)
        print(summary(results, gaps))
    finally:
        server.stop()
        redis_service.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)
    return 0


def heartbeat_gap(logs: Path) -> float:
    """The longest time between two heartbeats of any worker, from their worker_exit lines."""
    found = [
        float(value)
        for path in logs.glob("worker-*.log")
        for value in re.findall(r"worker_exit .* heartbeat_gap_max=([\d.]+)", path.read_text(errors="replace"))
    ]
    return max(found, default=float("nan"))


def check_sizes(store: Path, size: int) -> str:
    """A note naming the stored images that are not ``size`` x ``size`` JPEGs ('' when all are)."""
    wrong = 0
    for path in store.rglob("*"):
        if path.is_file() and ".tmp" not in path.parts:
            with Image.open(path) as image:
                wrong += (image.format, image.size) != ("JPEG", (size, size))
    return f"{wrong} stored images of the wrong size; " if wrong else ""


def summary(results: list[Result], gaps: dict[tuple[str, int], float]) -> str:
    """Medians over the runs, and each engine's ratios to img2dataset taken within each run."""
    lines = ["", "| contender | images/s | CPU ms/image (client) | CPU ms/image (all suite processes) |",
             "|---|---|---|---|"]  # fmt: skip
    present = {label(result) for result in results}
    for client in (name for name in ("suite-threads", "suite-async", "img2dataset") if name in present):
        group = [result for result in results if label(result) == client]
        role = "img2dataset" if client == "img2dataset" else "workers"
        rate = statistics.median(result.images_per_s for result in group)
        cpu = statistics.median(result.cpu_ms_per_image(role) for result in group)
        everything = statistics.median(suite_cpu_ms(result) for result in group) if role == "workers" else cpu
        lines.append(f"| {client} | {rate:.1f} | {cpu:.2f} | {everything:.2f} |")
    lines.append("")
    runs = {result.run for result in results}
    for engine in (name for name in ENGINES if "img2dataset" in present and f"suite-{name}" in present):
        speed, cpu, cpu_all = [], [], []
        for run in sorted(runs):
            by_client = {label(result): result for result in results if result.run == run}
            suite, other = by_client[f"suite-{engine}"], by_client["img2dataset"]
            speed.append(suite.images_per_s / other.images_per_s)
            cpu.append(suite.cpu_ms_per_image("workers") / other.cpu_ms_per_image("img2dataset"))
            cpu_all.append(suite_cpu_ms(suite) / other.cpu_ms_per_image("img2dataset"))
        worst_gap = max(gap for (name, _), gap in gaps.items() if name == engine)
        lines.append(
            f"- {engine}: images/s ÷ img2dataset median **{statistics.median(speed):.2f}** ({_list(speed)}); "
            f"worker CPU/image ÷ img2dataset median **{statistics.median(cpu):.2f}** ({_list(cpu)}); with producer "
            f"and Redis **{statistics.median(cpu_all):.2f}** ({_list(cpu_all)}); heartbeat_gap_max up to "
            f"{worst_gap:.2f} s"
        )
    return "\n".join(lines)


def label(result: Result) -> str:
    """suite-<engine> (measured as client "suite" of mode <engine>) or img2dataset."""
    return f"suite-{result.mode}" if result.client == "suite" else result.client


def suite_cpu_ms(result: Result) -> float:
    return sum(result.cpu_ms_per_image(role) for role in ("workers", "producer", "redis"))


def _list(values: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


# --- decompression bombs --------------------------------------------------------------------------------------

BOMB_SCRIPT = """
import json, statistics, sys, time
from laion5b.imaging import ProcessPolicy, process
def peak():  # VmHWM: this process's own high-water mark
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
policy = ProcessPolicy(resize_mode="center_crop", image_size=256)
bombs = [(open(path, "rb").read(), ext) for path, ext in json.loads(sys.argv[1])]
control = open(sys.argv[2], "rb").read()
process(bombs[1][0][:3000], "jpg", policy)  # load the decoders
figures = []
for data, ext in bombs:
    before = peak()
    seconds = []
    for _ in range(5):
        started = time.perf_counter()
        status = process(data, ext, policy).status
        seconds.append(time.perf_counter() - started)
    figures.append([ext, len(data), status, 1000 * statistics.median(seconds), 1000 * max(seconds), peak() - before])
before = peak()
started = time.perf_counter()
status = process(control, "png", policy).status
figures.append(["control png", len(control), status, 1000 * (time.perf_counter() - started), 0, peak() - before])
print(json.dumps(figures))
"""


def bombs() -> int:
    folder = Path(tempfile.mkdtemp(prefix="bombs-", dir=WORK))
    try:
        files = []
        for ext, make in (("png", png_bomb), ("jpg", jpeg_bomb)):
            path = folder / f"bomb.{ext}"
            path.write_bytes(make())
            files.append((str(path), ext))
        control = folder / "control.png"
        Image.new("RGB", (3000, 3000), (20, 40, 60)).save(control, "PNG", compress_level=1)
        command = [sys.executable, "-c", BOMB_SCRIPT, json.dumps(files), str(control)]
        output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("| image | bytes | status | median ms | max ms (of 5) | peak RSS growth MB |\n|---|---|---|---|---|---|")
    for name, size, status, median_ms, max_ms, growth in json.loads(output.stdout):
        print(f"| {name} | {size:,} | {status} | {median_ms:.3f} | {max_ms:.3f} | {growth / 2**20:.1f} |")
    return 0


# --- the stage alone ------------------------------------------------------------------------------------------


def stage(args: argparse.Namespace) -> int:
    policy = ProcessPolicy(resize_mode=args.mode, image_size=args.size)
    folder = corpus(args.n)
    python = None
    if args.img2dataset:
        python, note = ensure_venv()
        if note or python is None:
            print(f"img2dataset unavailable: {note}")
            return 1
    for threads in (int(value) for value in args.threads.split(",")):
        print(line("suite", threads, args.n, run_suite(folder, policy, threads)), flush=True)
        if python is not None:
            print(line("img2dataset", threads, args.n, run_img2dataset(python, folder, policy, threads)), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    e2e = commands.add_parser("e2e", help="the workers against img2dataset, photos served from loopback")
    e2e.add_argument("--n", type=int, default=2000, help="URLs per run (default 2000)")
    e2e.add_argument("--photos", type=int, default=500, help="distinct photos the URLs cycle over (default 500)")
    e2e.add_argument("--runs", type=int, default=3, help="runs; medians and per-run ratios (default 3)")
    e2e.add_argument("--workers", type=int, default=2, help="processes per contender (default 2)")
    e2e.add_argument("--threads", type=int, default=32, help="threads (or async concurrency) per process")
    e2e.add_argument("--server-procs", type=int, default=2, help="image server processes (default 2)")
    e2e.add_argument("--max-bytes", type=int, default=32 * 2**20, help="the suite's body cap (default 32 MiB)")
    e2e.add_argument("--contenders", default="threads,async,img2dataset", help="comma-separated subset, in this order")
    commands.add_parser("bombs", help="cost of refusing 1 MB bombs claiming 50,000 x 50,000 pixels")
    alone = commands.add_parser("stage", help="process() against img2dataset's Resizer, nothing downloaded")
    alone.add_argument("--n", type=int, default=400, help="photos in the corpus (default 400)")
    alone.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    alone.add_argument("--img2dataset", action="store_true", help="also run img2dataset's Resizer (bench venv)")
    one_format = commands.add_parser("formats", help="cost of one image format per webdataset run, on LAION's mix")
    one_format.add_argument("--per-format", type=int, default=60, help="photos of each format (default 60)")
    one_format.add_argument("--runs", type=int, default=3, help="runs; medians (default 3)")
    mix = commands.add_parser("formats-e2e", help="one image format per webdataset run against keep_format, end to end")
    mix.add_argument("--n", type=int, default=4000, help="URLs per run (default 4000)")
    mix.add_argument("--photos", type=int, default=400, help="distinct photos the URLs cycle over (default 400)")
    mix.add_argument("--runs", type=int, default=3, help="runs of each setting, alternating (default 3)")
    mix.add_argument("--workers", type=int, default=2, help="downloader.py processes (default 2)")
    mix.add_argument("--threads", type=int, default=64, help="async concurrency per process (default 64)")
    mix.add_argument("--server-procs", type=int, default=2, help="image server processes (default 2)")
    for command in (e2e, alone):
        command.add_argument("--mode", default="center_crop", help="resize_mode (default center_crop)")
        command.add_argument("--size", type=int, default=256, help="image_size (default 256)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.command == "e2e":
        return end_to_end(args)
    if args.command == "bombs":
        return bombs()
    if args.command == "formats":
        return formats(args)
    if args.command == "formats-e2e":
        return formats_end_to_end(args)
    return stage(args)


if __name__ == "__main__":
    sys.exit(main())
