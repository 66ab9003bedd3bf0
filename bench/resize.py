"""Processing-stage bench: laion5b.imaging.process against img2dataset's Resizer on the same generated photos.

    python3 bench/resize.py [--n 400] [--mode center_crop] [--size 256] [--threads 1,2] [--img2dataset]

Generates N photos of 500-2,000 pixels a side (80 % JPEG of quality 75-95, 10 % PNG, 10 % WebP; gradients, shapes
and grain, so that they cost what photos cost to decode) into bench/work/resize-corpus-N/ once, then for each thread
count processes every photo with this suite's ``process`` and, with ``--img2dataset``, with img2dataset's
``Resizer`` (same mode, size, jpg quality 95) in the bench venv of bench/speed.py, and prints images/s and CPU ms
per image of each. Nothing is downloaded: this measures the stage alone. The issue's end-to-end target (photos
served from loopback through the workers, against img2dataset with the same settings) is bench/speed.py's job once
the worker calls ``process``.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from laion5b.imageformat import image_extension  # noqa: E402
from laion5b.imaging import ProcessPolicy, process  # noqa: E402
from speed import WORK, ensure_venv  # noqa: E402

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
    images = [(path.read_bytes(), path.suffix[1:]) for path in sorted(folder.iterdir())]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="photos in the corpus (default 400)")
    parser.add_argument("--mode", default="center_crop", help="resize_mode (default center_crop)")
    parser.add_argument("--size", type=int, default=256, help="image_size (default 256)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--img2dataset", action="store_true", help="also run img2dataset's Resizer (bench venv)")
    args = parser.parse_args()
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


if __name__ == "__main__":
    sys.exit(main())
