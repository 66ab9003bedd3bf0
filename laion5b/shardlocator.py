"""Where the samples of a webdataset output are, for report.py: read from the indexes of the finished shards
(``store_dir/<subset>/<name>.tar`` with ``<name>.parquet`` beside, on disk or in a bucket; temporary shards under
``.tmp`` and an index without its tar are not finished, and not read)."""

from __future__ import annotations

import logging
import os
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

import botocore.exceptions
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laion5b.objectstore import Bucket
from laion5b.rowstatus import FileLocator, Location, Locator
from laion5b.tasks import Task

log = logging.getLogger(__name__)

UNREADABLE = (OSError, pa.ArrowException, KeyError, botocore.exceptions.ClientError)
"""What reading an index that is damaged, lacks a column, or is gone from the bucket, raises."""
SAMPLES = pa.schema([("row", pa.int64()), ("shard", pa.int32()), ("key", pa.string())])
"""One part's stored samples: the row, the shard's number in its subset's survey, the members' key."""
EMPTY_SHARDS = pa.array([], pa.int32())
EMPTY_KEYS = pa.array([], pa.string())


@dataclass
class Survey:
    """The finished shards of one subset, numbered in name order, and which of them hold rows of each part."""

    folder: str
    names: list[str] = field(default_factory=list)
    parts: dict[str, array] = field(default_factory=dict)


class ShardLocator:
    """Stored samples in the finished shards under ``store_dir``, found through their indexes.

    Each subset's indexes are surveyed once (their ``part`` column only); a part's samples are then read from just
    the shards that hold some (columns ``part``, ``row``, ``key``), sorted by row and kept as flat arrays while that
    part is reported. So every index is read about twice in all, not once per part, and memory holds one part's
    stored samples (31 bytes each, 90 while they are read and sorted: 0.6 GB, 1.6 at the peak, for an 18M-row part),
    never a whole subset's."""

    by_id = False

    def __init__(self, store_dir: str, bucket: Bucket | None = None) -> None:
        self.store_dir = store_dir
        self.bucket = bucket
        """The bucket of an s3:// store_dir: its indexes are read from there."""
        self.duplicates = 0
        """Rows located so far that are stored in more than one shard (each reported once)."""
        self._surveys: dict[str, Survey] = {}
        self._loaded: tuple[str, str] | None = None
        self._rows = array("q")
        self._shards = EMPTY_SHARDS
        self._keys = EMPTY_KEYS
        self._repeated: set[int] = set()

    def locate(self, task: Task) -> Location | None:
        found = self.locate_all(task)
        if len(found) > 1:
            self.duplicates += 1
        return found[0] if found else None

    def copies(self, task: Task) -> int:
        """How many samples of the row the shards hold (two searches, no sample read)."""
        if self._loaded != (task.subset, task.part):
            self._load(task.subset, task.part)
        first = bisect_left(self._rows, task.row)
        if first == len(self._rows) or self._rows[first] != task.row:
            return 0
        return bisect_right(self._rows, task.row, first) - first if task.row in self._repeated else 1

    def locate_all(self, task: Task) -> list[Location]:
        """Every sample of the row, in shard name order (more than one is a duplicate)."""
        if self._loaded != (task.subset, task.part):
            self._load(task.subset, task.part)
        i = bisect_left(self._rows, task.row)
        if i == len(self._rows) or self._rows[i] != task.row:
            return []
        survey = self._surveys[task.subset]
        found = []
        while i < len(self._rows) and self._rows[i] == task.row:
            name = survey.names[self._shards[i].as_py()]
            found.append(Location(shard=f"{survey.folder}/{name}.tar", member=self._keys[i].as_py()))
            if task.row not in self._repeated:
                break
            i += 1
        return found

    def _load(self, subset: str, part: str) -> None:
        """Read the samples of one part from the shards that hold some; keep them sorted by row, then shard."""
        # the last part's arrays are let go before the next part is read
        self._loaded, self._rows, self._shards, self._keys = None, array("q"), EMPTY_SHARDS, EMPTY_KEYS
        samples, shards = self._read_part(self._surveys.get(subset) or self._survey(subset), part)
        order = pc.sort_indices(samples, [("row", "ascending"), ("shard", "ascending")])
        rows = samples["row"].take(order).combine_chunks()
        self._rows = _int64s(rows)
        following = rows.slice(1)
        self._repeated = set(following.filter(pc.equal(following, rows.slice(0, max(len(rows) - 1, 0)))).to_pylist())
        self._shards = samples["shard"].take(order).combine_chunks()
        self._keys = samples["key"].take(order).combine_chunks()
        self._loaded = (subset, part)
        log.info("shard_samples_loaded subset=%s part=%s shards=%d samples=%d repeated=%d", subset, part, shards,
                 len(rows), len(self._repeated))  # fmt: skip

    def _read_part(self, survey: Survey, part: str) -> tuple[pa.Table, int]:
        """The part's samples from every shard that holds some (a chunk each), and how many shards were read."""
        tables = []
        for number in survey.parts.get(part, ()):
            path = f"{survey.folder}/{survey.names[number]}.parquet"
            try:
                tables.append(_part_samples(self._open(path), part, number))
            except UNREADABLE as error:
                log.warning("shard_index_unreadable index=%s error=%s", path, error)
        return pa.concat_tables([SAMPLES.empty_table(), *tables]), len(tables)

    def _survey(self, subset: str) -> Survey:
        """Number the subset's finished shards and note the parts each holds."""
        survey = Survey(f"{self.store_dir}/{subset}")
        present = {name for name in self._names(survey.folder) if not name.startswith(".")}
        finished = sorted(n.removesuffix(".tar") for n in present if n.endswith(".tar"))
        for name in finished:
            path = f"{survey.folder}/{name}.parquet"
            if f"{name}.parquet" not in present:
                log.warning("shard_index_missing shard=%s/%s.tar", survey.folder, name)
                continue
            try:
                parts = pc.unique(_read(self._open(path), ["part"])["part"]).to_pylist()
            except UNREADABLE as error:
                log.warning("shard_index_unreadable index=%s error=%s", path, error)
                continue
            for part in filter(None, parts):
                survey.parts.setdefault(part, array("i")).append(len(survey.names))
            survey.names.append(name)
        self._surveys[subset] = survey
        log.info("shards_surveyed subset=%s shards=%d", subset, len(survey.names))
        return survey

    def _names(self, folder: str) -> set[str]:
        """The names of the files in a subset's folder (objects under its prefix in a bucket)."""
        if self.bucket is not None:
            return self.bucket.names(folder)
        try:
            with os.scandir(folder) as entries:
                return {entry.name for entry in entries if entry.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            return set()

    def _open(self, path: str) -> str | pa.BufferReader:
        """An index to read: its path, or its bytes fetched from the bucket."""
        return pa.BufferReader(self.bucket.read(path)) if self.bucket is not None else path


def _part_samples(source: str | pa.BufferReader, part: str, number: int) -> pa.Table:
    """The samples of one part in the shard numbered ``number`` whose index is ``source``."""
    table = _read(source, ["part", "row", "key"])
    table = table.filter(pc.and_(pc.equal(table["part"], part), pc.is_valid(table["row"])))
    shard = pa.repeat(pa.scalar(number, pa.int32()), table.num_rows)
    return pa.table([table["row"].cast(pa.int64()), shard, table["key"].cast(pa.string())], schema=SAMPLES)


def _read(source: str | pa.BufferReader, columns: list[str]) -> pa.Table:
    """Some columns of an index (ParquetFile: a few times quicker than read_table on small files)."""
    with pq.ParquetFile(source) as file:
        return file.read(columns=columns)


def _int64s(values: pa.Array) -> array:
    """An int64 arrow array without nulls as a flat Python array (for bisect), copied from its buffer."""
    flat = array("q")
    if not len(values):
        return flat
    start = values.offset * flat.itemsize
    flat.frombytes(values.buffers()[1][start : start + len(values) * flat.itemsize])
    return flat


LOCATORS: dict[str, Callable[[str], Locator]] = {"files": FileLocator, "webdataset": ShardLocator}
"""The locator of each ``output_format``: where its stored samples are found (report.py, reconcile.py)."""
