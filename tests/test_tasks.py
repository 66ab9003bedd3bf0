import hashlib
import json

import pytest

from laion5b.tasks import BadTask, Task, decode, hash_mismatch, is_transient, safe_id, url_problem


def test_round_trip_keeps_every_field():
    task = Task(id="abc", url="http://x/é b.jpg", subset="laion2B-en", part="00001", row=7, text="a ☃", attempts=2)
    assert decode(task.encode()) == task
    assert json.loads(task.encode())["url"] == "http://x/é b.jpg"


def test_error_record_is_flat_with_unique_ids():
    task = Task(id="abc", url="http://x", subset="s", part="p", row=1)
    first = json.loads(task.error_record(404, "HTTP 404", "host-1"))
    second = json.loads(task.error_record(404, "HTTP 404", "host-1"))
    assert {k: first[k] for k in ("id", "url", "subset", "part", "row", "status", "error_msg", "worker")} == {
        "id": "abc",
        "url": "http://x",
        "subset": "s",
        "part": "p",
        "row": 1,
        "status": 404,
        "error_msg": "HTTP 404",
        "worker": "host-1",
    }
    assert first["record_id"] != second["record_id"]


@pytest.mark.parametrize("value", ["abc", "0123abcd", 42, 1.0e8])
def test_safe_ids_are_kept(value):
    assert safe_id(value) == (str(int(value)) if isinstance(value, float) else str(value))


@pytest.mark.parametrize("value", ["../etc", "a/b", "a\\b", "x\ny", "", ".", "..", ".hidden", "z" * 129, "a\x00b"])
def test_unsafe_ids_become_sha1(value):
    assert safe_id(value) == "sha1-" + hashlib.sha1(str(value).encode()).hexdigest()


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        '{"id": "a"}',
        '{"id": "../x", "url": "http://x", "subset": "s", "part": "p", "row": 1}',
        '{"id": "a", "url": "http://x", "subset": "../s", "part": "p", "row": 1}',
        '{"id": "a", "url": "http://x", "subset": "s", "part": "p", "row": "1"}',
        '{"id": 5, "url": "http://x", "subset": "s", "part": "p", "row": 1}',
    ],
)
def test_bad_tasks_are_refused(raw):
    with pytest.raises(BadTask):
        decode(raw)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (None, "missing"),
        ("", "missing"),
        ("   ", "missing"),
        ("UNLIKELY", "not http"),
        ("ftp://x/y.jpg", "not http"),
        ("javascript:alert(1)", "not http"),
        ("http://x/" + "a" * 5000, "longer than 4096"),
        ("https://x/a b.jpg", None),
        ("HTTP://X/Y.JPG", None),
    ],
)
def test_url_problems(url, problem):
    found = url_problem(url)
    assert (found is None) if problem is None else (problem in found)


def test_transient_statuses():
    assert all(is_transient(s) for s in ("timeout", "connection", "dns", 500, 503, 408, 429))
    assert not any(is_transient(s) for s in (404, 403, "ssl", "not_image", "too_large", "disallowed", "bad_url"))


def test_meta_and_expected_hash_travel_and_the_error_record_keeps_them():
    expected = "sha256:" + hashlib.sha256(b"body").hexdigest()
    task = Task(id="a", url="http://x", subset="s", part="p", row=1, text="cap", meta={"w": 3}, expected_hash=expected)
    assert decode(task.encode()) == task
    record = json.loads(task.error_record("hash_mismatch", "differs", "w"))
    assert record["meta"] == {"w": 3} and record["expected_hash"] == expected and record["text"] == "cap"
    assert "meta" not in Task(id="a", url="http://x", subset="s", part="p", row=1, meta={}).encode()


def test_hash_mismatch_checks_only_what_the_task_expects():
    body = b"image bytes"
    plain = Task(id="a", url="http://x", subset="s", part="p", row=1)
    assert hash_mismatch(plain, body) is None
    good = Task(
        id="a", url="http://x", subset="s", part="p", row=1, expected_hash="md5:" + hashlib.md5(body).hexdigest()
    )
    assert hash_mismatch(good, body) is None
    wrong = Task(id="a", url="http://x", subset="s", part="p", row=1, expected_hash="sha256:" + "0" * 64)
    assert (
        hash_mismatch(wrong, body) == f"sha256 {hashlib.sha256(body).hexdigest()} differs from the expected {'0' * 64}"
    )


@pytest.mark.parametrize("value", ['"sha256:abc"', '"sha1:' + "0" * 40 + '"', '"SHA256:' + "0" * 64 + '"', "5"])
def test_bad_expected_hashes_are_refused(value):
    with pytest.raises(BadTask, match="expected_hash"):
        decode('{"id":"a","url":"http://x","subset":"s","part":"p","row":1,"expected_hash":' + value + "}")
