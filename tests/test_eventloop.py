"""The async engine's event loop (engine_loop): uvloop's where it is installed, else asyncio's with one log line."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest
import uvloop

from laion5b.eventloop import loop_factory


def made_by(wanted: str) -> tuple[str, asyncio.AbstractEventLoop]:
    name, new_loop = loop_factory(wanted)
    loop = new_loop()
    loop.close()
    return name, loop


def test_uvloop_is_made_where_installed(caplog: pytest.LogCaptureFixture) -> None:
    name, loop = made_by("uvloop")
    assert name == "uvloop" and isinstance(loop, uvloop.Loop)
    assert "engine_loop_fallback" not in caplog.text


def test_asyncio_is_made_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    name, loop = made_by("asyncio")
    assert name == "asyncio" and isinstance(loop, asyncio.BaseEventLoop) and not isinstance(loop, uvloop.Loop)
    assert "engine_loop_fallback" not in caplog.text


def test_a_missing_uvloop_falls_back_to_asyncio_with_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError, as where it is missing
    with caplog.at_level(logging.WARNING):
        name, loop = made_by("uvloop")
    assert name == "asyncio" and not isinstance(loop, uvloop.Loop)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("engine_loop_fallback wanted=uvloop reason="), lines
    assert "\n" not in lines[0]
