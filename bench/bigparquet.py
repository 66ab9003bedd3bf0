"""Write a LAION-shaped parquet file for the producer benchmark (original columns, captions of realistic length).

Usage: python3 bench/bigparquet.py OUT.parquet [--rows 5000000] [--row-group 1000000]
"""

from __future__ import annotations

import argparse
import random

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "red",
    "blue",
    "small",
    "large",
    "dog",
    "cat",
    "house",
    "tree",
    "car",
    "beach",
    "city",
    "night",
    "sunset",
    "with",
    "in",
    "on",
    "and",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--row-group", type=int, default=1_000_000)
    args = parser.parse_args()
    rng = random.Random(0)
    captions = [" ".join(rng.choices(WORDS, k=rng.randint(4, 16))) for _ in range(10_000)]
    schema = pa.schema(
        [("SAMPLE_ID", pa.float64()), ("URL", pa.string()), ("TEXT", pa.string()), ("HEIGHT", pa.int64()),
         ("WIDTH", pa.int64()), ("LICENSE", pa.string()), ("NSFW", pa.string()), ("similarity", pa.float64())]
    )  # fmt: skip
    with pq.ParquetWriter(args.out, schema) as writer:
        for first in range(0, args.rows, args.row_group):
            rows = range(first, min(first + args.row_group, args.rows))
            writer.write_table(
                pa.table(
                    {
                        "SAMPLE_ID": [float(1_000_000_000 + i) for i in rows],
                        "URL": [f"https://img{i % 997}.example.com/images/{i:09d}/photo.jpg" for i in rows],
                        "TEXT": [captions[i % len(captions)] for i in rows],
                        "HEIGHT": [256 + i % 512 for i in rows],
                        "WIDTH": [320 + i % 640 for i in rows],
                        "LICENSE": ["?" if i % 3 else "cc-by" for i in rows],
                        "NSFW": ["UNLIKELY" if i % 10 else "UNSURE" for i in rows],
                        "similarity": [0.28 + (i % 100) / 1000 for i in rows],
                    },
                    schema=schema,
                )
            )


if __name__ == "__main__":
    main()
