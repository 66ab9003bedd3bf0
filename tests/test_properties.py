"""Property-based tests: the task encoding round trip and the id-to-path mapping."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from laion5b.store import image_folder
from laion5b.tasks import BadTask, Task, decode, safe_id

STORE = Path("/data/store")
ids = st.one_of(st.text(max_size=300), st.integers(), st.floats(allow_nan=False), st.binary(max_size=80))
names = st.text(min_size=1, max_size=40).map(safe_id)
tasks = st.builds(
    Task,
    id=ids.map(safe_id),
    url=st.text(max_size=500),
    subset=st.lists(names, min_size=1, max_size=3).map("/".join),
    part=names,
    row=st.integers(min_value=0, max_value=10**12),
    text=st.none() | st.text(max_size=200),
    attempts=st.integers(min_value=0, max_value=100),
    meta=st.none()
    | st.dictionaries(
        st.text(max_size=20),
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text()
        | st.lists(st.integers() | st.text(max_size=5), max_size=3),
        max_size=4,
    ),
    expected_hash=st.none()
    | st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())
    | st.binary(min_size=16, max_size=16).map(lambda b: "md5:" + b.hex()),
)


@given(tasks)
def test_encoding_round_trip(task):
    assert decode(task.encode()).fields() == task.fields()  # an empty meta is left out: fields() says so too


@given(ids)
def test_a_stored_file_never_leaves_its_folder(sample_id):
    task = Task(id=safe_id(sample_id), url="http://x", subset="s", part="p", row=7)
    folder = Path(image_folder(str(STORE), task))
    path = (folder / f"{task.id}.jpg").resolve()
    assert path.parent == folder
    assert path.is_relative_to(STORE)
    assert len(task.id.encode("utf-8", "surrogatepass")) <= 200 and "/" not in task.id and "\0" not in task.id


@given(st.text(max_size=300), st.text(max_size=300))
def test_distinct_ids_never_share_a_name(first, second):
    if first != second:
        assert safe_id(first) != safe_id(second)


@given(st.text(max_size=60))
def test_ids_that_look_hashed_are_hashed_again(suffix):
    crafted = "sha1-" + suffix
    assert safe_id(crafted) != crafted


@given(st.text(max_size=400) | st.binary(max_size=400))
def test_decoding_garbage_raises_only_bad_task(raw):
    with contextlib.suppress(BadTask):
        decode(raw)


@given(tasks)
def test_the_fast_encoding_is_plain_json(task):
    assert task.encode() == json.dumps(task.fields(), ensure_ascii=False, separators=(",", ":"))
