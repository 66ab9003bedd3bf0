"""The demo sample: a LAION-shaped parquet file whose URLs point at the local image server, with real failures."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DEMO_SEED = 5
MIX = (
    (0.70, "/img/{i}.jpg"),
    (0.05, "/img/{i}.png"),
    (0.03, "/img/{i}.webp"),
    (0.02, "/img/{i}.gif"),
    (0.08, "/status/404"),
    (0.02, "/status/500"),
    (0.02, "/slow/30/{i}.jpg"),
    (0.03, "/notimage"),
    (0.03, "/optout/noai/{i}.jpg"),
    (0.02, None),
)
"""Share of rows and the server path each gets; None is a row without a usable URL (a bad_url error)."""


def make_sample(path: Path, rows: int, port: int) -> Path:
    """Write the demo parquet file (original LAION columns) unless it exists, so a second run finds the same URLs."""
    if path.exists():
        return path
    chooser = random.Random(DEMO_SEED)
    shares, templates = zip(*MIX, strict=True)
    urls = []
    for i in range(rows):
        template = chooser.choices(templates, weights=shares)[0]
        urls.append("UNLIKELY" if template is None else f"http://127.0.0.1:{port}" + template.format(i=f"demo{i}"))
    table = pa.table(
        {
            "SAMPLE_ID": [float(100_000 + i) for i in range(rows)],
            "URL": urls,
            "TEXT": [f"demo caption {i}" for i in range(rows)],
            "WIDTH": [8] * rows,
            "HEIGHT": [8] * rows,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    pq.write_table(table, temporary)
    temporary.rename(path)
    return path
