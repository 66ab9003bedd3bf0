"""The task record and the error record: encoding, decoding, sample ids, status words."""

from __future__ import annotations

import hashlib
import json
import json.encoder
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any

MAX_ID_CHARS = 128
MAX_ID_BYTES = 200
"""File names are limited to 255 bytes: an id whose UTF-8 form is longer than this is hashed too."""
HASHED_PREFIX = "sha1-"
MAX_URL_CHARS = 4096
TRANSIENT_WORDS = frozenset({"timeout", "connection", "dns", "truncated", "robots_unavailable"})
TRANSIENT_CODES = frozenset({408, 429})
HASH_DIGITS = {"sha256": 64, "md5": 32}
"""Content hashes a task may carry to be checked (``verify_hash``), with the hex digits of each."""
METADATA_FIELDS = frozenset(
    {"key", "id", "url", "caption", "final_url", "ext", "bytes", "sha256", "width", "height", "downloaded_at"}
    | {"host_id", "worker", "attempts", "original_width", "original_height", "original_sha256", "original_format"}
)
"""Names of a sample's metadata fields: a ``save_columns`` name must be none of them."""
BAD_URL = "bad_url"
BAD_ROW = "bad_row"
HASH_MISMATCH = "hash_mismatch"
INTERNAL_ERROR = "internal_error"
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_STRING = json.encoder.encode_basestring
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]|\.\.|^\.")
_EXPECTED_HASH = re.compile(r"sha256:[0-9a-f]{64}|md5:[0-9a-f]{32}")
MAX_MESSAGE_CHARS = 200

Status = int | str
"""An HTTP status code, or one of the status words (``timeout``, ``not_image``, ...)."""


class BadTask(ValueError):
    """A queued entry that is not a task this suite can work on."""


@dataclass(slots=True)
class Task:
    """One image to download: where its row came from, and how often it was tried."""

    id: str
    url: str
    subset: str
    part: str
    row: int
    text: str | None = None
    attempts: int = 0
    meta: dict[str, Any] | None = None
    """The row's ``save_columns`` values by name (JSON values); None or empty: none."""
    expected_hash: str | None = None
    """``sha256:<hex>`` or ``md5:<hex>``: the body must hash to this (``verify_hash``); None: not checked."""

    def fields(self) -> dict[str, Any]:
        """The task as a flat dict, without empty fields."""
        fields: dict[str, Any] = {"id": self.id, "url": self.url, "subset": self.subset, "part": self.part}
        fields["row"] = self.row
        if self.text is not None:
            fields["text"] = self.text
        if self.meta:
            fields["meta"] = self.meta
        if self.expected_hash is not None:
            fields["expected_hash"] = self.expected_hash
        fields["attempts"] = self.attempts
        return fields

    def encode(self) -> str:
        """The JSON text stored in Redis: the same as ``_ENCODE(self.fields())``, built without the encoder's overhead
        (the producer encodes hundreds of thousands of tasks a second)."""
        text = "" if self.text is None else f',"text":{_STRING(self.text)}'
        if self.meta:
            text += f',"meta":{_object(self.meta)}'
        if self.expected_hash is not None:
            text += f',"expected_hash":{_STRING(self.expected_hash)}'
        return (
            f'{{"id":{_STRING(self.id)},"url":{_STRING(self.url)},"subset":{_STRING(self.subset)},'
            f'"part":{_STRING(self.part)},"row":{self.row:d}{text},"attempts":{self.attempts:d}}}'
        )

    def error_record(self, status: Status, error_msg: str, worker: str) -> str:
        """The flat JSON error record for this task, with a unique ``record_id``. A task whose fields cannot be
        written as JSON (nesting too deep, a lone surrogate) gets a record without its ``meta``, its strings made
        valid Unicode."""
        record = self.fields()
        record.update(
            status=status,
            error_msg=error_msg,
            worker=worker,
            ts=round(time.time(), 3),
            record_id=os.urandom(8).hex(),
        )
        try:
            text = _ENCODE(record)
            text.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError here, not in the Redis client
            return text
        except (ValueError, RecursionError):
            record.pop("meta", None)
            return _ENCODE(
                {name: printable(value) if isinstance(value, str) else value for name, value in record.items()}
            )


def _object(values: dict[str, Any]) -> str:
    """A JSON object as ``_ENCODE`` writes it; strings, the common case, take the shortest path."""
    parts = []
    for key, value in values.items():
        parts.append(f"{_STRING(key)}:{_STRING(value) if type(value) is str else _value(value)}")
    return "{" + ",".join(parts) + "}"


def _value(value: Any) -> str:
    """A JSON value as ``_ENCODE`` writes it, for the common types without the encoder's overhead."""
    kind = type(value)
    if kind is str:
        return _STRING(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return _ENCODE(value)


def hash_mismatch(task: Task, data: bytes) -> str | None:
    """Why ``data`` is not the body the task expects (an ``error_msg``), or None when it is or nothing is expected."""
    if task.expected_hash is None:
        return None
    name, _, expected = task.expected_hash.partition(":")
    actual = hashlib.new(name, data).hexdigest()
    return None if actual == expected else f"{name} {actual} differs from the expected {expected}"


def decode(raw: str | bytes) -> Task:
    """Parse a task from Redis; raise BadTask with a one-line reason when it is not one. Whatever a queued entry
    holds (any JSON, nesting too deep to parse, invalid UTF-8 kept as surrogates) ends as BadTask, never as another
    exception."""
    try:
        return _parse(raw)
    except BadTask:
        raise
    except Exception as error:  # any entry is a task or BadTask
        raise BadTask(f"not a task: {type(error).__name__}: {one_line(error)}") from None


def _parse(raw: str | bytes) -> Task:
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # surrogates: the client's stand-ins for bytes that are not UTF-8
        raise BadTask("not a task: not valid UTF-8") from None
    fields = json.loads(text)
    if not isinstance(fields, dict):
        raise BadTask("not a task: not a JSON object")
    task = Task(
        id=fields["id"],
        url=fields["url"],
        subset=fields["subset"],
        part=fields["part"],
        row=fields["row"],
        text=fields.get("text"),
        attempts=fields.get("attempts", 0),
        meta=fields.get("meta"),
        expected_hash=fields.get("expected_hash"),
    )
    _check(task)
    if "\\u" in text:  # a JSON escape may stand for a lone surrogate
        try:
            task.encode().encode("utf-8")
        except UnicodeEncodeError:
            raise BadTask("not a task: a string holds a lone surrogate") from None
    return task


def _check(task: Task) -> None:
    """Raise BadTask when a parsed task's fields have the wrong types or values."""
    if task.meta is not None and not isinstance(task.meta, dict):
        raise BadTask("not a task: meta must be an object")
    if task.meta and not METADATA_FIELDS.isdisjoint(task.meta):
        raise BadTask("not a task: meta names a metadata field")
    if task.expected_hash is not None and not (
        isinstance(task.expected_hash, str) and _EXPECTED_HASH.fullmatch(task.expected_hash)
    ):
        raise BadTask("not a task: expected_hash must be sha256:<64 hex digits> or md5:<32 hex digits>")
    if not isinstance(task.row, int) or not isinstance(task.attempts, int) or task.row < 0:
        raise BadTask("not a task: row and attempts must be whole numbers")
    if not all(isinstance(value, str) for value in (task.id, task.url, task.subset, task.part)):
        raise BadTask("not a task: id, url, subset and part must be strings")
    if task.text is not None and not isinstance(task.text, str):
        raise BadTask("not a task: text must be a string")
    if not (_is_safe_name(task.id) and _is_safe_name(task.part) and _safe_folder(task.subset)):
        raise BadTask("not a task: id, subset or part would leave the store folder")


def safe_id(value: object) -> str:
    """The sample id as a file name: kept when safe, else ``sha1-`` + the SHA-1 of its text.

    Ids that already start with ``sha1-`` are hashed too, so two distinct ids never share a name.
    """
    if type(value) is int and value >= 0:
        return str(value)
    if type(value) is float and 0 <= value < 1e100 and value.is_integer():  # LAION's SAMPLE_ID: digits, always safe
        return str(int(value))
    text = _id_text(value)
    if _is_safe_name(text) and not text.startswith(HASHED_PREFIX):
        return text
    return HASHED_PREFIX + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def _id_text(value: object) -> str:
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return str(int(value))
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _is_safe_name(text: str) -> bool:
    return (
        0 < len(text) <= MAX_ID_CHARS
        and len(text.encode("utf-8", "surrogatepass")) <= MAX_ID_BYTES
        and _UNSAFE.search(text) is None
    )


def _safe_folder(subset: str) -> bool:
    """A subset is a relative folder of one or more safe names."""
    return all(_is_safe_name(name) for name in subset.split("/"))


def url_problem(url: object) -> str | None:
    """Why ``url`` cannot be queued, or None when it is an http(s) URL of sane length."""
    if type(url) is str and url.startswith(("http://", "https://")) and len(url) <= MAX_URL_CHARS:
        return None  # the common case, decided without the checks below
    if not isinstance(url, str) or not url.strip():
        return "missing or empty URL"
    if len(url) > MAX_URL_CHARS:
        return f"URL longer than {MAX_URL_CHARS} characters"
    scheme = url.strip().split(":", 1)[0].lower()
    if scheme not in ("http", "https") or "://" not in url:
        return f"URL scheme {scheme[:20]!r} is not http or https"
    return None


def is_transient(status: Status) -> bool:
    """Whether a failure may succeed when tried again later."""
    if isinstance(status, int):
        return status >= 500 or status in TRANSIENT_CODES
    return status in TRANSIENT_WORDS


def bad_task_record(raw: str | bytes, error_msg: str, worker: str) -> str:
    """The error record of a queued entry that is not a task: it keeps the entry as given (its start)."""
    return entry_record(raw, "bad_task", error_msg, worker)


def entry_record(raw: str | bytes, status: Status, error_msg: str, worker: str) -> str:
    """An error record that keeps the queued entry itself (its start) instead of a task's fields. Never raises: text
    that is not valid UTF-8 is kept with backslash escapes."""
    return _ENCODE(
        {
            "raw": printable(raw[:MAX_URL_CHARS]),
            "status": status,
            "error_msg": printable(error_msg),
            "worker": printable(worker),
            "ts": round(time.time(), 3),
            "record_id": os.urandom(8).hex(),
        }
    )


def printable(text: str | bytes) -> str:
    """``text`` as valid Unicode: invalid UTF-8 (bytes, or the surrogates that stand for it) as ``\\xNN``, other
    lone surrogates as ``\\uNNNN``."""
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(error: BaseException) -> str:
    """An exception's message on one line, at most ``MAX_MESSAGE_CHARS`` long, never raising."""
    try:
        text = str(error)
    except Exception:  # a broken __str__ must not hide the error itself
        text = ""
    return printable(" ".join(text.split())[:MAX_MESSAGE_CHARS])
