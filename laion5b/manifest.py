"""What readers of a webdataset output need, per subset: the finished shards (``shards.txt``, one tar name a line,
in name order) and their samples (``sizes.json``, tar name -> samples: the file open_clip reads for
``--train-num-samples``), written beside the shards; and the shard list as readers take it, a brace pattern or a
``::``-joined list (open_clip's ``--train-data``; the webdataset library expands braces too)."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

import pyarrow.parquet as pq

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


def subsets(store_dir: str) -> list[str]:
    """The subsets' folders in ``store_dir``, by name (the temporary folder ``.tmp`` is none)."""
    try:
        with os.scandir(store_dir) as entries:
            return sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    except FileNotFoundError:
        return []


def survey(folder: str) -> Manifest:
    """The finished shards in ``folder`` (a tar with its index beside it) and their samples, read from the index's
    footer; a shard whose index cannot be read is left out, with a warning."""
    with os.scandir(folder) as entries:
        present = {entry.name for entry in entries if entry.is_file() and not entry.name.startswith(".")}
    sizes: dict[str, int] = {}
    for tar in sorted(name for name in present if name.endswith(".tar")):
        index = f"{tar.removesuffix('.tar')}.parquet"
        if index not in present:
            continue  # not finished: its index comes first
        try:
            sizes[tar] = pq.ParquetFile(f"{folder}/{index}").metadata.num_rows
        except (OSError, ValueError) as error:  # pyarrow's errors are both
            log.warning("manifest_index_unreadable index=%s/%s error=%s: shard left out", folder, index, error)
    return Manifest(folder, sizes)


def write(manifest: Manifest) -> None:
    """Write ``shards.txt`` and ``sizes.json`` into the subset's folder, each replacing the last one whole."""
    _replace(f"{manifest.folder}/{SHARDS_FILE}", "".join(f"{name}\n" for name in manifest.sizes))
    _replace(f"{manifest.folder}/{SIZES_FILE}", json.dumps(manifest.sizes, indent=0) + "\n")


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
