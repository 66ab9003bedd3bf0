"""What readers of a webdataset output need, per subset: the finished shards (``shards.txt``, one tar name a line,
in name order) and their samples (``sizes.json``, tar name -> samples: the file open_clip reads for
``--train-num-samples``), written beside the shards, on disk or as objects in the bucket of an s3:// store_dir; and
the shard list as readers take it, a brace pattern or a ``::``-joined list (open_clip's ``--train-data``; the
webdataset library expands braces too)."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

import pyarrow.parquet as pq

from laion5b.objectstore import Bucket, RemotePath

log = logging.getLogger(__name__)

SHARDS_FILE = "shards.txt"
SIZES_FILE = "sizes.json"
FORMS = ("braces", "list")
"""How the shard list is printed: one brace pattern, or open_clip's ``::``-joined list."""
_NUMBERED = re.compile(r"(.*?-)(\d{6,})(-[0-9a-f]{8})?")
"""A shard's name: ``<host_id>-<NAME>-`` (file-safe), its sequence number, its incarnation (shards.py names them)."""
_BRACE_SPECIAL = re.compile(r"([{},\\])")


@dataclass(frozen=True)
class Manifest:
    """The finished shards of one subset's folder and their samples, in name order."""

    folder: str
    sizes: dict[str, int]

    @property
    def samples(self) -> int:
        return sum(self.sizes.values())

    def paths(self) -> list[str]:
        return [f"{self.folder}/{name}" for name in self.sizes]


def subsets(store_dir: str, bucket: Bucket | None = None) -> list[str]:
    """The subsets' folders in ``store_dir`` (in its bucket: the prefixes under it), by name (the temporary folder
    ``.tmp`` and the probes' ``.probe`` are none)."""
    if bucket is not None:
        return [name for name in bucket.folders(store_dir) if not name.startswith(".")]
    try:
        with os.scandir(store_dir) as entries:
            return sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    except FileNotFoundError:
        return []


def survey(folder: str, bucket: Bucket | None = None) -> Manifest:
    """The finished shards in ``folder`` (a tar with its index beside it) and their samples, read from the index's
    footer (in a bucket, by ranged GETs of its end); a shard whose index cannot be read is left out, with a warning."""
    present = bucket.files(folder) if bucket is not None else _files(folder)
    sizes: dict[str, int] = {}
    for tar in sorted(name for name in present if name.endswith(".tar") and not name.startswith(".")):
        index = f"{tar.removesuffix('.tar')}.parquet"
        if index not in present:
            continue  # not finished: its index comes first
        path = f"{folder}/{index}"
        try:
            sizes[tar] = _rows(RemotePath(path, present[index], bucket) if bucket is not None else path)
        except (OSError, ValueError) as error:  # pyarrow's errors are both; the bucket's are OSError
            log.warning("manifest_index_unreadable index=%s error=%s: shard left out", path, error)
    return Manifest(folder, sizes)


def _files(folder: str) -> dict[str, int]:
    with os.scandir(folder) as entries:
        return {entry.name: entry.stat().st_size for entry in entries if entry.is_file()}


def _rows(index: str | RemotePath) -> int:
    """The rows of an index, from its footer only."""
    if isinstance(index, str):
        return pq.ParquetFile(index).metadata.num_rows
    with index.open() as file, pq.ParquetFile(file) as parquet:
        return parquet.metadata.num_rows


def write(manifest: Manifest, bucket: Bucket | None = None) -> None:
    """Write ``shards.txt`` and ``sizes.json`` into the subset's folder (as objects in its bucket), each replacing
    the last one whole."""
    files = {SHARDS_FILE: "".join(f"{name}\n" for name in manifest.sizes),
             SIZES_FILE: json.dumps(manifest.sizes, indent=0) + "\n"}  # fmt: skip
    for name, text in files.items():
        if bucket is not None:
            bucket.write(f"{manifest.folder}/{name}", text.encode())
        else:
            _replace(f"{manifest.folder}/{name}", text)


def presigned(manifest: Manifest, bucket: Bucket, seconds: int) -> str:
    """The shards as https URLs that open without credentials for ``seconds`` (presigned GETs), joined by ``::``."""
    return "::".join(bucket.presign(path, seconds) for path in manifest.paths())


def joined(manifest: Manifest) -> str:
    """The shards' paths joined by ``::``, as open_clip's ``--train-data`` takes several."""
    return "::".join(manifest.paths())


def braces(manifest: Manifest) -> str:
    """One brace pattern that expands to the shards' paths: consecutive shards of one writing process become a
    range, ``<host>-<NAME>-{000000..000041}-<inc>``."""
    names = [name.removesuffix(".tar") for name in manifest.sizes]
    alternatives = [_escaped(name) for name in names if not _NUMBERED.fullmatch(name)]
    runs: dict[tuple[str, str], list[list[str]]] = {}
    for name in names:
        match = _NUMBERED.fullmatch(name)
        if match:
            prefix, seq, suffix = match[1], match[2], match[3] or ""
            group = runs.setdefault((prefix, suffix), [])
            if group and _follows(group[-1][-1], seq):
                group[-1].append(seq)
            else:
                group.append([seq])
    for (prefix, suffix), group in runs.items():
        ranges = [run[0] if len(run) == 1 else f"{{{run[0]}..{run[-1]}}}" for run in group]
        numbers = ranges[0] if len(ranges) == 1 else "{" + ",".join(ranges) + "}"
        alternatives.append(f"{_escaped(prefix)}{numbers}{_escaped(suffix)}")
    body = alternatives[0] if len(alternatives) == 1 else "{" + ",".join(alternatives) + "}"
    return f"{_escaped(manifest.folder)}/{body}.tar"


def _follows(last: str, seq: str) -> bool:
    """Whether ``seq`` comes right after ``last`` in one zero-padded range (same width)."""
    return len(seq) == len(last) and int(seq) == int(last) + 1


def _escaped(text: str) -> str:
    """``text`` with the characters brace expansion reads (``{``, ``}``, ``,``, ``\\``) escaped."""
    return _BRACE_SPECIAL.sub(r"\\\1", text)


def _replace(path: str, text: str) -> None:
    temp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp"
    with open(temp, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temp, path)
