"""Where the samples of a webdataset output are, for report.py: read from the indexes of the finished shards
(``store_dir/<subset>/<name>.tar`` with ``<name>.parquet`` beside; temporary shards under ``.tmp`` and an index
without its tar are not finished, and not read)."""

from __future__ import annotations

import logging
import os
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laion5b.rowstatus import Location
from laion5b.tasks import Task

log = logging.getLogger(__name__)

UNREADABLE = (OSError, pa.ArrowException, KeyError)
"""What reading an index that is damaged, or lacks a column, raises."""
SAMPLES = pa.schema([("row", pa.int64()), ("shard", pa.int32()), ("key", pa.string())])
"""One part's stored samples: the row, the shard's number in its subset's survey, the members' key."""


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
    stored samples (about 40 bytes each, twice that while they are sorted), never a whole subset's."""

    def __init__(self, store_dir: str) -> None:
        self.store_dir = store_dir
        self.duplicates = 0
        """Rows located so far that are stored in more than one shard (each reported once)."""
        self._surveys: dict[str, Survey] = {}
        self._loaded: tuple[str, str] | None = None
        self._rows = array("q")
        self._shards = pa.array([], pa.int32())
        self._keys = pa.array([], pa.string())
        self._repeated: set[int] = set()

    def locate(self, task: Task) -> Location | None:
        if self._loaded != (task.subset, task.part):
            self._load(task.subset, task.part)
        i = bisect_left(self._rows, task.row)
        if i == len(self._rows) or self._rows[i] != task.row:
            return None
        if task.row in self._repeated:
            self.duplicates += 1
        survey = self._surveys[task.subset]
        name = survey.names[self._shards[i].as_py()]
        return Location(shard=f"{survey.folder}/{name}.tar", member=self._keys[i].as_py())

    def _load(self, subset: str, part: str) -> None:
        """Read the samples of one part from the shards that hold some; keep them sorted by row, then shard."""
        survey = self._surveys.get(subset) or self._survey(subset)
        tables = []
        for number in survey.parts.get(part, ()):
            path = f"{survey.folder}/{survey.names[number]}.parquet"
            try:
                tables.append(_part_samples(path, part, number))
            except UNREADABLE as error:
                log.warning("shard_index_unreadable index=%s error=%s", path, error)
        samples = pa.concat_tables(tables) if tables else SAMPLES.empty_table()
        samples = samples.sort_by([("row", "ascending"), ("shard", "ascending")])
        rows = samples["row"].combine_chunks()
        self._rows = _int64s(rows)
        self._shards = samples["shard"].combine_chunks()
        self._keys = samples["key"].combine_chunks()
        following = rows.slice(1)
        self._repeated = set(following.filter(pc.equal(following, rows.slice(0, max(len(rows) - 1, 0)))).to_pylist())
        self._loaded = (subset, part)
        log.info("shard_samples_loaded subset=%s part=%s shards=%d samples=%d repeated=%d", subset, part, len(tables),
                 len(rows), len(self._repeated))  # fmt: skip

    def _survey(self, subset: str) -> Survey:
        """Number the subset's finished shards and note the parts each holds."""
        survey = Survey(f"{self.store_dir}/{subset}")
        try:
            with os.scandir(survey.folder) as entries:
                present = {entry.name for entry in entries if entry.is_file() and not entry.name.startswith(".")}
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        finished = sorted(n.removesuffix(".tar") for n in present if n.endswith(".tar"))
        for name in finished:
            path = f"{survey.folder}/{name}.parquet"
            if f"{name}.parquet" not in present:
                log.warning("shard_index_missing shard=%s/%s.tar", survey.folder, name)
                continue
            try:
                parts = pc.unique(pq.read_table(path, columns=["part"])["part"]).to_pylist()
            except UNREADABLE as error:
                log.warning("shard_index_unreadable index=%s error=%s", path, error)
                continue
            for part in filter(None, parts):
                survey.parts.setdefault(part, array("i")).append(len(survey.names))
            survey.names.append(name)
        self._surveys[subset] = survey
        log.info("shards_surveyed subset=%s shards=%d", subset, len(survey.names))
        return survey


def _part_samples(path: str, part: str, number: int) -> pa.Table:
    """The samples of one part in the shard numbered ``number`` whose index is ``path``."""
    table = pq.read_table(path, columns=["part", "row", "key"])
    table = table.filter(pc.and_(pc.equal(table["part"], part), pc.is_valid(table["row"])))
    shard = pa.array([number] * table.num_rows, pa.int32())
    return pa.table([table["row"].cast(pa.int64()), shard, table["key"].cast(pa.string())], schema=SAMPLES)


def _int64s(values: pa.Array) -> array:
    """An int64 arrow array without nulls as a flat Python array (for bisect), copied from its buffer."""
    flat = array("q")
    if not len(values):
        return flat
    start = values.offset * flat.itemsize
    flat.frombytes(values.buffers()[1][start : start + len(values) * flat.itemsize])
    return flat
