"""Retry-After parsing and the delay rule of laion5b.retry."""

from __future__ import annotations

from email.utils import formatdate

import pytest
from hypothesis import given
from hypothesis import strategies as st

from laion5b.retry import parse_retry_after, retry_after_of, retry_delay

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("-5", 0.0),
        (formatdate(NOW + 90, usegmt=True), 90.0),
        (formatdate(NOW + 90), 90.0),  # "-0000": UTC
        ("Tue, 14 Nov 2023 23:15:20 +0100", 120.0),
        (formatdate(NOW - 30, usegmt=True), 0.0),
        ("Sunday, 06-Nov-94 08:49:37 GMT", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("1.5", None),
        ("2 seconds", None),
        ("9" * 5000, None),
        ("Mon, 99 Foo 2023 25:61:61 GMT", None),
    ],
)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, NOW) == (pytest.approx(expected) if expected is not None else None)


@given(st.text(max_size=60))
def test_any_text_parses_to_none_or_a_wait(value):
    wait = parse_retry_after(value, NOW)
    assert wait is None or wait >= 0


def test_only_429_and_503_are_honoured():
    assert retry_after_of(429, "3", NOW) == 3.0
    assert retry_after_of(503, "3", NOW) == 3.0
    assert retry_after_of(500, "3", NOW) is None
    assert retry_after_of(429, None, NOW) is None


@pytest.mark.parametrize(
    ("attempts", "retry_after", "expected"),
    [
        (1, None, 30.0),
        (2, None, 60.0),
        (3, None, 120.0),
        (1, 2.0, 2.0),
        (2, 2.0, 2.0),
        (1, 0.0, 0.0),
        (1, 7200.0, 3600.0),
        (1, -3.0, 0.0),
    ],
)
def test_retry_delay(attempts, retry_after, expected):
    assert retry_delay(attempts, retry_after, 30.0, 3600.0) == expected


def test_fractional_backoff_for_quick_runs():
    assert [retry_delay(n, None, 0.1, 3600.0) for n in (1, 2, 3)] == pytest.approx([0.1, 0.2, 0.4])
