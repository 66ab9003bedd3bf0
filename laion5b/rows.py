"""What every input reader yields: rows, the columns picked by the settings, and one-line input errors."""

from __future__ import annotations

import base64
import datetime
import decimal
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, NamedTuple

URL_COLUMNS = ("url",)
ID_COLUMNS = ("hash", "sample_id")
TEXT_COLUMNS = ("text", "caption")
"""The LAION schemas' column names, found in any case when a setting leaves the column to auto-detection."""


class InputError(ValueError):
    """An input file that cannot be used; the message is one line."""


class Row(NamedTuple):
    """One input row: its 0-based position, sample id (None: use the position), URL, caption, expected hash (text,
    None or empty: not checked), ``save_columns`` values, and why it could not be read (None: it could)."""

    row: int
    sample_id: object
    url: object
    text: str | None
    hash: object = None
    meta: dict[str, Any] | None = None
    problem: str | None = None


@dataclass(frozen=True)
class Columns:
    """The column settings: a name, or empty to auto-detect (url, id, caption) or to go without (hash)."""

    url: str = ""
    caption: str = ""
    id: str = ""
    hash: str = ""
    names: tuple[str, ...] = ()
    """Names of the columns of a file without a header row (``input_columns``); empty: the file has a header."""
    save: tuple[str, ...] = ()


@dataclass(frozen=True)
class Picked:
    """The file's own names of the columns to read (None: the file has no such column)."""

    url: str
    id: str | None = None
    text: str | None = None
    hash: str | None = None
    save: tuple[tuple[str, str], ...] = ()
    """(name in the settings, name in the file) of each save column."""

    def needed(self) -> list[str]:
        """Every column to read, once each, in a stable order."""
        names = [self.url, self.id, self.text, self.hash, *(column for _, column in self.save)]
        return list(dict.fromkeys(name for name in names if name is not None))


def pick(columns: Columns, names: Sequence[str], path: Path) -> Picked:
    """Map the settings to the file's column names (exact, else ignoring case); raise InputError naming the setting
    and the file's columns when one is missing."""
    by_lower: dict[str, str] = {}
    for name in names:
        by_lower.setdefault(name.lower(), name)

    def find(setting: str, wanted: str, candidates: tuple[str, ...]) -> str | None:
        if wanted:
            found = wanted if wanted in names else by_lower.get(wanted.lower())
            if found is None:
                raise InputError(f"{path}: {setting} {wanted!r} is not a column of this file ({_listed(names)})")
            return found
        return next((by_lower[c] for c in candidates if c in by_lower), None)

    url = find("url_col", columns.url, URL_COLUMNS)
    if url is None:
        raise InputError(f"{path}: no URL column ({_listed(names)}); name it with url_col")
    return Picked(
        url=url,
        id=find("id_col", columns.id, ID_COLUMNS),
        text=find("caption_col", columns.caption, TEXT_COLUMNS),
        hash=find("hash_col", columns.hash, ()),
        save=tuple((name, find("save_columns", name, ())) for name in columns.save),  # type: ignore[misc]
    )


def _listed(names: Sequence[str]) -> str:
    return "columns: " + (", ".join(names)[:300] or "none")


def text(value: object) -> str | None:
    """A caption as text (None stays None)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def json_safe(value: Any) -> Any:
    """``value`` as a JSON value: NaN and infinities become None, bytes text, times ISO 8601, decimals numbers."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return json_safe(float(value))
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return str(value)


def meta_of(names: Sequence[str], columns: Sequence[Sequence[Any]], count: int, convert: bool) -> list[dict | None]:
    """One dict of the save columns' values per row (None for every row when there are no save columns)."""
    if not names:
        return [None] * count
    safe: Callable[[Any], Any] = json_safe
    if convert:
        columns = [list(map(safe, column)) for column in columns]
    return list(map(dict, map(zip, repeat(names), zip(*columns, strict=True))))  # the fastest form measured
