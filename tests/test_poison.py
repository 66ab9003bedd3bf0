"""Poison values and queue entries (issue 17): whatever one task brings ends as that task's outcome, through a real
worker with webdataset output; the sealer never dies; a shard without a sample is never prepared; the tar end is
written whole."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import queue
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from laion5b import shards
from laion5b.imaging import Processed
from laion5b.keys import Keys
from laion5b.leases import RETURN, Leases
from laion5b.shards import INCARNATION_CHARS, TAR_BLOCK, TAR_END, ShardSink, index_table, shard_field
from laion5b.tasks import Task, bad_task_record, decode
from tests.helpers import ENGINE_IDS, engine_env, run_script, webdataset_env
from tools.image_server import image_bytes

KEYS = Keys()
HOST = "testhost"
WORKER_SECONDS = 40
"""A worker over a few dozen entries on loopback ends in a few seconds: longer means it stalls."""
UNSTORABLE = {"big": 2**64 - 1, "empty": {}, "deep_empty": [{"a": {}}], "mixed": [1, "a", None]}
"""``save_columns`` values that Arrow cannot take as they are, or parquet cannot write."""


@pytest.fixture
def env(script_env: dict[str, str]) -> dict[str, str]:
    return webdataset_env(script_env, LAION_THREAD_NUM="4", LAION_SHARD_SIZE="7")


def run_worker(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    """``downloader.py w --until-empty``; a worker that stalls fails the test after ``WORKER_SECONDS``."""
    return subprocess.run([*run_script("downloader.py"), "w", "--until-empty", *extra], env=env, capture_output=True,
                          text=True, timeout=WORKER_SECONDS)  # fmt: skip


def push(redis_server, entries: list[str | bytes]) -> None:
    """Queue entries as they are (bytes unchanged: they need not be UTF-8), counted as added."""
    raw_client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    raw_client.lpush(KEYS.task, *[entry.encode() if isinstance(entry, str) else entry for entry in entries])
    raw_client.incrby(KEYS.tongji_all, len(entries))


def image_task(image_server, row: int, meta: dict[str, Any] | None = None) -> Task:
    url = image_server.url(f"/img/p{row}.jpg?size=1500")
    return Task(f"id{row}", url, "sub", "part.0", row, f"caption {row}", meta=meta)


def books(client, store: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(index rows of every finished shard, error records), once every shard is finished and counted exactly."""
    rows: list[dict[str, Any]] = []
    for tar in sorted(store.glob("*/*.tar")):
        with tarfile.open(tar) as archive:
            keys = {name.partition(".")[0] for name in archive.getnames()}
        index = pq.read_table(tar.with_suffix(".parquet")).to_pylist()
        assert sorted(row["key"] for row in index) == sorted(keys)
        rows += index
    errors = [json.loads(line) for line in client.lrange(KEYS.error, 0, -1)]
    assert int(client.get(KEYS.tongji_succ) or 0) == len(rows)
    assert int(client.get(KEYS.tongji_error) or 0) == len(errors)
    assert len(rows) + len(errors) == int(client.get(KEYS.tongji_all))
    assert len({row["key"] for row in rows}) == len(rows), "a sample is in two shards"
    assert client.llen(KEYS.task) == 0 and client.zcard(KEYS.delayed) == 0
    assert int(client.hget(KEYS.host_counters, f"{HOST}:open") or 0) == 0
    assert not client.hgetall(KEYS.shards) and not client.keys(f"{KEYS.task}:kept:*")
    assert not [path for path in (store / ".tmp").rglob("*") if path.is_file()]
    return rows, errors


# --- finding 1: values Arrow cannot store ---


def test_values_arrow_cannot_store_are_kept_as_json_text(env, redis_server, image_server, tmp_path: Path) -> None:
    """A uint64 past 2^63, an empty object, an empty object inside a list, mixed types: the samples are stored, their
    index holds those values as JSON text, every shard is finished, the books are exact."""
    tasks = [image_task(image_server, row, dict(UNSTORABLE)) for row in range(3)]
    tasks += [image_task(image_server, row, {"big": row}) for row in range(3, 5)]
    push(redis_server, [task.encode() for task in tasks])
    result = run_worker(env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows, errors = books(redis_server.client(), tmp_path / "images")
    assert errors == [] and sorted(row["id"] for row in rows) == sorted(task.id for task in tasks)
    by_id = {row["id"]: row for row in rows}
    assert json.loads(by_id["id0"]["big"]) == 2**64 - 1 and json.loads(by_id["id0"]["empty"]) == {}
    assert json.loads(by_id["id0"]["deep_empty"]) == [{"a": {}}] and json.loads(by_id["id0"]["mixed"]) == [1, "a", None]
    assert json.loads(by_id["id4"]["big"]) == 4 and by_id["id4"]["empty"] is None
    assert "shard_seal_failed" not in result.stderr


def test_a_shard_that_cannot_be_sealed_is_discarded_and_the_sealer_lives_on(redis_server, tmp_path: Path) -> None:
    """Whatever sealing raises marks that shard failed; ``finish`` queues its tasks again; the next shard seals."""
    client = redis_server.client()
    leases, sink, (first, second) = claim_into_sink(client, tmp_path, 2)
    leases.finish([sink.put(decode(first), first, sample_image(), None)])
    sink._open["sub"].rows[0]["broken"] = Unprintable()  # a value no encoder takes: the index cannot be built
    sink.seal_all()
    broken = sink.ready.get(timeout=10)
    assert broken.error is not None
    assert sink.finish(broken, leases, lambda call: call()) == -1
    assert client.lrange(KEYS.task, 0, -1) == [first]
    leases.finish([sink.put(decode(second), second, sample_image(), None)])
    sink.seal_all()
    sealed = sink.ready.get(timeout=10)
    assert sealed.error is None and sink.finish(sealed, leases, lambda call: call()) == 1
    assert sink.unfinished == 0
    sink.close()


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for this value")

    __repr__ = __str__


# --- finding 2: a shard without a sample ---


class FullOnce(io.FileIO):
    """A file on a disk that is full for its first write (ENOSPC), and has room again after."""

    failed = False

    def write(self, data: Any) -> int:
        if not self.failed:
            self.failed = True
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_a_shard_without_a_sample_is_never_prepared(redis_server, tmp_path: Path, monkeypatch) -> None:
    """The first write of a shard fails (ENOSPC, truncated back) and the shard is sealed with no sample: it is dropped
    without a Redis step, the next shard is finished and counted, and nothing is left behind."""
    client = redis_server.client()
    leases, sink, (first, second) = claim_into_sink(client, tmp_path, 2)
    monkeypatch.setattr(shards, "open", lambda path, *_, **__: FullOnce(path, "w"), raising=False)
    with pytest.raises(OSError, match="No space"):
        sink.put(decode(first), first, sample_image(), None)
    monkeypatch.undo()
    leases.finish([(RETURN, first, "")])
    sink.seal_all()
    leases.finish([sink.put(decode(second), second, sample_image(), None)])
    sink.seal_all()
    counted = [sink.finish(shard, leases, lambda call: call()) for shard in ready_shards(sink)]
    assert counted == [1] and sink.unfinished == 0
    assert client.lrange(KEYS.task, 0, -1) == [first] and int(client.get(KEYS.tongji_succ)) == 1
    assert int(client.hget(KEYS.host_counters, f"{HOST}:open")) == 0 and not client.hgetall(KEYS.shards)
    names = sorted(path.name for path in (tmp_path / "store" / "sub").iterdir())
    suffix = leases.incarnation[:INCARNATION_CHARS]
    assert names == [f"{HOST}-w-000001-{suffix}.parquet", f"{HOST}-w-000001-{suffix}.tar"]
    assert not [path for path in (tmp_path / "store" / ".tmp").rglob("*") if path.is_file()]
    sink.close()


def test_preparing_a_shard_without_tasks_is_no_error(redis_server) -> None:
    """The prepare script never RENAMEs a list that does not exist: a shard with no task is simply not prepared."""
    leases = Leases(redis_server.client(), KEYS, HOST, f"{HOST}:w", 30)
    leases.register()
    assert leases.prepare_shard("sub/none", 0, shard_field(HOST, "sub/none"), "{}") is False
    assert not redis_server.client().hgetall(KEYS.shards)


# --- finding 3: queue entries that are no task ---


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_entries_that_are_no_task_end_as_bad_task(env, redis_server, image_server, tmp_path: Path, engine) -> None:
    """JSON nested too deep to parse, invalid UTF-8, a lone surrogate, a meta that would rename the sample: each is one
    bad_task record keeping the entry; the good task beside them is stored; the worker ends by itself."""
    good = image_task(image_server, 0)
    fields = good.fields()
    junk: list[str | bytes] = [
        "[" * 100_000,
        b'{"id":"\xff\xfe","url":"http://127.0.0.1/x.jpg"}\x80',
        json.dumps({**fields, "id": "a\ud800"}),
        json.dumps({**fields, "meta": {"key": "../../etc/x"}}),
        json.dumps({**fields, "text": ["a list"]}),
    ]
    push(redis_server, [*junk, good.encode()])
    started = time.monotonic()
    result = run_worker({**env, **engine_env(engine)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - started < WORKER_SECONDS
    rows, errors = books(redis_server.client(), tmp_path / "images")
    assert [row["id"] for row in rows] == [good.id]
    assert sorted(record["status"] for record in errors) == ["bad_task"] * len(junk)
    kept = sorted(record["raw"] for record in errors)
    assert "[" * 4096 in kept and any(raw.startswith('{"id":"\\xff\\xfe"') for raw in kept), kept


def test_a_bad_task_record_is_made_of_any_entry() -> None:
    for raw in ("\udcff{\ud800", "a\x00b" * 3000, b"\xff\xfe"):
        record = json.loads(bad_task_record(raw, "not a task: \udc80", "w"))  # type: ignore[arg-type]
        assert record["status"] == "bad_task" and len(record["raw"]) <= 4 * 4096
        json.dumps(record, ensure_ascii=False).encode("utf-8")


def test_an_error_record_is_made_of_any_task() -> None:
    """A task whose meta cannot be written as JSON still gets its record, without the meta."""
    deep: Any = 1
    for _ in range(5000):
        deep = [deep]
    for task in (Task("a", "u", "s", "p", 1, meta={"deep": deep}), Task("a", "u\ud800", "s", "p", 1, "t\udcff")):
        record = json.loads(task.error_record("internal_error", "m", "w"))
        assert record["id"] == "a" and "meta" not in record
        json.dumps(record, ensure_ascii=False).encode("utf-8")


# --- finding 11: the tar end ---


class ShortWrites(io.FileIO):
    """A file that takes at most 100 bytes a write, as a filling disk may."""

    def write(self, data: Any) -> int:
        return super().write(memoryview(data)[:100])


def test_the_tar_end_is_written_whole(tmp_path: Path, monkeypatch) -> None:
    """A tar's writes may be short: the tar end is written whole all the same."""

    def short_tar(path: str, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return ShortWrites(path, "w") if path.endswith(".tar") else open(path, mode, *args, **kwargs)

    monkeypatch.setattr(shards, "open", short_tar, raising=False)
    sink = open_sink(tmp_path)
    sink.put(Task("a", "http://127.0.0.1/x.jpg", "sub", "p", 0), "raw", sample_image(), None)
    sink.seal_all()
    shard = sink.ready.get(timeout=10)
    data = Path(shard.paths()["temp_tar"]).read_bytes()
    assert shard.error is None and len(data) % TAR_BLOCK == 0 and data.endswith(TAR_END)
    with tarfile.open(shard.paths()["temp_tar"]) as archive:
        assert len(archive.getnames()) == 3
    sink.close()


# --- the property: any entries, any values ---

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**63, 2**64 - 1, -(2**63) - 1, math.nan, math.inf, -math.inf, "", "\x00"])
    | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
nested = st.integers(min_value=1, max_value=60).map(lambda depth: "[" * depth + "]" * depth).map(json.loads)
save_values = json_values | nested | st.just({}) | st.just([{}]) | st.just({"a": {}})
metas = st.none() | st.dictionaries(st.sampled_from(["c1", "c2", "c3"]), save_values, max_size=3)
wrong_types = st.lists(st.integers(), max_size=2) | st.floats()
"""Values of a type no field of a task takes (an object would be a valid ``meta``)."""


JUNK_KINDS = ("nested", "huge", "wrong type", "bytes", "nul", "surrogate", "text", "clash")


@st.composite
def junk_entries(draw, kind: str | None = None) -> str | bytes:
    """A queue entry that is no task, of ``kind`` (one of ``JUNK_KINDS``; any when None)."""
    base = {"id": "j", "url": "http://127.0.0.1/x.jpg", "subset": "s", "part": "p", "row": 0}
    kind = kind or draw(st.sampled_from(JUNK_KINDS))
    if kind == "nested":
        return draw(st.sampled_from(["[", '{"a":', '[{"a":'])) * draw(st.integers(2000, 100_000))
    if kind == "huge":
        return json.dumps({**base, "id": "x" * draw(st.integers(300, 300_000))})
    if kind == "wrong type":
        field = draw(st.sampled_from(["id", "url", "subset", "part", "row", "text", "meta", "attempts"]))
        return json.dumps({**base, field: draw(wrong_types)})
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=200)).replace(b"{", b"\xff") + b"\xc3"
    if kind == "nul":
        return json.dumps({**base, "part": "a\x00b"}, ensure_ascii=False).replace("0}", "0}\x00")
    if kind == "surrogate":
        return json.dumps({**base, "id": draw(st.sampled_from(["\ud800", "a\udfff", "\udc80z"]))})
    if kind == "clash":
        return json.dumps({**base, "meta": {draw(st.sampled_from(["key", "sha256", "width"])): 1}})
    return draw(st.text(max_size=200).filter(lambda text: not text.strip().startswith("{")))


@st.composite
def batches(draw) -> list[tuple[bool, str | bytes]]:
    """Entries of one worker run, in any order: (is a task, entry); tasks fetch real images (their URLs relative to
    the image server) and carry arbitrary save_columns."""
    entries = []
    for row in range(draw(st.integers(min_value=10, max_value=25))):
        url = f"/img/h{row}.{draw(st.sampled_from(['jpg', 'png']))}?size=1200"
        task = Task(f"t{row}", url, "sub", "part.0", row, draw(st.none() | st.text(max_size=30)), meta=draw(metas))
        entries.append((True, task.encode()))
    entries += [(False, draw(junk_entries(kind))) for kind in JUNK_KINDS]
    entries += [(False, draw(junk_entries())) for _ in range(draw(st.integers(min_value=2, max_value=15)))]
    return draw(st.permutations(entries))


@pytest.mark.parametrize("engine", ["threads", "async"])
@settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=batches())
def test_any_entries_and_values_each_end_as_one_outcome(env, redis_server, image_server, tmp_path, engine, batch):
    """Every entry ends as exactly one outcome (tasks stored whatever their save_columns, the rest bad_task), every
    shard is finished, and --until-empty returns."""
    client = redis_server.client()
    client.flushdb()
    store = tmp_path / f"store-{time.monotonic_ns()}"
    entries = [entry.replace("/img/", image_server.url("/img/")) if is_task else entry for is_task, entry in batch]
    push(redis_server, entries)
    result = run_worker({**env, "LAION_ENGINE": engine, "LAION_STORE_DIR": str(store)})
    assert result.returncode == 0, result.stderr[-3000:]
    rows, errors = books(client, store)
    tasks = [decode(entry) for (is_task, _), entry in zip(batch, entries, strict=True) if is_task]
    assert sorted(row["id"] for row in rows) == sorted(task.id for task in tasks), [e["error_msg"] for e in errors]
    assert [record["status"] for record in errors] == ["bad_task"] * (len(batch) - len(tasks))
    for row in rows:
        meta = next(task.meta for task in tasks if task.id == row["id"]) or {}
        for name, value in meta.items():
            if isinstance(row[name], str) and not isinstance(value, str):
                assert_same(json.loads(row[name]), value)


def assert_same(read: Any, value: Any) -> None:
    """JSON text read back holds the value (NaN equal to itself)."""
    assert json.dumps(read, sort_keys=True) == json.dumps(value, sort_keys=True)


# --- the index alone: any columns of JSON values are written and read back ---


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["a", "b", "c"]), save_values, max_size=3), min_size=1, max_size=6))
def test_any_json_values_make_an_index_parquet_reads_back(values):
    rows = [{"key": f"k{number}", **row} for number, row in enumerate(values)]
    buffer = io.BytesIO()
    pq.write_table(index_table(rows), buffer)
    buffer.seek(0)
    read = pq.read_table(buffer).to_pylist()
    assert len(read) == len(rows)
    for row, back in zip(rows, read, strict=True):
        for name, value in row.items():
            if value is None:
                assert back[name] is None
            elif isinstance(back[name], str) and not isinstance(value, str):
                assert_same(json.loads(back[name]), value)


# --- helpers ---


def claim_into_sink(client, tmp_path: Path, count: int) -> tuple[Leases, ShardSink, list[str]]:
    """A registered worker's leases, its open shard sink, and ``count`` tasks it claimed."""
    leases = Leases(client, KEYS, HOST, f"{HOST}:w", 30)
    sink = open_sink(tmp_path, leases.incarnation)
    leases.register()
    tasks = [Task(f"id{row}", "http://127.0.0.1/x.jpg", "sub", "p", row).encode() for row in range(count)]
    client.lpush(KEYS.task, *tasks)
    return leases, sink, leases.claim(count)


def open_sink(tmp_path: Path, incarnation: str = "0123456789abcdef") -> ShardSink:
    sink = ShardSink(tmp_path / "store", HOST, "w", f"{HOST}:w", 100, 600, incarnation)
    sink.open()
    return sink


def sample_image() -> Processed:
    data = image_bytes("x", "jpg", 2000)
    return Processed(data, "jpg", None, sha256=hashlib.sha256(data).hexdigest())


def ready_shards(sink: ShardSink, wait: float = 2.0) -> list[shards.Shard]:
    """Every shard the sealer hands over within ``wait`` seconds."""
    found = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            found.append(sink.ready.get(timeout=0.1))
        except queue.Empty:
            continue
    return found
