"""Fixture of the loopback image server (tools/image_server.py), shared by every HTTP test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tools.image_server import ImageServer


@pytest.fixture(scope="module")
def image_server() -> Iterator[ImageServer]:
    """The image server on 127.0.0.1 and a free port, for the whole test module."""
    server = ImageServer()
    server.start()
    yield server
    server.stop()
